"""Post-training recovery (qgraph.recovery) against independent numpy references: AdaRound's
im2col rows against MXNet's convolution, its learned integers in every form (evaluation,
training, export and reload, fixed_graph, the ncnn writer), determinism and lower layer error;
bias correction against a numpy forward pass; `best` calibration against a brute-force numpy
search; and the errors bad input gives."""
from __future__ import annotations

import importlib

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import passes
import qgraph
from qgraph import ConfigError, DataError, QuantConfig, QuantizedNet

adaround_module = importlib.import_module("qgraph.recovery.adaround")
F32 = np.float32
S = mx.sym


# ---------------------------------------------------------------------- numpy reference (DESIGN.md)
def round_half_away(v):
    v = np.asarray(v, F32).astype(np.float64)
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(F32)


def ref_weight_scale(w, bits):
    """Per output channel: s = max|W_o| / (2^(b-1) - 1), float32."""
    return (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / F32(2 ** (bits - 1) - 1)).astype(F32)


def ref_weight_quant(w, bits, offsets=None):
    """clip(round(W / s)) * s, or with learned offsets R: clip(floor(W / s) + R) * s."""
    levels = 2 ** (bits - 1) - 1
    s = ref_weight_scale(w, bits).reshape((-1,) + (1,) * (w.ndim - 1))
    v = (w / s).astype(F32)
    integers = round_half_away(v) if offsets is None else np.floor(v) + offsets
    return (np.clip(integers, -levels, levels) * s).astype(F32)


def ref_input_quant(x, threshold, bits, signed):
    levels = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    s = F32(F32(threshold) / F32(levels))
    low = -F32(threshold) if signed else F32(0)
    return (round_half_away((np.clip(x, low, F32(threshold)) / s).astype(F32)) * s).astype(F32)


# ---------------------------------------------------------------------- tiny models
def _mlp_graph(seed=0, second_bias=True):
    """data (N, 16) -> fc1 (8) -> relu -> fc2 (4)."""
    rng = np.random.default_rng(seed)
    hidden = S.relu(S.FullyConnected(S.var("data"), num_hidden=8, name="fc1"), name="r1")
    symbol = S.FullyConnected(hidden, num_hidden=4, no_bias=not second_bias, name="fc2")
    params = {"fc1_weight": rng.normal(0, 0.4, (8, 16)), "fc1_bias": rng.normal(0, 0.3, 8),
              "fc2_weight": rng.normal(0, 0.5, (4, 8))}
    if second_bias:
        params["fc2_bias"] = rng.normal(0, 0.2, 4)
    return qgraph.Graph.from_json(symbol.tojson(), {k: v.astype(F32) for k, v in params.items()},
                                  input_names=["data"])


def _conv_graph(seed=0, bn=False):
    """data (N, 3, 8, 8) -> conv 3x3 (8) -> relu -> conv 3x3 stride 2 (6) -> relu -> dw 3x3 -> fc (5)."""
    rng = np.random.default_rng(seed)
    x = S.Convolution(S.var("data"), num_filter=8, kernel=(3, 3), pad=(1, 1), name="c1")
    if bn:
        x = S.BatchNorm(x, name="bn1")
    x = S.relu(x, name="r1")
    x = S.relu(S.Convolution(x, num_filter=6, kernel=(3, 3), stride=(2, 2), pad=(1, 1), name="c2"), name="r2")
    x = S.relu(S.Convolution(x, num_filter=6, kernel=(3, 3), pad=(1, 1), num_group=6, name="dw"), name="r3")
    symbol = S.FullyConnected(x, num_hidden=5, name="fc")
    shapes = dict(zip(symbol.list_arguments(), symbol.infer_shape(data=(1, 3, 8, 8))[0]))
    shapes.update(zip(symbol.list_auxiliary_states(), symbol.infer_shape(data=(1, 3, 8, 8))[2]))
    params = {}
    for name, shape in shapes.items():
        if name == "data":
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.4 / np.sqrt(fan_in) if name.endswith("weight") else 0.1
        params[name] = rng.normal(0, scale, shape).astype(F32)
        if name.endswith("var") or name.endswith("gamma"):
            params[name] = np.abs(params[name]) + 1
    return qgraph.Graph.from_json(symbol.tojson(), params, input_names=["data"])


def _images(n, seed=1, shape=(3, 8, 8)):
    return np.random.default_rng(seed).standard_normal((n,) + shape).astype(F32)


def _conv_net(bits=3, **config):
    config = dict(dict(weight_bits=bits, input_bits=8, quant_type="channel", input_signed="auto", online=False,
                       exclude_first_conv=False), **config)
    net = passes.quantize(_conv_graph(bn=config.get("merge_bn", False)), QuantConfig(**config))
    net.calibrate(_images(64), "naive", calib_epoch=1, progress=False)
    return net


# ---------------------------------------------------------------------- AdaRound's linear algebra
@pytest.mark.parametrize("attrs", [
    dict(kernel=(3, 3), pad=(1, 1)),
    dict(kernel=(3, 3), stride=(2, 2), pad=(1, 1)),
    dict(kernel=(3, 2), dilate=(2, 1), pad=(2, 0)),
    dict(kernel=(3, 3), pad=(1, 1), num_group=2),
    dict(kernel=(3, 3), pad=(1, 1), num_group=4),
    dict(kernel=(1, 1)),
])
def test_im2col_rows_times_the_weight_are_the_convolution(attrs):
    rng = np.random.default_rng(0)
    groups = attrs.get("num_group", 1)
    out = 4 if groups == 4 else 6
    x, w = rng.standard_normal((2, 4, 7, 7)).astype(F32), rng.standard_normal((out, 4 // groups) + attrs["kernel"])
    symbol = S.Convolution(S.var("data"), num_filter=out, no_bias=True, name="c", **attrs)
    graph = qgraph.Graph.from_json(symbol.tojson(), {"c_weight": w.astype(F32)}, input_names=["data"])
    geometry = adaround_module._Geometry.of(graph, "c")
    expected = mx.nd.Convolution(mx.nd.array(x), mx.nd.array(w), no_bias=True, num_filter=out, **attrs).asnumpy()
    rows = geometry.columns(x)
    product = np.matmul(rows, w.reshape(groups, out // groups, -1).transpose(0, 2, 1))
    assert np.allclose(product, geometry.outputs(expected), atol=1e-4)


def test_fully_connected_rows_are_the_flattened_input():
    symbol = S.FullyConnected(S.var("data"), num_hidden=3, name="fc")
    graph = qgraph.Graph.from_json(symbol.tojson(), {"fc_weight": np.ones((3, 8), F32), "fc_bias": np.zeros(3, F32)},
                                   input_names=["data"])
    x = _images(2, shape=(2, 2, 2))
    assert np.array_equal(adaround_module._Geometry.of(graph, "fc").columns(x)[0], x.reshape(2, 8))


# ---------------------------------------------------------------------- AdaRound
def test_adaround_lowers_every_layer_error_and_is_deterministic():
    first, second = _conv_net(), _conv_net()
    fits = first.adaround(_images(64, 2), iterations=150, progress=False)
    again = second.adaround(_images(64, 2), iterations=150, progress=False)
    assert list(fits) == ["c1", "c2", "dw", "fc"]
    for layer, fit in fits.items():
        assert fit.loss <= fit.loss_nearest * (1 + 1e-6), layer
        assert fit == again[layer]
    assert any(fit.flipped > 0 for fit in fits.values())
    for name in ("c1_weight_rounding", "fc_weight_rounding"):
        offsets = first.collect_params()[name].data().asnumpy()
        assert set(np.unique(offsets)) <= {0.0, 1.0}
        assert np.array_equal(offsets, second.collect_params()[name].data().asnumpy())


def test_learned_integers_are_used_by_every_form(tmp_path):
    net = _conv_net()
    net.adaround(_images(64, 2), iterations=100, progress=False)
    params = {n: p.data().asnumpy() for n, p in net.collect_params().items()}
    quantized = net.quantized_weights()
    changed = 0
    for layer in ("c1", "c2", "dw", "fc"):
        reference = ref_weight_quant(params[f"{layer}_weight"], 3, params[f"{layer}_weight_rounding"])
        assert np.array_equal(quantized[layer], reference), layer
        changed += not np.array_equal(reference, ref_weight_quant(params[f"{layer}_weight"], 3))
    assert changed
    x = mx.nd.array(_images(8, 5))
    evaluation = net(x).asnumpy()
    with autograd.record():
        training = net(x).asnumpy()
    assert np.allclose(training, evaluation, rtol=1e-5, atol=1e-6)
    net.export(tmp_path / "ada")
    reloaded = QuantizedNet.load(tmp_path / "ada")
    assert all(s.offsets for s in reloaded.weight_specs)
    assert np.array_equal(reloaded(x).asnumpy(), evaluation)
    fixed = passes.fixed_graph(net)
    for layer in ("c1", "c2", "dw", "fc"):
        assert np.array_equal(fixed.params[f"{layer}_weight_fixed"], quantized[layer]), layer
    assert np.allclose(qgraph.to_block(fixed)(x).asnumpy(), evaluation, rtol=1e-5, atol=1e-6)


def test_the_ncnn_writer_takes_the_learned_integers():
    from qgraph.deploy import ncnn as deploy

    net = _conv_net(bits=8, input_signed=True, merge_bn=True)
    net.adaround(_images(64, 2), iterations=100, progress=False)
    export = deploy.export_int8(net, (1, 3, 8, 8))
    layers = {layer.name: layer for layer in export.int8.layers}
    params = {n: p.data().asnumpy() for n, p in net.collect_params().items()}
    for layer in ("c1", "c2", "dw", "fc"):
        weight, offsets = params[f"{layer}_weight"], params[f"{layer}_weight_rounding"]
        s = ref_weight_scale(weight, 8).reshape((-1,) + (1,) * (weight.ndim - 1))
        learned = np.clip(np.floor((weight / s).astype(F32)) + offsets, -127, 127).astype(np.int8)
        written = layers[layer].arrays[0][1]
        assert written.dtype == np.int8 and np.array_equal(written, learned.reshape(-1)), layer
    nearest = {n: deploy.quantize_int8(params[f"{n}_weight"].reshape(len(params[f"{n}_weight"]), -1),
                                       1 / ref_weight_scale(params[f"{n}_weight"], 8)[:, None]).reshape(-1)
               for n in ("c1", "c2", "dw", "fc")}
    assert any(not np.array_equal(layers[n].arrays[0][1], nearest[n]) for n in nearest)  # not ncnn2int8's rounding


def test_adaround_refuses_what_it_cannot_fit():
    unquantized = passes.quantize(_conv_graph(), QuantConfig(exclude_ops=("Convolution", "FullyConnected"),
                                                             quantize_input=False))
    with pytest.raises(ConfigError, match="adaround: the net's weights are not quantized"):
        unquantized.adaround(_images(8))
    net = _conv_net()
    net.disable_quantize()
    with pytest.raises(ConfigError, match="weight quantization is switched off"):
        net.adaround(_images(8))
    with pytest.raises(ConfigError, match="'c1' is followed by BatchNorm 'bn1'.*merge_bn"):
        passes.quantize(_conv_graph(bn=True), QuantConfig(exclude_first_conv=False)).adaround(_images(8))
    fresh = passes.quantize(_conv_graph(), QuantConfig(online=False, exclude_first_conv=False))
    with pytest.raises(ConfigError, match="calibrate the net first"):
        fresh.adaround(_images(8))
    with pytest.raises(ConfigError, match="iterations=0"):
        _conv_net().adaround(_images(8), iterations=0)
    with pytest.raises(ConfigError, match="rounding offsets for 'c1' must be 0 or 1"):
        net.set_weight_rounding("c1", np.full((8, 3, 3, 3), 2.0))


@pytest.mark.parametrize("method", ["adaround", "correct_bias", "calibrate"])
def test_empty_calibration_data_is_refused_naming_the_method(method):
    net = _conv_net()
    empty = np.zeros((0, 3, 8, 8), F32)
    call = {"adaround": lambda: net.adaround(empty), "correct_bias": lambda: net.correct_bias(empty),
            "calibrate": lambda: net.calibrate(empty, "best")}[method]
    prefix = "" if method == "calibrate" else f"{method}: "
    with pytest.raises(DataError, match=f"{prefix}the calibration set is empty"):
        call()


# ---------------------------------------------------------------------- bias correction
def test_bias_correction_matches_a_numpy_forward_pass(tmp_path):
    graph = _mlp_graph(second_bias=False)
    net = passes.quantize(graph, QuantConfig(weight_bits=3, quant_type="channel", input_bits=6, online=False,
                                             input_signed=True, exclude_first_conv=False))
    x = np.random.default_rng(3).standard_normal((96, 16)).astype(F32)
    net.calibrate(x, "naive", calib_epoch=1, progress=False)
    thresholds, p = net.thresholds(), graph.params
    corrections = net.correct_bias(x, batch_size=32, progress=False)
    # layer 1: float and quantized outputs on the same input
    float1 = x @ p["fc1_weight"].T + p["fc1_bias"]
    quant1 = ref_input_quant(x, thresholds["fc1"], 6, True) @ ref_weight_quant(p["fc1_weight"], 3).T + p["fc1_bias"]
    assert np.allclose(corrections["fc1"], float1.mean(0) - quant1.mean(0), atol=1e-5)
    # layer 2 sees layer 1 quantized and corrected; fc2 had no bias and gets one
    hidden = np.maximum(quant1 + corrections["fc1"], 0)
    float2 = np.maximum(float1, 0) @ p["fc2_weight"].T
    quant2 = ref_input_quant(hidden, thresholds["fc2"], 6, True) @ ref_weight_quant(p["fc2_weight"], 3).T
    assert np.allclose(corrections["fc2"], float2.mean(0) - quant2.mean(0), atol=1e-5)
    assert np.allclose(net.layer_bias("fc2"), corrections["fc2"])
    assert np.allclose(net(mx.nd.array(x)).asnumpy().mean(0), float2.mean(0), atol=1e-4)
    net.export(tmp_path / "corrected")
    reloaded = QuantizedNet.load(tmp_path / "corrected")
    assert np.allclose(reloaded.layer_bias("fc2"), corrections["fc2"])
    assert np.allclose(passes.fixed_graph(net).params["fc2_bias"], corrections["fc2"])


def test_bias_correction_needs_a_quantized_calibrated_net():
    net = passes.quantize(_mlp_graph(), QuantConfig(online=False, exclude_first_conv=False))
    with pytest.raises(ConfigError, match="correct_bias: every input threshold is 0"):
        net.correct_bias(np.ones((4, 16), F32))
    net.disable_quantize()
    with pytest.raises(ConfigError, match="correct_bias: the net quantizes neither weights nor inputs"):
        net.correct_bias(np.ones((4, 16), F32))


# ---------------------------------------------------------------------- best calibration
def test_best_picks_the_candidate_with_the_least_layer_output_error():
    graph = _mlp_graph()
    config = QuantConfig(weight_bits=4, quant_type="channel", input_bits=3, online=False, input_signed=True,
                         exclude_first_conv=False)
    x = np.random.default_rng(4).standard_normal((128, 16)).astype(F32) ** 3  # heavy tails: methods disagree
    candidates = {}
    for method in ("naive", "entropy", "percentile", "mse"):
        net = passes.quantize(graph, config)
        net.calibrate(x, method, calib_epoch=2, progress=False)
        candidates[method] = net.thresholds()
    best = passes.quantize(graph, config)
    chosen = best.calibrate(x, "best", calib_epoch=2, progress=False)
    p = graph.params
    inputs = {"fc1": x, "fc2": np.maximum(x @ p["fc1_weight"].T + p["fc1_bias"], 0)}
    assert len({round(c["fc1"], 4) for c in candidates.values()}) > 1
    for layer, data in inputs.items():
        weight, bias = p[f"{layer}_weight"], p[f"{layer}_bias"]
        exact = data @ weight.T + bias
        errors = {m: float(np.square(ref_input_quant(data, c[layer], 3, True) @ ref_weight_quant(weight, 4).T + bias
                                     - exact).sum()) for m, c in candidates.items()}
        winner = min(errors, key=errors.get)
        assert chosen[layer]["threshold"] == pytest.approx(candidates[winner][layer], rel=1e-6), (layer, errors)
        assert chosen[layer]["method"] == f"best ({winner})" or errors[chosen[layer]["method"][6:-1]] == pytest.approx(
            errors[winner], rel=1e-6)
