"""Parameter values written on qgraph's background thread: Graph.params waits for the job writing a
value (param_shape, names and membership do not), copies share the wait, a failed job's error
reaches the reader; fold_bn's background products and load's background finite check give what
the numpy paths give (on the shipped ResNet-20's trained weights), and errors name the same
parameter."""
from __future__ import annotations

import contextlib
import os
import threading

import mxnet as mx
import numpy as np
import pytest
from helpers import RESNET20, graph_of

import passes
import qgraph
from qgraph import GraphError, background, native

F32 = np.float32


@contextlib.contextmanager
def _gated_write(array: np.ndarray, value: float):
    """(job, gate): a background job writing `value` into `array` once the gate is set (set on
    leaving the block at the latest, so a failed test never leaves the worker blocked)."""
    gate = threading.Event()

    def write():
        assert gate.wait(30)
        array[...] = value
    try:
        yield background.submit(write), gate
    finally:
        gate.set()


def _finishes(call, timeout: float = 10.0):
    """call() on a thread; its result, failing if it is still blocked after `timeout` seconds."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", call()))
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked on a pending parameter"
    return result["value"]


def test_reading_a_pending_value_waits_for_its_job_and_nothing_else_does(small_graph):
    name = "conv0_weight"
    array = np.zeros_like(small_graph.params[name])
    small_graph.set_param(name, array)
    with _gated_write(array, 7.0) as (job, gate):
        small_graph.mark_pending([name], job)
        copy = small_graph.copy()
        # neither the shape, the names, membership nor another value waits for the job
        assert _finishes(lambda: small_graph.param_shape(name)) == array.shape
        assert _finishes(lambda: name in small_graph.params and len(list(small_graph.params)) == len(small_graph.params))
        assert _finishes(lambda: small_graph.params["fc0_weight"].shape) == small_graph.param_shape("fc0_weight")
        assert not job.done()
        threading.Timer(0.2, gate.set).start()
        assert np.all(small_graph.params[name] == 7.0)  # waited: the job had not written when asked
        assert np.all(copy.params[name] == 7.0)
    assert isinstance(small_graph.params, type(qgraph.Graph().params))  # nothing pending: the plain view


def test_replaced_and_removed_values_are_not_waited_for_and_a_failed_job_raises_where_read(small_graph):
    name, other = "conv0_weight", "fc0_weight"
    with _gated_write(np.zeros(1, F32), 1.0) as (job, _):
        spare = small_graph.add_variable("spare", np.zeros(2, F32))
        small_graph.mark_pending([name, other, spare], job)
        small_graph.set_param(name, np.ones(small_graph.param_shape(name), F32))
        assert _finishes(lambda: float(small_graph.params[name].sum())) == float(np.prod(small_graph.param_shape(name)))
        small_graph.remove_node(spare)
        small_graph.set_outputs(["relu0"]).cleanup()  # drops the FC layer and its parameters
        assert not job.done() and isinstance(small_graph.params, type(qgraph.Graph().params))  # none left pending
        with pytest.raises(GraphError, match="'nothing' is not a parameter"):
            small_graph.mark_pending(["nothing"], job)

    def fail():
        raise MemoryError("no room for the products")
    failed = background.submit(fail)
    failed.exception()
    graph = small_graph.copy()
    graph.mark_pending([name], failed)
    assert name in graph.params and graph.params["bn0_beta"] is not None  # other reads go on
    for _ in range(2):  # the value was never written: every read says so
        with pytest.raises(MemoryError, match="no room"):
            graph.params[name]
    with pytest.raises(MemoryError):
        graph.copy().settle()


def test_wait_all_waits_for_every_job_and_a_forked_child_has_a_thread_of_its_own():
    array = np.zeros(3, F32)
    with _gated_write(array, 2.0) as (job, gate):
        threading.Timer(0.2, gate.set).start()
        background.wait_all()
        assert job.done() and np.all(array == 2.0)
    child = os.fork()
    if child == 0:  # the child: a job must run (the parent's executor has no thread here)
        code = 0
        try:
            code = 0 if background.submit(lambda: 5).result(timeout=20) == 5 else 1
        except BaseException:  # noqa: BLE001 - any failure is the exit status
            code = 1
        os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


NATIVE = pytest.mark.skipif(not native.available(), reason="qgraph's native library is unavailable here (no C++ compiler?)")


def _fold(source, monkeypatch, native_on: bool):
    """The folded parameters, the jobs submitted, and the parameters pending after the pass
    (the background thread is held busy until then, so the fold's job cannot have run)."""
    monkeypatch.setenv("QGRAPH_NATIVE", "1" if native_on else "0")
    submitted = []
    original = background.submit
    monkeypatch.setattr(background, "submit", lambda *a, **k: submitted.append(1) or original(*a, **k))
    graph = qgraph.load(source)
    with _gated_write(np.zeros(1, F32), 1.0):
        folded, _ = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(graph)
        pending = set(folded._pending)
    values = {k: np.array(v) for k, v in folded.params.items()}
    return values, len(submitted), pending


@NATIVE
def test_fold_bn_in_the_background_gives_the_numpy_fold_bit_for_bit(monkeypatch):
    """The shipped ResNet-20: the finite check and the products run on the background thread
    (three jobs with the test's own), the folded weights are pending until the products are
    written, and every folded parameter has numpy's bits."""
    background_fold, jobs, pending = _fold(RESNET20, monkeypatch, native_on=True)
    numpy_fold, numpy_jobs, numpy_pending = _fold(RESNET20, monkeypatch, native_on=False)
    assert (jobs, numpy_jobs) == (3, 1) and numpy_pending == set()
    weights = {n for n in background_fold if n.endswith("_weight") and background_fold[n].ndim == 4}
    assert weights and pending == weights  # every convolution's (the dense layer has no BatchNorm)
    assert background_fold.keys() == numpy_fold.keys()
    for name, value in numpy_fold.items():
        assert value.dtype == background_fold[name].dtype
        assert np.array_equal(value.view(np.uint8), background_fold[name].view(np.uint8)), name


BOTH_PATHS = pytest.mark.parametrize("native_on", [pytest.param(True, marks=NATIVE), False], ids=["background", "numpy"])


@BOTH_PATHS
def test_load_names_the_first_nonfinite_parameter_before_what_the_json_lacks(saved, small, monkeypatch, native_on):
    monkeypatch.setenv("QGRAPH_NATIVE", "1" if native_on else "0")
    assert (native.host() is not None) == native_on
    arrays = mx.nd.load(f"{saved}-0000.params")
    weight = arrays["arg:fc0_weight"].asnumpy()
    weight.ravel()[-1] = np.nan
    arrays["arg:fc0_weight"] = mx.nd.array(weight)
    mx.nd.save(f"{saved}-0000.params", arrays)
    with pytest.raises(GraphError, match=r"model-0000.params: parameter 'fc0_weight' holds 1 NaN or Inf"):
        qgraph.load(saved)
    text = open(f"{saved}-symbol.json").read()
    open(f"{saved}-symbol.json", "w").write(text.replace('"Activation"', '"NoSuchOperator"'))
    with pytest.raises(GraphError, match="'fc0_weight' holds 1 NaN or Inf"):
        qgraph.load(saved)


@BOTH_PATHS
def test_finite_check_names_the_first_bad_parameter_across_dtypes(monkeypatch, native_on):
    monkeypatch.setenv("QGRAPH_NATIVE", "1" if native_on else "0")
    assert (native.host() is not None) == native_on
    bad32, bad64 = np.array([1, np.nan], F32), np.array([np.inf, 1.0])
    for params, first in (({"a": bad64, "b": bad32}, "a"), ({"a": bad32, "b": bad64}, "a"),
                          ({"ok": np.ones(3, F32), "b": bad64[::-1]}, "b"),
                          ({"ok": np.ones((3, 3), F32).T, "c": bad32}, "c")):
        with pytest.raises(GraphError, match=f"parameter '{first}' holds 1 NaN"):
            qgraph.io.check_finite(params, "f.params")
        with pytest.raises(GraphError, match=f"parameter '{first}' holds 1 NaN"):
            qgraph.io.start_finite_check(params, "f.params")()
    qgraph.io.start_finite_check({"w": np.ones(5, F32), "v": np.ones(2)}, "f.params")()
