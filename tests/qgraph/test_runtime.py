"""QuantizedNet: float equivalence when disabled, emission reuse, EMA thresholds, offline mode,
export/load, and the warning for unsigned quantization of negative inputs."""
from __future__ import annotations

import logging
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

import passes
import qgraph
from qgraph import ConfigError, Graph, QuantConfig, QuantizedNet

F32 = np.float32
ROOT = Path(__file__).resolve().parents[2]
MNIST = str(ROOT / "models" / "mnist_cnn-symbol.json")
MNIST_QUANTIZED = {"mnistcnn_conv1_fwd", "mnistcnn_conv2_fwd", "mnistcnn_conv3_fwd", "mnistcnn_dense0_fwd"}


# ---------------------------------------------------------------------- numpy reference (DESIGN.md)
def round_half_away(v):
    v = np.asarray(v, F32).astype(np.float64)  # float64 so 0.49999997 + 0.5 does not round up to 1
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(F32)


def ref_weight_quant(W, bits):
    """Per-layer signed weight quantization: s = max|W| / (2^(b-1)-1)."""
    levels = 2 ** (bits - 1) - 1
    s = F32(np.abs(W).max() / F32(levels))
    return (np.clip(round_half_away((W / s).astype(F32)), -levels, levels) * s).astype(F32)


def ref_input_quant(x, T, bits):
    """Unsigned input quantization: s = T / (2^b - 1), clip to [0, T]."""
    T = F32(T)
    s = F32(T / F32(2 ** bits - 1))
    if s == 0:
        return np.zeros_like(x)
    return (round_half_away((np.clip(x, F32(0), T) / s).astype(F32)) * s).astype(F32)


# ---------------------------------------------------------------------- fixtures
def _images(n, seed):
    """MNIST-shaped inputs, normalised like the training data (mean 0.1307, std 0.3081)."""
    rng = np.random.default_rng(seed)
    return ((rng.uniform(0, 1, (n, 1, 28, 28)) - 0.1307) / 0.3081).astype(F32)


@pytest.fixture(scope="module")
def float_outputs():
    block = qgraph.to_block(qgraph.load(MNIST))
    return {seed: block(mx.nd.array(_images(8, seed))).asnumpy() for seed in (0, 1)}


DEPTHWISE = "mnistcnn_conv1_fwd"


@pytest.fixture
def mnist_net():
    return passes.quantize(MNIST, QuantConfig())


@pytest.fixture
def mnist_net_no_dw():
    """The bundled model with its depthwise conv kept float: switching float -> quantized works
    there (see test_reenable_after_float_forward_with_depthwise_conv for why that matters)."""
    return passes.quantize(MNIST, QuantConfig(exclude=(DEPTHWISE,)))


def _mlp(seed=0):
    """data (4, 6) -> fc1 (8) -> relu -> fc2 (3), explicit numpy weights of order 1."""
    rng = np.random.default_rng(seed)
    S = mx.sym
    symbol = S.FullyConnected(S.relu(S.FullyConnected(S.var("data"), num_hidden=8, name="fc1"), name="r1"),
                              num_hidden=3, name="fc2")
    params = {"fc1_weight": rng.normal(0, 0.6, (8, 6)), "fc1_bias": rng.normal(0, 0.2, 8),
              "fc2_weight": rng.normal(0, 0.5, (3, 8)), "fc2_bias": rng.normal(0, 0.2, 3)}
    params = {k: v.astype(F32) for k, v in params.items()}
    return Graph.from_json(symbol.tojson(), params, input_names=["data"]), params


def _fc(x, W, b):
    return mx.nd.FullyConnected(mx.nd.array(x), mx.nd.array(W), mx.nd.array(b), num_hidden=W.shape[0]).asnumpy()


def _ref_mlp(x, params, T1, T2, bits=8):
    """The quantized MLP computed from reference-quantized tensors with MXNet's own FC kernel."""
    hidden = np.maximum(_fc(ref_input_quant(x, T1, bits), ref_weight_quant(params["fc1_weight"], bits),
                            params["fc1_bias"]), 0)
    out = _fc(ref_input_quant(hidden, T2, bits), ref_weight_quant(params["fc2_weight"], bits), params["fc2_bias"])
    return hidden, out


# ---------------------------------------------------------------------- float equivalence, emissions
def test_disable_quantize_reproduces_the_float_model_exactly(mnist_net, float_outputs):
    x = mx.nd.array(_images(8, 0))
    quantized = mnist_net(x).asnumpy()
    assert not np.array_equal(quantized, float_outputs[0])
    assert np.abs(quantized - float_outputs[0]).max() < 0.2 * np.abs(float_outputs[0]).max()  # still close
    mnist_net.disable_quantize()
    assert np.array_equal(mnist_net(x).asnumpy(), float_outputs[0])
    assert np.array_equal(mnist_net(mx.nd.array(_images(8, 1))).asnumpy(), float_outputs[1])


def test_reenable_gives_back_the_same_quantized_outputs(mnist_net_no_dw, float_outputs):
    net, x = mnist_net_no_dw, mx.nd.array(_images(8, 0))
    quantized = net(x).asnumpy()
    net.disable_quantize()
    assert np.array_equal(net(x).asnumpy(), float_outputs[0])
    net.enable_quantize()
    assert np.array_equal(net(x).asnumpy(), quantized)


def test_reenable_after_float_forward_with_depthwise_conv(mnist_net, float_outputs):
    x = mx.nd.array(_images(8, 0))
    quantized = mnist_net(x).asnumpy()
    mnist_net.disable_quantize()
    assert np.array_equal(mnist_net(x).asnumpy(), float_outputs[0])
    mnist_net.enable_quantize()
    assert np.array_equal(mnist_net(x).asnumpy(), quantized)


def test_switching_modes_reuses_built_emissions(mnist_net_no_dw):
    net, x = mnist_net_no_dw, mx.nd.array(_images(4, 0))
    quantized = net(x).asnumpy()
    net(x)
    net.disable_quantize()
    floating = net(x).asnumpy()
    net.enable_quantize()
    net(x)
    built = net.cached_forms()
    assert len(built) == 3  # the first batch with the sign probe, then quantized and float, each built once
    for _ in range(3):
        net.disable_quantize()
        assert np.array_equal(net(x).asnumpy(), floating)
        net.enable_quantize()
        assert np.array_equal(net(x).asnumpy(), quantized)
    assert net.cached_forms() == built


def test_weights_only_and_inputs_only_modes_differ_from_both(mnist_net, float_outputs):
    x = mx.nd.array(_images(8, 0))
    full = mnist_net(x).asnumpy()
    mnist_net.quantize_input(False)
    weights_only = mnist_net(x).asnumpy()
    assert not np.array_equal(weights_only, full) and not np.array_equal(weights_only, float_outputs[0])
    mnist_net.quantize_input(True)
    assert np.array_equal(mnist_net(x).asnumpy(), full)


# ---------------------------------------------------------------------- thresholds
def test_thresholds_are_keyed_by_layer_name(mnist_net):
    assert set(mnist_net.thresholds()) == MNIST_QUANTIZED
    assert set(mnist_net.thresholds().values()) == {0.0}


def test_update_ema_starts_from_the_batch_max_then_averages():
    graph, params = _mlp()
    net = passes.quantize(graph, QuantConfig())
    assert set(net.thresholds()) == {"fc1", "fc2"}
    rng = np.random.default_rng(5)
    x1, x2 = (rng.normal(0, 1.5, (4, 6)).astype(F32) for _ in range(2))
    x2[0, 0] = 9.0  # a larger batch max, so the average visibly moves

    with pytest.raises(ConfigError, match="online forward"):
        net.update_ema()
    out1 = net(mx.nd.array(x1)).asnumpy()
    net.update_ema()
    T1 = {"fc1": F32(x1.max()), "fc2": None}
    hidden, expected = _ref_mlp(x1, params, T1["fc1"], 0)
    T1["fc2"] = F32(hidden.max())  # the batch max of fc2's input, from the quantized fc1
    _, expected = _ref_mlp(x1, params, T1["fc1"], T1["fc2"])
    np.testing.assert_array_equal(out1, expected)
    assert net.thresholds() == {k: float(v) for k, v in T1.items()}  # first update: no decay toward 0

    net(mx.nd.array(x2))
    net.update_ema(momentum=0.8)
    hidden2, _ = _ref_mlp(x2, params, F32(x2.max()), 0)
    batch2 = {"fc1": F32(x2.max()), "fc2": F32(hidden2.max())}
    for layer, value in net.thresholds().items():
        np.testing.assert_allclose(value, 0.8 * T1[layer] + 0.2 * batch2[layer], rtol=1e-6)
        assert T1[layer] != batch2[layer]


def test_offline_mode_needs_thresholds_then_matches_numpy():
    graph, params = _mlp(seed=1)
    net = passes.quantize(graph, QuantConfig())
    with pytest.raises(ConfigError, match="thresholds"):
        net.quantize_input(online=False)
    rng = np.random.default_rng(6)
    for _ in range(3):
        net(mx.nd.array(rng.normal(0, 1.0, (4, 6)).astype(F32)))
        net.update_ema()
    net.quantize_input(online=False)
    stored = net.thresholds()
    x = rng.normal(0, 2.0, (4, 6)).astype(F32)  # wider than calibration: the stored thresholds clip
    out = net(mx.nd.array(x)).asnumpy()
    _, expected = _ref_mlp(x, params, stored["fc1"], stored["fc2"])
    np.testing.assert_array_equal(out, expected)
    assert net.thresholds() == stored  # an offline forward does not touch them


def test_set_thresholds_validates_layer_names():
    graph, _ = _mlp()
    net = passes.quantize(graph, QuantConfig())
    with pytest.raises(ConfigError, match="no_such_layer"):
        net.set_thresholds({"no_such_layer": 1.0})
    net.set_thresholds({"fc1": 2.0, "fc2": 3.0})
    net.quantize_input(online=False)  # every threshold is set now
    assert net.thresholds() == {"fc1": 2.0, "fc2": 3.0}


def test_offline_quantize_with_known_input_shape(float_outputs):
    """quantize(input_shape=...) verifies parameter shapes after each pass, offline thresholds included."""
    net = passes.quantize(MNIST, QuantConfig(online=False), input_shape=(1, 1, 28, 28))
    net.set_thresholds({layer: 4.0 for layer in MNIST_QUANTIZED})
    out = net(mx.nd.array(_images(8, 0))).asnumpy()
    assert np.isfinite(out).all() and not np.array_equal(out, float_outputs[0])


# ---------------------------------------------------------------------- export / load
def test_export_and_load_give_identical_outputs(mnist_net, tmp_path):
    for seed in (0, 1, 2):
        mnist_net(mx.nd.array(_images(8, seed)))
        mnist_net.update_ema()
    mnist_net.quantize_input(online=False)
    x = mx.nd.array(_images(8, 3))
    expected = mnist_net(x).asnumpy()
    symbol_path, params_path = mnist_net.export(tmp_path / "q")

    loaded = QuantizedNet.load(tmp_path / "q")
    assert loaded.thresholds() == mnist_net.thresholds()
    assert np.array_equal(loaded(x).asnumpy(), expected)
    plain = mx.gluon.SymbolBlock.imports(str(symbol_path), ["data"], str(params_path))
    assert np.array_equal(plain(x).asnumpy(), expected)
    loaded.disable_quantize()
    mnist_net.disable_quantize()
    assert np.array_equal(loaded(x).asnumpy(), mnist_net(x).asnumpy())


# ---------------------------------------------------------------------- negative inputs, unsigned
def _conv_conv(config):
    S = mx.sym
    symbol = S.Convolution(S.Convolution(S.var("data"), num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv_a"),
                           num_filter=2, kernel=(1, 1), name="conv_b")
    rng = np.random.default_rng(0)
    params = {"conv_a_weight": rng.normal(0, 0.4, (4, 3, 3, 3)), "conv_a_bias": rng.normal(0, 0.1, 4),
              "conv_b_weight": rng.normal(0, 0.5, (2, 4, 1, 1)), "conv_b_bias": rng.normal(0, 0.1, 2)}
    graph = Graph.from_json(symbol.tojson(), {k: v.astype(F32) for k, v in params.items()}, input_names=["data"])
    return passes.quantize(graph, config)


def _negative_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "negative" in r.getMessage()]


def test_unsigned_quantization_of_negative_inputs_warns_once(caplog):
    caplog.set_level(logging.WARNING)
    net = _conv_conv(QuantConfig(input_signed=False, exclude_first_conv=False))
    x = mx.nd.array(np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(F32))
    for _ in range(3):
        net(x)
    warnings = _negative_warnings(caplog)
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "conv_a" in message and "conv_b" in message


def test_only_layers_with_negative_inputs_are_named(caplog):
    caplog.set_level(logging.WARNING)
    net = _conv_conv(QuantConfig(input_signed=False, exclude_first_conv=False))
    x = mx.nd.array(np.random.default_rng(1).uniform(0, 1, (2, 3, 5, 5)).astype(F32))  # data >= 0
    net(x)
    warnings = _negative_warnings(caplog)
    assert len(warnings) == 1 and "conv_b" in warnings[0].getMessage()
    assert "conv_a" not in warnings[0].getMessage()


@pytest.mark.parametrize("signed", [True, "auto"])
def test_no_warning_when_inputs_are_signed(caplog, signed):
    caplog.set_level(logging.WARNING)
    net = _conv_conv(QuantConfig(input_signed=signed, exclude_first_conv=False))
    net(mx.nd.array(np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(F32)))
    assert _negative_warnings(caplog) == []


def test_evaluation_reads_fixed_weights_that_follow_every_change_of_the_parameters(mnist_net_no_dw):
    """The evaluation form quantizes weights once; a Trainer step, set_data or re-initialisation
    must still be seen."""
    net, x = mnist_net_no_dw, mx.nd.array(_images(8, 0))

    def in_graph_weights():
        graph = net.emission(net.mode.replace(online=True)).graph  # weights quantized inside the graph
        values = net.parameter_values()
        graph.set_params({k: v for k, v in values.items() if k in graph.params})
        return qgraph.to_block(graph)(x)[0].asnumpy() if len(graph.outputs) > 1 else qgraph.to_block(graph)(x).asnumpy()

    np.testing.assert_array_equal(net(x).asnumpy(), in_graph_weights())
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
    with mx.autograd.record():
        loss = net(x).sum()
    loss.backward()
    trainer.step(1)
    np.testing.assert_array_equal(net(x).asnumpy(), in_graph_weights())
    weight = next(p for n, p in net.collect_params().items() if n.endswith("conv2_weight"))
    weight.set_data(weight.data() * -1)
    np.testing.assert_array_equal(net(x).asnumpy(), in_graph_weights())
    weight.initialize(mx.init.Uniform(0.3), force_reinit=True)  # new arrays, not new values in old ones
    np.testing.assert_array_equal(net(x).asnumpy(), in_graph_weights())
