"""fake_bn: the folded-BatchNorm QAT form against an imperative reference built from the formulas
(running-statistics fold, batch-statistics BatchNorm, straight-through weight quantizer),
inference equivalence on the trained model, BN freezing, skips, and the fixed (deployable) export."""
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from helpers import init_params
from mxnet import autograd

import passes
import qgraph
from qgraph import PassContext
from qgraph.tags import FAKE_BN_TAG

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "cifar_resnet20_v1"
EPS = 1e-5


def _conv_bn_symbol(fix_gamma=False, bias=False):
    S = mx.sym
    conv = S.Convolution(S.var("data"), kernel=(3, 3), num_filter=4, pad=(1, 1), no_bias=not bias, name="conv")
    bn = S.BatchNorm(conv, fix_gamma=fix_gamma, eps=EPS, momentum=0.9, name="bn")
    return S.FullyConnected(S.relu(bn), num_hidden=3, name="fc")


def _params(symbol, seed=0):
    return init_params(symbol, {"data": (8, 3, 6, 6)}, seed, weight_std=0.4, bias_std=0.3, mean_std=0.5)


def _graph(**kwargs):
    symbol = _conv_bn_symbol(**kwargs)
    graph = qgraph.Graph.from_json(symbol.tojson(), _params(symbol), input_names=["data"])
    graph.input_shapes = {"data": (8, 3, 6, 6)}
    return graph


def _net(graph, **config):
    config = qgraph.QuantConfig(**{"weight_bits": 4, "quant_type": "channel", "quantize_input": False,
                                   "exclude_first_conv": False, "exclude_ops": ("FullyConnected",),
                                   "fake_bn": True, **config})
    return passes.quantize(graph, config)


def _round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _quantize_per_channel(w, bits):
    levels = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(w).reshape(w.shape[0], -1).max(1) / np.float32(levels), 1e-30).astype(np.float32)
    scale = scale.reshape(-1, 1, 1, 1)
    return (np.clip(_round_half_away(w / scale), -levels, levels) * scale).astype(np.float32)


def _reference_step(params, x, bits=4, fix_gamma=False):
    """Output and gradients of one training forward, written directly from the formulas:
    s = gamma / sqrt(var + eps); W' = Q(W s) / s with Q straight-through; BatchNorm with
    batch statistics; then relu and the float FullyConnected."""
    p = {k: mx.nd.array(v) for k, v in params.items()}
    for name in ("conv_weight", "bn_gamma", "bn_beta", "fc_weight", "fc_bias"):
        p[name].attach_grad()
    with autograd.record():
        gamma = mx.nd.ones_like(p["bn_gamma"]) if fix_gamma else p["bn_gamma"]
        s = (gamma / mx.nd.sqrt(p["bn_moving_var"] + EPS)).reshape((-1, 1, 1, 1))
        folded = p["conv_weight"] * s
        quantized = mx.nd.array(_quantize_per_channel(folded.asnumpy(), bits))
        straight_through = folded + mx.nd.BlockGrad(quantized - folded)
        y = mx.nd.Convolution(mx.nd.array(x), straight_through / s, kernel=(3, 3), num_filter=4, pad=(1, 1),
                              no_bias=True)
        mean = y.mean(axis=(0, 2, 3))
        var = ((y - mean.reshape((1, -1, 1, 1))) ** 2).mean(axis=(0, 2, 3))
        normed = (y - mean.reshape((1, -1, 1, 1))) / mx.nd.sqrt(var.reshape((1, -1, 1, 1)) + EPS)
        z = normed * gamma.reshape((1, -1, 1, 1)) + p["bn_beta"].reshape((1, -1, 1, 1))
        out = mx.nd.FullyConnected(mx.nd.relu(z), p["fc_weight"], p["fc_bias"], num_hidden=3)
        loss = (out * mx.nd.array(np.linspace(-1, 1, out.size).reshape(out.shape))).sum()
    loss.backward()
    grads = {name: p[name].grad.asnumpy() for name in ("conv_weight", "bn_gamma", "bn_beta", "fc_weight")}
    return out.asnumpy(), grads, mean.asnumpy(), var.asnumpy()


def _net_step(net, x):
    with autograd.record():
        out = net(mx.nd.array(x))
        loss = (out * mx.nd.array(np.linspace(-1, 1, out.size).reshape(out.shape))).sum()
    loss.backward()
    params = net.collect_params()
    grads = {name: params[name].grad().asnumpy() for name in ("conv_weight", "bn_gamma", "bn_beta", "fc_weight")}
    return out.asnumpy(), grads


@pytest.mark.parametrize("fix_gamma", [False, True])
def test_training_step_matches_the_formula_reference(fix_gamma):
    graph = _graph(fix_gamma=fix_gamma)
    params = dict(graph.params)
    x = np.random.RandomState(5).normal(0, 1, (8, 3, 6, 6)).astype(np.float32)
    net = _net(graph)
    out, grads = _net_step(net, x)
    ref_out, ref_grads, batch_mean, batch_var = _reference_step(params, x, fix_gamma=fix_gamma)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4)
    for name, ref in ref_grads.items():
        if fix_gamma and name == "bn_gamma":
            continue  # MXNet gives a fixed gamma a zero gradient
        np.testing.assert_allclose(grads[name], ref, rtol=1e-3, atol=1e-4, err_msg=name)
    # running statistics move by EMA towards the (biased) batch statistics, MXNet's momentum 0.9
    stored = net.collect_params()
    np.testing.assert_allclose(stored["bn_moving_mean"].data().asnumpy(),
                               0.9 * params["bn_moving_mean"] + 0.1 * batch_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stored["bn_moving_var"].data().asnumpy(),
                               0.9 * params["bn_moving_var"] + 0.1 * batch_var, rtol=1e-4, atol=1e-5)


def test_gradient_differs_without_quantization():
    """The quantizer really is in the training path: its rounding changes the output."""
    graph = _graph()
    x = np.random.RandomState(6).normal(0, 1, (8, 3, 6, 6)).astype(np.float32)
    quantized, _ = _net_step(_net(graph.copy()), x)
    net = _net(graph.copy())
    net.disable_quantize()
    plain, _ = _net_step(net, x)
    assert np.abs(quantized - plain).max() > 1e-3


@pytest.mark.skipif(not RESNET.with_name(RESNET.name + "-symbol.json").exists(), reason="trained model not shipped")
def test_inference_with_quantization_disabled_reproduces_conv_bn_on_the_trained_model():
    prefix = str(RESNET)
    float_block = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")
    x = np.random.RandomState(0).normal(0, 1, (16, 3, 32, 32)).astype(np.float32)
    expected = float_block(mx.nd.array(x)).asnumpy()
    net = passes.quantize(qgraph.load(f"{prefix}-symbol.json"),
                          qgraph.QuantConfig(weight_bits=4, quant_type="channel", fake_bn=True))
    entries = [e for e in net.report.entries if e.pass_name == "fake_bn"]
    # every convolution but the excluded first one: 19 3x3 and 2 1x1 downsampling, minus the stem
    assert [e.action for e in entries].count("changed") == 20, net.report.format()
    net.disable_quantize()
    got = net(mx.nd.array(x)).asnumpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_frozen_bn_trains_with_running_statistics():
    graph = _graph()
    x = np.random.RandomState(7).normal(0, 1, (8, 3, 6, 6)).astype(np.float32)
    net = _net(graph)
    inference = net(mx.nd.array(x)).asnumpy()
    net.freeze_bn()
    before = net.collect_params()["bn_moving_mean"].data().asnumpy()
    training, _ = _net_step(net, x)
    np.testing.assert_allclose(training, inference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(net.collect_params()["bn_moving_mean"].data().asnumpy(), before)
    net.freeze_bn(False)
    unfrozen, _ = _net_step(net, x)
    assert np.abs(unfrozen - inference).max() > 1e-3


def test_skips_are_reported_with_reasons():
    S = mx.sym
    conv = S.Convolution(S.var("data"), kernel=(1, 1), num_filter=2, no_bias=True, name="shared")
    out = S.Group([S.BatchNorm(conv, name="bn"), S.relu(conv, name="other")])
    symbol = out
    graph = qgraph.Graph.from_json(symbol.tojson(), _params(symbol), input_names=["data"])
    ctx = PassContext()
    passes.get_pass("fake_bn").run(graph, ctx)
    [entry] = [e for e in ctx.report.entries if e.node == "shared"]
    assert entry.action == "skipped" and "also read by" in entry.reason
    assert not any(FAKE_BN_TAG in graph.attrs(n) for n in graph.nx)

    graph = _graph()
    ctx = PassContext(config=qgraph.QuantConfig(exclude_first_conv=True))
    passes.get_pass("exclude").run(graph, ctx)
    passes.get_pass("fake_bn").run(graph, ctx)
    assert [e.reason for e in ctx.report.entries if e.pass_name == "fake_bn"][0].startswith("excluded")


@pytest.mark.parametrize("bias", [False, True])
def test_fixed_graph_folds_bn_and_holds_quantized_weights(bias):
    graph = _graph(bias=bias)
    net = _net(graph, quantize_input=True, input_signed=True, online=False)
    x = np.random.RandomState(8).normal(0, 1, (8, 3, 6, 6)).astype(np.float32)
    net.calibrate(x, "naive", progress=False)
    expected = net(mx.nd.array(x)).asnumpy()
    fixed = passes.fixed_graph(net)
    assert not list(fixed.nodes("BatchNorm"))
    assert not any(FAKE_BN_TAG in fixed.attrs(n) for n in fixed.nx)
    weight = fixed.params[fixed.inputs("conv")[1].node]
    scale = np.abs(weight).reshape(4, -1).max(1) / 7
    integers = weight / scale.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(integers, np.round(integers), atol=1e-4)
    assert np.abs(integers).max() <= 7 + 1e-4
    # and it computes what the QAT graph computes in inference
    got = qgraph.io.to_block(fixed)(mx.nd.array(x)).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the folded weight is Q(W * gamma / sqrt(var + eps)) of the original parameters
    p = graph.params
    s = (p["bn_gamma"] / np.sqrt(p["bn_moving_var"] + np.float32(EPS))).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(weight, _quantize_per_channel((p["conv_weight"] * s).astype(np.float32), 4),
                               rtol=1e-5, atol=1e-6)


def test_fixed_graph_of_a_plain_qat_net_folds_bn_before_quantizing():
    """Without fake BN the deployable graph folds BN into the float weights, then quantizes
    them: the deployment form, which differs from what the plain QAT graph computed."""
    graph = _graph()
    net = _net(graph, fake_bn=False)
    fixed = passes.fixed_graph(net)
    assert not list(fixed.nodes("BatchNorm"))
    p = graph.params
    s = (p["bn_gamma"] / np.sqrt(p["bn_moving_var"] + np.float32(EPS))).reshape(-1, 1, 1, 1)
    weight = fixed.params[fixed.inputs("conv")[1].node]
    np.testing.assert_allclose(weight, _quantize_per_channel((p["conv_weight"] * s).astype(np.float32), 4),
                               rtol=1e-5, atol=1e-6)
    bias = fixed.params[fixed.inputs("conv")[2].node]
    np.testing.assert_allclose(bias, p["bn_beta"] - p["bn_moving_mean"] * s.ravel(), rtol=1e-5, atol=1e-6)
