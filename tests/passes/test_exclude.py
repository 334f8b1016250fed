"""exclude: which layers stay float (first conv, names, regexes, op types, last FC), the report,
idempotence, and a pattern that matches nothing is an error."""
from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest

import passes
from passes.exclude import Exclude
from qgraph import ConfigError, Graph, PassContext, PassError, PassManager, QuantConfig

S = mx.sym
EXCLUDE_ATTR = "__qgraph_exclude__"
SPEC_ATTR = "__qgraph_spec__"


def _symbol():
    """stage1_conv0 -> stage1_conv1 -> stage2_conv0 -> branch(1)_conv -> dense0 -> dense1."""
    x = S.var("data")
    for name in ("stage1_conv0", "stage1_conv1", "stage2_conv0", "branch(1)_conv"):
        x = S.Activation(S.Convolution(x, num_filter=4, kernel=(3, 3), pad=(1, 1), name=name),
                         act_type="relu", name=f"{name}_relu")
    x = S.FullyConnected(x, num_hidden=6, name="dense0")
    return S.FullyConnected(S.relu(x, name="dense0_relu"), num_hidden=3, name="dense1")


CONVS = ("stage1_conv0", "stage1_conv1", "stage2_conv0", "branch(1)_conv")
LAYERS = CONVS + ("dense0", "dense1")


@pytest.fixture
def graph():
    symbol = _symbol()
    shapes = {"data": (2, 3, 5, 5)}
    arg_shapes, _, _ = symbol.infer_shape(**shapes)
    rng = np.random.default_rng(0)
    params = {n: rng.normal(0, 0.3, s).astype(np.float32)
              for n, s in zip(symbol.list_arguments(), arg_shapes) if n != "data"}
    g = Graph.from_json(symbol.tojson(), params, input_names=["data"])
    g.input_shapes = shapes
    return g


def _excluded(graph):
    return {n: graph.attrs(n)[EXCLUDE_ATTR] for n in graph.nodes() if EXCLUDE_ATTR in graph.attrs(n)}


def _quantized_layers(graph):
    return {json.loads(graph.attrs(n)[SPEC_ATTR])["layer"] for n in graph.nodes() if SPEC_ATTR in graph.attrs(n)}


def _pipeline(graph, config):
    return PassManager(passes.default_pipeline(config)).run(graph, config)


def _check_quantized(graph, config, expected_float):
    rewritten, report = _pipeline(graph, config)
    assert set(_excluded(rewritten)) == set(expected_float)
    assert _quantized_layers(rewritten) == set(LAYERS) - set(expected_float)
    skipped = {e.node for e in report.for_pass("insert_fake_quant") if e.action == "skipped"}
    assert skipped == set(expected_float)
    return rewritten, report


def test_first_conv_excluded_by_default(graph):
    rewritten, report = _check_quantized(graph, QuantConfig(), {"stage1_conv0"})
    assert _excluded(rewritten) == {"stage1_conv0": "first convolution"}
    entries = report.for_pass("exclude")
    assert [(e.node, e.action, e.reason) for e in entries] == [
        ("stage1_conv0", "changed", "kept in float: first convolution")]


def test_nothing_excluded_when_first_conv_exclusion_off(graph):
    _check_quantized(graph, QuantConfig(exclude_first_conv=False), set())


def test_exclude_by_exact_name(graph):
    _check_quantized(graph, QuantConfig(exclude=("stage2_conv0",)), {"stage1_conv0", "stage2_conv0"})


def test_exact_name_wins_over_its_regex_reading(graph):
    """'branch(1)_conv' as a regex would match 'branch1_conv', not itself: exact names come first."""
    rewritten, _ = _check_quantized(graph, QuantConfig(exclude=("branch(1)_conv",), exclude_first_conv=False),
                                    {"branch(1)_conv"})
    assert _excluded(rewritten)["branch(1)_conv"] == "matches 'branch(1)_conv'"


def test_exclude_by_regex_full_match(graph):
    _check_quantized(graph, QuantConfig(exclude=(r"stage\d_conv0",), exclude_first_conv=False),
                     {"stage1_conv0", "stage2_conv0"})
    _check_quantized(graph, QuantConfig(exclude=(r"stage1_conv\d", "dense1"), exclude_first_conv=False),
                     {"stage1_conv0", "stage1_conv1", "dense1"})


def test_regex_must_match_the_whole_name(graph):
    with pytest.raises(PassError, match="conv1"):
        _pipeline(graph, QuantConfig(exclude=("conv1",)))  # only a substring of stage1_conv1


def test_exclude_by_op_type(graph):
    rewritten, _ = _check_quantized(graph, QuantConfig(exclude_ops=("FullyConnected",)),
                                    {"stage1_conv0", "dense0", "dense1"})
    assert _excluded(rewritten)["dense0"] == "op type FullyConnected"
    _check_quantized(graph, QuantConfig(exclude_ops=("Convolution",)), set(CONVS))


def test_exclude_last_fc(graph):
    rewritten, _ = _check_quantized(graph, QuantConfig(exclude_last_fc=True), {"stage1_conv0", "dense1"})
    assert _excluded(rewritten)["dense1"] == "last FullyConnected"


def test_excluding_a_non_quantizable_node_is_harmless(graph):
    rewritten, _ = _pipeline(graph, QuantConfig(exclude=("dense0_relu",), exclude_first_conv=False))
    assert _excluded(rewritten) == {"dense0_relu": "matches 'dense0_relu'"}
    assert _quantized_layers(rewritten) == set(LAYERS)


@pytest.mark.parametrize("pattern", ["no_such_layer", r"stage9_.*", "conv"])
def test_pattern_matching_nothing_is_a_config_error(graph, pattern):
    with pytest.raises(ConfigError, match="matches no node") as info:
        Exclude().run(graph.copy(), PassContext(config=QuantConfig(exclude=(pattern,))))
    assert repr(pattern) in str(info.value)
    # through the PassManager it is reported as a failed pass, caused by that ConfigError
    with pytest.raises(PassError, match="exclude") as info:
        _pipeline(graph, QuantConfig(exclude=("stage1_conv1", pattern)))
    assert isinstance(info.value.__cause__, ConfigError)


def test_exclude_is_idempotent(graph):
    config = QuantConfig(exclude=("dense1",), exclude_ops=("Deconvolution",))
    once, report = PassManager([Exclude()]).run(graph, config)
    assert len(report.for_pass("exclude")) == 2
    twice, report = PassManager([Exclude()]).run(once, config)
    assert report.for_pass("exclude") == [] and _excluded(twice) == _excluded(once)
    assert twice.to_json() == once.to_json()


def test_exclude_marks_survive_save_and_load(graph, tmp_path):
    import qgraph

    marked, _ = PassManager([Exclude()]).run(graph, QuantConfig(exclude=("dense1",)))
    qgraph.save(marked, tmp_path / "marked")
    reloaded = qgraph.load(str(tmp_path / "marked"))
    assert _excluded(reloaded) == {"stage1_conv0": "first convolution", "dense1": "matches 'dense1'"}
