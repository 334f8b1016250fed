"""qgraph.folding: the rule for which layer -> BatchNorm pairs fold, and the fold arithmetic
against the BatchNorm formula in numpy."""
import mxnet as mx
import numpy as np
import pytest
from helpers import graph_of, init_params, make_model

import passes
import qgraph
from qgraph import folding

S = mx.sym


def _pair(**bn):
    conv = S.Convolution(S.var("data"), num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv")
    return S.BatchNorm(conv, name="bn", **bn)


def _graph(symbol, shape=(2, 3, 5, 5)):
    return graph_of(make_model(symbol, {"data": shape}))


def test_a_plain_pair_folds():
    assert folding.bn_fold_blocker(_graph(_pair()), "conv", "bn") is None


def test_blockers_name_the_reason():
    conv = S.Convolution(S.var("data"), num_filter=4, kernel=(3, 3), name="conv")
    shared = S.Group([S.BatchNorm(conv, name="bn"), S.relu(conv, name="other")])
    assert "also read by ['other']" in folding.bn_fold_blocker(_graph(shared), "conv", "bn")
    stats = S.BatchNorm(S.Convolution(S.var("data"), num_filter=4, kernel=(3, 3), name="conv"), name="bn",
                        output_mean_var=True)
    graph = _graph(S.Group([stats[0], stats[1]]))
    assert "output 1 (batch mean/var) is used" in folding.bn_fold_blocker(graph, "conv", "bn")
    axis = _graph(_pair(axis=2))
    assert "axis 2 is not the channel axis" in folding.bn_fold_blocker(axis, "conv", "bn")


def test_a_fake_bn_layer_folds_back_to_its_folded_weight():
    graph = _graph(_pair(fix_gamma=False))
    net = passes.quantize(graph, qgraph.QuantConfig(fake_bn=True, quantize_input=False, exclude_first_conv=False))
    float_graph = net.current_float_graph()
    folded = folding.fake_bn_fold(float_graph, "conv", "bn")
    assert folded is not None and float_graph.op(folded.node) == "broadcast_mul"
    assert folding.bn_fold_blocker(float_graph, "conv", "bn") is None
    assert folding.fake_bn_fold(graph, "conv", "bn") is None


@pytest.mark.parametrize("fix_gamma", [True, False])
def test_scale_and_shift_match_the_formula(fix_gamma):
    graph = _graph(_pair(fix_gamma=fix_gamma, eps=1e-4))
    scale, shift = folding.bn_scale_shift(graph, "bn")
    p = {k: v.astype(np.float64) for k, v in graph.params.items()}
    gamma = np.ones(4) if fix_gamma else p["bn_gamma"]
    expected = gamma / np.sqrt(p["bn_moving_var"] + 1e-4)
    np.testing.assert_allclose(scale, expected, rtol=1e-12)
    np.testing.assert_allclose(shift, p["bn_beta"] - p["bn_moving_mean"] * expected, rtol=1e-12)


def test_scaled_weight_per_output_channel_for_every_layout():
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 2.0, 6)
    conv = rng.standard_normal((6, 2, 3, 3))
    np.testing.assert_allclose(folding.scaled_weight("Convolution", conv, scale, 1),
                               conv * scale[:, None, None, None])
    deconv = rng.standard_normal((4, 3, 2, 2))  # (C_in, C_out/g, k, k), two groups: output channel g*3 + j
    got = folding.scaled_weight("Deconvolution", deconv, scale, 2)
    for c_in in range(4):
        group = c_in // 2
        for j in range(3):
            np.testing.assert_allclose(got[c_in, j], deconv[c_in, j] * scale[group * 3 + j])


def test_scaled_weight_multiplies_in_the_weight_dtype_by_the_rounded_scale():
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.01, 3.0, 8)
    weight = rng.standard_normal((8, 5, 3, 3)).astype(np.float32)
    got = folding.scaled_weight("Convolution", weight, scale, 1)
    assert got.dtype == np.float32
    assert np.array_equal(got, weight * scale.astype(np.float32)[:, None, None, None])
    exact = weight.astype(np.float64) * scale[:, None, None, None]
    np.testing.assert_allclose(got, exact, rtol=2.5e-7)  # two float32 roundings at most


def test_channel_axis():
    fc = S.FullyConnected(S.var("data"), num_hidden=3, flatten=False, name="fc")
    graph = qgraph.Graph.from_json(fc.tojson(), init_params(fc, {"data": (2, 5)}), input_names=["data"])
    assert folding.channel_axis(graph, "fc") == -1
    assert folding.channel_axis(_graph(_pair()), "conv") == 1
