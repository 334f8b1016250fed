"""equalize: pairs and triplets equalized (ranges checked against numpy), FP32 outputs kept within
1e-4 (tiny graphs and the shipped MobileNet), bias absorption against its formula, skips with
reasons, refusal without BatchNorm merged, idempotence, the QuantConfig and pipeline wiring."""
import mxnet as mx
import numpy as np
import pytest
from helpers import MOBILENET, init_params

import passes
import qgraph
from qgraph import ConfigError, PassManager, QuantConfig
from qgraph.folding import recorded_statistics

S = mx.sym
CONFIG = QuantConfig(merge_bn=True, equalize=True)


def _bn_relu(x, name, act="relu"):
    bn = S.BatchNorm(x, fix_gamma=False, name=f"{name}_bn")
    if act == "leaky":
        return S.LeakyReLU(bn, act_type="leaky", slope=0.1, name=f"{name}_act")
    if act == "relu6":
        return S.clip(bn, a_min=0.0, a_max=6.0, name=f"{name}_act")
    return S.Activation(bn, act_type=act, name=f"{name}_act")


def _pair(act="relu"):
    x = S.Convolution(S.var("data"), num_filter=8, kernel=(3, 3), pad=(1, 1), name="c1")
    x = S.Convolution(_bn_relu(x, "c1", act), num_filter=6, kernel=(1, 1), name="c2")
    return _bn_relu(x, "c2")


def _triplet():
    x = S.Convolution(S.var("data"), num_filter=8, kernel=(1, 1), name="c1")
    x = S.Convolution(_bn_relu(x, "c1"), num_filter=8, kernel=(3, 3), pad=(1, 1), num_group=8, name="dw")
    x = S.Convolution(_bn_relu(x, "dw"), num_filter=6, kernel=(1, 1), name="c2")
    return _bn_relu(x, "c2")


def _graph(symbol, seed=0, **init):
    shapes = {"data": (2, 3, 8, 8)}
    params = init_params(symbol, shapes, seed, channel_spread=(0.05, 4.0), **init)
    graph = qgraph.Graph.from_json(symbol.tojson(), params, input_names=["data"])
    graph.input_shapes = shapes
    return graph


def _run(graph, names="fold_bn,equalize", config=CONFIG):
    return PassManager(passes.build_pipeline(names)).run(graph, config)


def _forward(graph, x):
    return qgraph.to_block(graph)(mx.nd.array(x)).asnumpy().astype(np.float64)


def _relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _weight(graph, layer):
    return graph.params[graph.inputs(layer)[1].node].astype(np.float64)


def _bias(graph, layer):
    return graph.params[graph.inputs(layer)[2].node].astype(np.float64)


X = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)


def test_pair_ranges_become_equal_and_outputs_stay():
    graph = _graph(_pair())
    folded, _ = _run(graph.copy(), "fold_bn")
    equalized, report = _run(graph)
    r1 = np.abs(_weight(equalized, "c1")).reshape(8, -1).max(axis=1)
    r2 = np.abs(_weight(equalized, "c2")).transpose(1, 0, 2, 3).reshape(8, -1).max(axis=1)
    assert np.allclose(r1, r2, rtol=1e-5)
    before = (np.abs(_weight(folded, "c1")).reshape(8, -1).max(axis=1),
              np.abs(_weight(folded, "c2")).transpose(1, 0, 2, 3).reshape(8, -1).max(axis=1))
    assert np.allclose(r1, np.sqrt(before[0] * before[1]), rtol=1e-5)
    assert _relative(_forward(equalized, X), _forward(graph, X)) < 1e-4
    assert any(e.action == "changed" and "c1 -> c2 (pair" in e.reason for e in report.for_pass("equalize"))


def test_triplet_ranges_become_their_cube_root():
    graph = _graph(_triplet())
    folded, _ = _run(graph.copy(), "fold_bn")
    equalized, report = _run(graph)
    ranges = [np.abs(_weight(folded, "c1")).reshape(8, -1).max(axis=1),
              np.abs(_weight(folded, "dw")).reshape(8, -1).max(axis=1),
              np.abs(_weight(folded, "c2")).transpose(1, 0, 2, 3).reshape(8, -1).max(axis=1)]
    target = np.cbrt(ranges[0] * ranges[1] * ranges[2])
    after = [np.abs(_weight(equalized, "c1")).reshape(8, -1).max(axis=1),
             np.abs(_weight(equalized, "dw")).reshape(8, -1).max(axis=1),
             np.abs(_weight(equalized, "c2")).transpose(1, 0, 2, 3).reshape(8, -1).max(axis=1)]
    for got in after:
        assert np.allclose(got, target, rtol=1e-5)
    assert _relative(_forward(equalized, X), _forward(graph, X)) < 1e-4
    assert any("c1 -> dw -> c2 (triplet" in e.reason for e in report.for_pass("equalize"))


def test_leaky_relu_pairs_are_equalized_too():
    graph = _graph(_pair("leaky"))
    equalized, report = _run(graph)
    assert report.modified("equalize")
    assert _relative(_forward(equalized, X), _forward(graph, X)) < 1e-4


def test_shipped_mobilenet_keeps_its_fp32_outputs():
    graph = qgraph.load(MOBILENET)
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    equalized, report = _run(graph.copy())
    assert len([e for e in report.for_pass("equalize") if "triplet" in e.reason]) == 13
    assert _relative(_forward(equalized, images), _forward(graph, images)) < 1e-4


def test_bias_absorption_follows_its_formula():
    # gamma small, beta large and running variance large: each pre-activation stays within
    # beta +- 3 |gamma|, so the shift c = beta - 3 |gamma| is exact on this data
    graph = _graph(_triplet(), seed=3, gamma_range=(0.01, 0.05), var_range=(400.0, 500.0), bias_std=2.0)
    for name in ("c1_bn_beta", "dw_bn_beta"):
        graph.set_param(name, np.abs(graph.params[name]) + 1.0)
    cle_only, _ = _run(graph.copy(), "fold_bn,equalize", QuantConfig(merge_bn=True))  # no statistics: no absorption
    equalized, report = _run(graph.copy())
    assert recorded_statistics(cle_only, "dw") is None  # fold_bn records them only with QuantConfig.equalize
    folded, _ = _run(graph.copy(), "fold_bn")
    s12 = (_weight(cle_only, "c2") / _weight(folded, "c2"))[0, :, 0, 0]  # CLE's scale of dw's output channels
    beta, gamma = graph.params["dw_bn_beta"].astype(np.float64), graph.params["dw_bn_gamma"].astype(np.float64)
    c = np.maximum(0.0, (beta - 3 * np.abs(gamma)) / s12)  # DFQ: c = max(0, beta - 3 |gamma|), after scaling
    assert (c > 0).all()
    assert np.allclose(_bias(equalized, "dw"), _bias(cle_only, "dw") - c, atol=1e-5)
    shift = _weight(cle_only, "c2")[:, :, 0, 0] @ c
    assert np.allclose(_bias(equalized, "c2"), _bias(cle_only, "c2") + shift, atol=1e-4)
    assert any("absorbed bias into c2" in e.reason for e in report.for_pass("equalize"))
    assert any("c1" == e.node and "pads with zeros" in e.reason for e in report.for_pass("equalize"))
    assert _relative(_forward(equalized, X), _forward(graph, X)) < 1e-4


def _residual():
    data = S.var("data")
    x = _bn_relu(S.Convolution(data, num_filter=3, kernel=(1, 1), name="c1"), "c1")
    return S.elemwise_add(S.Convolution(x, num_filter=3, kernel=(1, 1), name="c2"), data, name="add")


def _branches():
    x = _bn_relu(S.Convolution(S.var("data"), num_filter=4, kernel=(1, 1), name="c1"), "c1")
    return S.Concat(*[S.Convolution(x, num_filter=2, kernel=(1, 1), name=f"b{i}") for i in range(2)], dim=1,
                    name="cat")


@pytest.mark.parametrize("build, reason", [
    (lambda: _pair("relu6"), "(ReLU6/clip) is not scale-equivariant"),
    (lambda: _pair("tanh"), "(Activation tanh) is not scale-equivariant"),
    (_residual, "goes to a residual add (add)"),
    (_branches, "read by ['b0', 'b1']"),
])
def test_pairs_that_cannot_be_equalized_are_skipped_with_a_reason(build, reason):
    graph = _graph(build())
    equalized, report = _run(graph)
    skipped = [e.reason for e in report.for_pass("equalize") if e.action == "skipped"]
    assert any(reason in r for r in skipped), skipped
    assert _relative(_forward(equalized, X), _forward(graph, X)) < 1e-4


def test_equalize_refuses_batchnorm_that_is_not_folded():
    with pytest.raises(qgraph.PassError, match="c1_bn.*follows 'c1'.*merge_bn"):
        _run(_graph(_pair()), "equalize")
    with pytest.raises(ConfigError, match="QuantConfig.equalize=True requires merge_bn=True"):
        QuantConfig(equalize=True)


def test_a_second_run_changes_nothing():
    once, _ = _run(_graph(_triplet()))
    twice, _ = PassManager(passes.build_pipeline("equalize")).run(once.copy(), CONFIG)
    for name, value in once.params.items():
        assert np.allclose(twice.params[name], value, rtol=1e-5, atol=1e-7), name


def test_quant_config_puts_equalize_after_fold_bn():
    names = [p.name for p in passes.default_pipeline(CONFIG)]
    assert names[:3] == ["fold_bn", "equalize", "exclude"]
    assert "equalize" not in [p.name for p in passes.default_pipeline(QuantConfig(merge_bn=True))]
    net = passes.quantize(_graph(_pair()), QuantConfig(merge_bn=True, equalize=True, exclude_first_conv=False))
    assert net.report.modified("equalize")
