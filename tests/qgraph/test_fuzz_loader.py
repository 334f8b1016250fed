"""Fuzz Graph.from_json with mutated real Symbol JSON.

Contract: for any text, `Graph.from_json(text, params)` either raises a QGraphError or returns
a graph whose `verify()` passes; the same holds for `verify()` once the real input shape is
known, and the graph's own emission (`to_json`) loads back. Anything else -- another exception
type, a crash (MXNet aborts or segfaults on some malformed graphs) or a hang -- is a bug in the
validator. Each example runs in a child forked from a clean helper process (the "zygote"), so a
crash is reported as a failing example instead of killing pytest, and does not depend on what
other tests left in memory. Examples are derandomized: every run checks the same ones.
"""
from __future__ import annotations

import copy
import faulthandler
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import mxnet as mx
import pytest
from helpers import build_everything_symbol, build_small_symbol, make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgraph import Graph, QGraphError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to survive MXNet crashes")

MODELS = {
    "small": make_model(build_small_symbol(), {"data": (2, 3, 6, 6)}, seed=2),
    "everything": make_model(build_everything_symbol(), {"data": (2, 3, 8, 8)}, seed=1),
}
DOCS = {name: json.loads(model.json) for name, model in MODELS.items()}

REGISTERED_OPS = sorted(mx.operator.get_all_registered_operators())
OPS_IN_MODELS = sorted({n["op"] for doc in DOCS.values() for n in doc["nodes"]})
ATTR_KEYS = ("kernel", "stride", "pad", "dilate", "num_filter", "num_group", "no_bias", "num_hidden",
             "flatten", "act_type", "pool_type", "global_pool", "eps", "fix_gamma", "axis", "dim",
             "num_outputs", "num_args", "layout", "target_shape", "squeeze_axis", "use_global_stats",
             "__shape__", "__dtype__", "__init__", "__lr_mult__", "__storage_type__", "__profiler_scope__")
GARBAGE_VALUES = ("", "(", "()", "(0, 0)", "(-1, -1)", "(3, 3, 3, 3, 3)", "-1", "0", "1", "99999999999",
                  "1e309", "nan", "None", "True", "tru", "[1,2", "((1, 2), 3)", "relu", "\x00", "{}",
                  '["zero", {}]', '["bogus"]', "(2147483648,)", "int8", "float16", "NHWC")
BIG_INTS = (2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**63, 10**20, -(2**31))
EXTRA_KEYS = ("control_deps", "subgraphs", "backward_source_id", "attr", "param", "name2")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.sampled_from(BIG_INTS)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


# ------------------------------------------------------------------ mutations (doc -> doc)
def _node_index(data, doc):
    return data.draw(st.integers(0, len(doc["nodes"]) - 1), label="node")


def delete_key(data, doc):
    if data.draw(st.booleans(), label="top-level"):
        key = data.draw(st.sampled_from(sorted(doc)), label="key")
        del doc[key]
    else:
        node = doc["nodes"][_node_index(data, doc)]
        key = data.draw(st.sampled_from(sorted(node)), label="key")
        del node[key]
    return doc


def change_int(data, doc):
    places = [("heads", j) for j in range(len(doc["heads"]))]
    places += [(i, j) for i, n in enumerate(doc["nodes"]) for j in range(len(n["inputs"]))]
    where, j = data.draw(st.sampled_from(places), label="entry")
    entry = doc["heads"][j] if where == "heads" else doc["nodes"][where]["inputs"][j]
    k = data.draw(st.integers(0, len(entry) - 1), label="field")
    entry[k] = data.draw(st.integers(-3, len(doc["nodes"]) + 3) | st.sampled_from(BIG_INTS), label="value")
    return doc


def swap_op(data, doc):
    node = doc["nodes"][_node_index(data, doc)]
    node["op"] = data.draw(st.sampled_from(REGISTERED_OPS) | st.sampled_from(OPS_IN_MODELS)
                           | st.just("null") | st.text(max_size=12), label="op")
    return doc


def garbage_attr(data, doc):
    if data.draw(st.integers(0, 9), label="graph attrs?") == 0:
        if not isinstance(doc.get("attrs"), dict):
            doc["attrs"] = {}
        doc["attrs"]["mxnet_version"] = data.draw(
            st.sampled_from([["int", 800], ["int", 900], ["int", 10000], ["int", 10300], ["int", -1],
                             ["str", "1.9"], [], "10901"]) | json_values, label="mxnet_version")
        return doc
    node = doc["nodes"][_node_index(data, doc)]
    if not isinstance(node.get("attrs"), dict):
        node["attrs"] = {}
    attrs = node["attrs"]
    key = data.draw(st.sampled_from(sorted(attrs) + list(ATTR_KEYS)) | st.text(max_size=6), label="attr")
    attrs[key] = data.draw(st.sampled_from(GARBAGE_VALUES) | st.text(max_size=10)
                           | st.integers(-10, 10).map(str), label="value")
    return doc


def duplicate_node(data, doc):
    nodes = doc["nodes"]
    i = _node_index(data, doc)
    j = data.draw(st.integers(0, len(nodes)), label="position")
    clone = copy.deepcopy(nodes[i])
    if data.draw(st.booleans(), label="rename"):
        clone["name"] = f"{clone.get('name')}_dup"
    nodes.insert(j, clone)
    if data.draw(st.booleans(), label="keep references"):  # shift indices so old edges stay put
        for entry in [e for n in nodes if n is not clone for e in n["inputs"]] + doc["heads"]:
            if entry[0] >= j:
                entry[0] += 1
    return doc


def drop_node(data, doc):
    i = _node_index(data, doc)
    del doc["nodes"][i]
    if data.draw(st.booleans(), label="shift references"):
        for entry in [e for n in doc["nodes"] for e in n["inputs"]] + doc["heads"]:
            if entry[0] > i:
                entry[0] -= 1
    return doc


def change_type(data, doc):
    choice = data.draw(st.integers(0, 6), label="what")
    value = data.draw(json_values, label="value")
    node = doc["nodes"][_node_index(data, doc)]
    if choice == 0:
        doc[data.draw(st.sampled_from(sorted(doc)), label="key")] = value
    elif choice == 1:
        node[data.draw(st.sampled_from(sorted(node)), label="key")] = value
    elif choice == 2 and node["inputs"]:
        node["inputs"][data.draw(st.integers(0, len(node["inputs"]) - 1), label="slot")] = value
    elif choice == 3:
        doc["heads"][data.draw(st.integers(0, len(doc["heads"]) - 1), label="head")] = value
    elif choice == 4:
        doc["nodes"][_node_index(data, doc)] = value
    else:  # an extra key MXNet may read (control_deps, subgraphs) and qgraph keeps verbatim
        node[data.draw(st.sampled_from(EXTRA_KEYS), label="extra key")] = data.draw(
            st.lists(st.integers(-2, len(doc["nodes"]) + 2), max_size=3) | st.just(value), label="extra")
    return doc


DOC_MUTATIONS = {f.__name__: f for f in (delete_key, change_int, swap_op, garbage_attr, duplicate_node,
                                         drop_node, change_type)}


def mutated_text(data, model_name: str, family: str) -> str:
    doc = copy.deepcopy(DOCS[model_name])
    if family == "truncate":
        text = json.dumps(doc, indent=data.draw(st.sampled_from([None, 2]), label="indent"))
        return text[: data.draw(st.integers(0, len(text) - 1), label="cut")]
    names = sorted(DOC_MUTATIONS) if family == "mixed" else [family]
    for _ in range(data.draw(st.integers(1, 3), label="rounds") if family == "mixed" else 1):
        doc = DOC_MUTATIONS[data.draw(st.sampled_from(names), label="mutation")](data, doc)
        if not _well_formed(doc):
            break  # later mutations need a well-formed skeleton; this one already is malformed
    return json.dumps(doc)


def _entries_ok(entries) -> bool:
    return isinstance(entries, list) and all(
        isinstance(e, list) and e and all(type(v) is int for v in e) for e in entries)


def _well_formed(doc) -> bool:
    return (isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and bool(doc["nodes"])
            and all(isinstance(n, dict) and _entries_ok(n.get("inputs")) for n in doc["nodes"])
            and bool(doc.get("heads")) and _entries_ok(doc["heads"]))


# ------------------------------------------------------------------ the property, run in a child
def check_loader(text: str, params, input_shapes: dict) -> str:
    """'rejected' / 'accepted', or raises: the property under test."""
    try:
        graph = Graph.from_json(text, params)
    except QGraphError:
        return "rejected"
    graph.verify()  # from_json accepted it: verify() must pass
    Graph.from_json(graph.to_json(), graph.params).verify()  # and our own emission must load
    if graph.input_names == list(input_shapes):
        graph.input_shapes = dict(input_shapes)
        try:
            graph.verify()
        except QGraphError:
            return "rejected with shapes"
    return "accepted"


def run_forked(func, *args, timeout: float = 60.0) -> tuple[str, str]:
    """Run func(*args) in a forked child: ('ok', result) | ('raised', traceback) | ('crashed', why).

    The child's stderr goes to a temporary file whose tail is part of a crash report."""
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as stderr_file:
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            os.close(read_fd)
            faulthandler.disable()
            os.dup2(stderr_file.fileno(), 1)  # MXNet prints infer_shape errors on stdout
            os.dup2(stderr_file.fileno(), 2)
            try:
                message = "ok\n" + str(func(*args))
            except BaseException:  # noqa: BLE001 - reporting every failure is the point
                message = "raised\n" + traceback.format_exc()
            with os.fdopen(write_fd, "w") as stream:
                stream.write(message)
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd) as stream:
            ready, _, _ = select.select([stream], [], [], timeout)  # readable: the child wrote or died
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "crashed", f"no answer after {timeout} s (hang)"
            text = stream.read()
        _, status = os.waitpid(pid, 0)
        stderr_file.seek(0)
        stderr_tail = stderr_file.read().decode(errors="replace").strip().splitlines()[-12:]
    if os.WIFSIGNALED(status):
        return "crashed", f"killed by {signal.Signals(os.WTERMSIG(status)).name}\n" + "\n".join(stderr_tail)
    if os.WEXITSTATUS(status) != 0 or "\n" not in text:  # MXNet's SIGSEGV handler exits with 255
        return "crashed", f"exit status {os.WEXITSTATUS(status)}\n" + "\n".join(stderr_tail)
    kind, _, detail = text.partition("\n")
    return kind, detail


class Zygote:
    """A fresh interpreter, started once with glibc's MALLOC_PERTURB_ set, that forks one child per
    example. Forking from it rather than from pytest keeps what MXNet finds when it reads past a
    vector (undefined behaviour) independent of whichever tests ran before, so an example that
    crashes does so in every run."""

    def __init__(self):
        self._start()

    def _start(self):
        tests = Path(__file__).resolve().parents[1]
        path = os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, MALLOC_PERTURB_="165", PYTHONPATH=path)
        self.process = subprocess.Popen([sys.executable, __file__, "--zygote"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert self._answer(120.0) == ["ready"], "the fuzz zygote did not start"

    def _answer(self, timeout: float):
        while True:
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            line = self.process.stdout.readline() if ready else ""
            if not line:
                return None
            if line.startswith("@@"):
                return json.loads(line[2:])

    def check(self, text: str, model_name: str, with_params: bool, timeout: float = 120.0) -> tuple[str, str]:
        self.process.stdin.write("@@" + json.dumps([text, model_name, with_params]) + "\n")
        self.process.stdin.flush()
        answer = self._answer(timeout)
        if answer is None:
            self.close()
            self._start()
            return "crashed", "the zygote itself died or hung"
        return answer[0], answer[1]

    def close(self):
        """End of input lets the zygote exit normally (and clean up); kill it if it does not."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def _zygote_main() -> None:
    print("@@" + json.dumps(["ready"]), flush=True)
    for line in sys.stdin:
        text, model_name, with_params = json.loads(line[2:])
        model = MODELS[model_name]
        answer = run_forked(check_loader, text, model.params if with_params else None, model.input_shapes)
        print("@@" + json.dumps(list(answer)), flush=True)


@pytest.fixture(scope="module", autouse=True)
def _same_examples_in_every_context():
    """Hypothesis mixes constants mined from every local module in sys.modules into what it draws,
    so the derandomized examples would depend on which other test files were collected. Draw
    without them (hypothesis internals, pinned in requirements.txt; skipped if they move)."""
    try:
        from hypothesis.internal.conjecture import providers

        empty, cache = providers.Constants(), providers.CONSTANTS_CACHE.cache
        assert callable(providers._get_local_constants)
    except (ImportError, AttributeError, AssertionError):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(providers, "_get_local_constants", lambda: empty)
        cache.clear()
        yield
    cache.clear()


@pytest.fixture(scope="module")
def zygote():
    process = Zygote()
    yield process
    process.close()


def describe_mutation(text: str, model_name: str) -> str:
    """What differs from the model's real JSON, in a few lines (the whole text is long)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return f"not JSON ({len(text)} chars), ends with {text[-80:]!r}"
    original = DOCS[model_name]
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}: {text[:200]}"
    lines = [f"{key}: {json.dumps(original.get(key))[:150]} -> {json.dumps(doc.get(key))[:150]}"
             for key in sorted(set(doc) | set(original)) if key != "nodes" and doc.get(key) != original.get(key)]
    nodes = doc.get("nodes")
    if not isinstance(nodes, list):
        return "\n".join(lines + [f"nodes -> {json.dumps(nodes)[:200]}"])
    if len(nodes) != len(original["nodes"]):
        lines.append(f"{len(original['nodes'])} nodes -> {len(nodes)}")
    for i, (before, after) in enumerate(zip(original["nodes"], nodes)):
        if before != after:
            lines.append(f"node #{i}: {json.dumps(before)[:200]}\n      -> {json.dumps(after)[:300]}")
    return "\n".join(lines[:8])


def assert_loader_contract(zygote, text: str, model_name: str, with_params: bool, accept=None) -> None:
    """The example runs in a child of the zygote; `accept` narrows the acceptable verdicts."""
    kind, detail = zygote.check(text, model_name, with_params)
    last = detail.strip().splitlines()[-1] if detail.strip() else ""
    if kind == "ok" and accept is not None:
        kind = "ok" if detail in accept else f"verdict {detail!r}, expected one of {sorted(accept)}"
    assert kind == "ok", (f"{kind}: {last}\nmodel {model_name!r}, params {'given' if with_params else 'None'}, "
                          f"mutation:\n{describe_mutation(text, model_name)}\n\n{detail}")


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------ the harness itself
def test_harness_reports_crashes_exceptions_and_results():
    assert run_forked(lambda: 6 * 7) == ("ok", "42")
    kind, detail = run_forked(lambda: os.kill(os.getpid(), signal.SIGSEGV))
    assert kind == "crashed"  # MXNet's SIGSEGV handler prints a trace and exits with status 255
    kind, detail = run_forked(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert kind == "crashed" and detail.startswith("killed by SIGKILL")
    kind, detail = run_forked(lambda: 1 / 0)
    assert kind == "raised" and "ZeroDivisionError" in detail


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_unmutated_json_is_accepted(zygote, model_name):
    model = MODELS[model_name]
    assert zygote.check(model.json, model_name, True) == ("ok", "accepted")
    assert zygote.check(model.json, model_name, False) == ("ok", "accepted")  # every variable an input
    assert check_loader(model.json, model.params, model.input_shapes) == "accepted"


# ------------------------------------------------------------------ minimal failing examples found by the fuzz
# Each is a one-line edit of a real Symbol JSON that Graph.from_json used to accept and that then
# crashed the process (segfault, double free, SIGFPE) or raised a raw MXNetError in verify(). Where
# MXNet would read past the producer's outputs (undefined behaviour: a segfault, garbage, or by luck
# a GraphError) the only verdict that does not depend on luck is from_json rejecting the entry.
def _edited(model_name: str, edit) -> str:
    doc = copy.deepcopy(DOCS[model_name])
    nodes = {n["name"]: n for n in doc["nodes"]}
    index = {n["name"]: i for i, n in enumerate(doc["nodes"])}
    edit(doc, nodes, index)
    return json.dumps(doc)


def _head_reads_missing_output(doc, nodes, index):
    doc["heads"] = [[index["fc0"], 1, 0]]  # FullyConnected has one output: list_outputs() segfaulted


def _input_reads_output_1(doc, nodes, index):
    nodes["relu0"]["inputs"] = [[index["conv0"], 1, 0]]  # Convolution has one output


def _input_reads_output_100(doc, nodes, index):
    nodes["relu0"]["inputs"] = [[index["conv0"], 100, 0]]  # infer_shape segfaulted


def _split_with_one_output(doc, nodes, index):
    nodes["split"]["attrs"]["num_outputs"] = "1"  # swap and a graph head still read split output 1


def _batchnorm_without_inputs(doc, nodes, index):
    nodes["bn0"]["inputs"] = []  # infer_shape segfaulted


def _zero_groups(doc, nodes, index):
    nodes["conv0"]["attrs"]["num_group"] = "0"  # integer division by zero (SIGFPE) in infer_shape


def _deconv_zero_groups(doc, nodes, index):
    nodes["deconv"]["attrs"]["num_group"] = "0"


def _internal_op_as_head(doc, nodes, index):
    nodes["fc0"]["op"] = "_backward_CachedOp"  # list_outputs() raised a raw MXNetError


def _name_is_a_list(doc, nodes, index):
    nodes["data"]["name"] = []


def _with_subgraphs_key(edit, node):
    """`edit`, plus an empty "subgraphs" key on `node` (fused oneDNN nodes carry one)."""
    def edited(doc, nodes, index):
        edit(doc, nodes, index)
        nodes[node]["subgraphs"] = []

    return edited


REJECTED = {"rejected"}
REJECTED_ANYHOW = {"rejected", "rejected with shapes"}

MINIMAL_FAILURES = [
    pytest.param("small", _head_reads_missing_output, True, REJECTED, id="head-reads-output-1-of-FullyConnected"),
    pytest.param("small", _input_reads_output_1, True, REJECTED, id="input-reads-output-1-of-Convolution"),
    pytest.param("small", _input_reads_output_100, True, REJECTED, id="input-reads-output-100-of-Convolution"),
    pytest.param("everything", _split_with_one_output, True, REJECTED, id="SliceChannel-num_outputs-lowered"),
    pytest.param("small", _batchnorm_without_inputs, True, REJECTED_ANYHOW, id="BatchNorm-with-no-inputs"),
    pytest.param("small", _zero_groups, True, REJECTED_ANYHOW, id="Convolution-num_group-0"),
    pytest.param("everything", _deconv_zero_groups, True, REJECTED_ANYHOW, id="Deconvolution-num_group-0"),
    pytest.param("small", _internal_op_as_head, False, REJECTED_ANYHOW, id="head-op-_backward_CachedOp"),
    pytest.param("small", _name_is_a_list, False, REJECTED, id="node-name-is-a-list"),
    pytest.param("small", _with_subgraphs_key(_head_reads_missing_output, "fc0"), True, REJECTED,
                 id="subgraphs-key-then-head-reads-output-1"),
    pytest.param("small", _with_subgraphs_key(_zero_groups, "conv0"), True, REJECTED_ANYHOW,
                 id="subgraphs-key-then-num_group-0"),
    pytest.param("small", _with_subgraphs_key(_batchnorm_without_inputs, "bn0"), True, REJECTED_ANYHOW,
                 id="subgraphs-key-then-BatchNorm-with-no-inputs"),
]


@pytest.mark.parametrize("model_name, edit, with_params, accept", MINIMAL_FAILURES)
def test_minimal_failing_examples(zygote, model_name, edit, with_params, accept):
    assert_loader_contract(zygote, _edited(model_name, edit), model_name, with_params, accept)


def test_in_range_outputs_of_multi_output_ops_are_accepted(zygote):
    """The counterpart of the out-of-range cases: BatchNorm outputs 1 and 2 (batch mean and var)
    exist, so reading them is legal and the graph must load and verify."""
    def edit(doc, nodes, index):
        doc["heads"] = [[index["fc0"], 0, 0], [index["bn0"], 2, 0], [index["bn0"], 1, 0]]

    assert zygote.check(_edited("small", edit), "small", True) == ("ok", "accepted")


# ------------------------------------------------------------------ the fuzz
FAMILIES = ["truncate", *DOC_MUTATIONS]


@pytest.mark.parametrize("family", FAMILIES)
@FUZZ
@given(data=st.data(), model_name=st.sampled_from(sorted(MODELS)), with_params=st.booleans())
def test_each_mutation_family(zygote, family, data, model_name, with_params):
    assert_loader_contract(zygote, mutated_text(data, model_name, family), model_name, with_params)


@settings(FUZZ, max_examples=150)
@given(data=st.data(), model_name=st.sampled_from(sorted(MODELS)), with_params=st.booleans())
def test_mixed_mutations(zygote, data, model_name, with_params):
    assert_loader_contract(zygote, mutated_text(data, model_name, "mixed"), model_name, with_params)


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote_main()
