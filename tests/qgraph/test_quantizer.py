"""Fake-quant subgraphs against an independent numpy implementation of DESIGN.md's
"Quantizer arithmetic".

The reference below is written from the formulas only (never from qgraph's code):

  weights, signed, b bits, per scale group g:  s = max|W_g| / (2^(b-1) - 1),
      Q(W) = clip(round(W / s), -(2^(b-1)-1), 2^(b-1)-1) * s
  inputs, threshold T:  unsigned s = T / (2^b - 1), clip to [0, T];
      signed s = T / (2^(b-1) - 1), clip to [-T, T];   Q(x) = round(clip(x) / s) * s
  round = half away from zero;  a zero scale gives zeros, never NaN.

Every step is float32, as MXNet computes it, so the comparisons are exact: an integer
number of levels (<= 65535) is exactly representable in float32 and IEEE division and
multiplication are correctly rounded, whether MXNet divides by a float32 or a double
scalar (double rounding is innocuous for a single division of float32 operands).
"""
from __future__ import annotations

import dataclasses
import json

import mxnet as mx
import numpy as np
import pytest
from helpers import init_params
from mxnet import autograd

import passes
import qgraph
from qgraph import Graph, PassManager, QuantConfig, TensorRef
from qgraph.quantizer import FakeQuantSpec, add_input_fake_quant, add_weight_fake_quant

F32 = np.float32
SPEC_ATTR = "__qgraph_spec__"   # DESIGN: the exit node of a fake-quant subgraph carries its spec


# ====================================================================== numpy reference
def round_half_away(v: np.ndarray) -> np.ndarray:
    """Round half away from zero (MXNet `round`, ncnn); np.round would round half to even.

    sign(v) * floor(|v| + 0.5), evaluated in float64: for a float32 v the sum is then exact,
    whereas in float32 the largest float below 0.5 (0.49999997) plus 0.5 rounds up to 1.0 and
    would give 1 instead of 0 (the classic floor(x + 0.5) pitfall)."""
    v = np.asarray(v, F32).astype(np.float64)
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(F32)


def _quantize_with_scale(v: np.ndarray, s: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """clip(round(v / s), lo, hi) * s in float32; where s == 0 the result is 0 (no NaN)."""
    v, s = np.asarray(v, F32), np.asarray(s, F32)
    safe = np.where(s > 0, s, F32(1)).astype(F32)
    q = np.clip(round_half_away((v / safe).astype(F32)), F32(lo), F32(hi)).astype(F32) * safe
    return np.where(s > 0, q, F32(0)).astype(F32)


def ref_weight_quant(W: np.ndarray, bits: int, reshape=(1, -1), axes=(1,)) -> np.ndarray:
    """Signed symmetric weight quantization with one scale per slice of W.reshape(reshape)
    over `axes` (DESIGN.md: s = max|W_g| / (2^(b-1)-1))."""
    W = np.asarray(W, F32)
    levels = 2 ** (bits - 1) - 1
    grouped = W.reshape(reshape)
    s = (np.max(np.abs(grouped), axis=tuple(axes), keepdims=True) / F32(levels)).astype(F32)
    return _quantize_with_scale(grouped, s, -levels, levels).reshape(W.shape)


def ref_weight_quant_masks(W: np.ndarray, bits: int, masks) -> np.ndarray:
    """The same arithmetic, each scale group given as an explicit boolean mask over W (a second,
    loop-based formulation that does not rely on any reshape/axes convention)."""
    W = np.asarray(W, F32)
    levels = 2 ** (bits - 1) - 1
    out = np.full(W.shape, np.nan, F32)
    for mask in masks:
        s = F32(np.max(np.abs(W[mask])) / F32(levels))
        out[mask] = _quantize_with_scale(W[mask], s, -levels, levels)
    assert not np.isnan(out).any(), "the masks must cover every weight"
    return out


def ref_input_quant(x: np.ndarray, T, bits: int, signed: bool) -> np.ndarray:
    """Input quantization with threshold T (DESIGN.md): unsigned s = T/(2^b-1), clip [0, T];
    signed s = T/(2^(b-1)-1), clip [-T, T]; then round(clip(x)/s)*s."""
    x, T = np.asarray(x, F32), F32(np.asarray(T, F32).reshape(-1)[0])
    levels = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    s = F32(T / F32(levels))
    clipped = np.clip(x, -T if signed else F32(0), T).astype(F32)
    if s == 0:
        return np.zeros_like(x)
    return (round_half_away((clipped / s).astype(F32)) * s).astype(F32)


def ref_online_threshold(x: np.ndarray, signed: bool, stat: str = "max") -> F32:
    """Online threshold from the batch: its max (max |x| when signed), never below 0;
    'mean_max' is the mean over the batch of the per-sample maxima."""
    source = np.abs(x) if signed else np.asarray(x, F32)
    if stat == "mean_max":
        value = F32(np.mean(source.reshape(len(source), -1).max(axis=1), dtype=F32))
    else:
        value = F32(source.max())
    return max(value, F32(0))


def scale_group_masks(op: str, shape: tuple, num_group: int, quant_type: str) -> list:
    """Which weights share one scale, from DESIGN.md's granularity definitions:
    layer = all; group = one per num_group slice; channel = one per output channel;
    FullyConnected: group and channel both mean per output unit. Convolution weights are
    (C_out, C_in/g, k...); Deconvolution weights are (C_in, C_out/g, k...), so output channel
    j of group i is W[i*C_in/g:(i+1)*C_in/g, j]."""
    def mask(index):
        m = np.zeros(shape, bool)
        m[index] = True
        return m

    if quant_type == "layer":
        return [np.ones(shape, bool)]
    if op == "FullyConnected":
        return [mask(np.s_[o]) for o in range(shape[0])]
    if op == "Convolution":
        per = shape[0] // (num_group if quant_type == "group" else shape[0])
        return [mask(np.s_[i * per:(i + 1) * per]) for i in range(shape[0] // per)]
    assert op == "Deconvolution"
    c_in_g = shape[0] // num_group
    if quant_type == "group":
        return [mask(np.s_[i * c_in_g:(i + 1) * c_in_g]) for i in range(num_group)]
    return [mask(np.s_[i * c_in_g:(i + 1) * c_in_g, j]) for i in range(num_group) for j in range(shape[1])]


# ---------------------------------------------------------------------- self-checks of the reference
def test_reference_rounds_half_away_from_zero():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 126.5], F32)
    assert round_half_away(v).tolist() == [1, 2, 3, -1, -2, -3, 0, 127]
    assert np.round(v).tolist() != round_half_away(v).tolist()  # the distinction the tests rely on
    assert mx.nd.round(mx.nd.array(v)).asnumpy().tolist() == round_half_away(v).tolist()


def test_reference_masks_agree_with_reshape_formulation():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 3, 3, 3)).astype(F32)
    for bits in (2, 4, 8):
        by_channel = ref_weight_quant_masks(W, bits, scale_group_masks("Convolution", W.shape, 1, "channel"))
        assert np.array_equal(by_channel, ref_weight_quant(W, bits, (8, -1), (1,)))
        by_group = ref_weight_quant_masks(W, bits, scale_group_masks("Convolution", W.shape, 2, "group"))
        assert np.array_equal(by_group, ref_weight_quant(W, bits, (2, -1), (1,)))


# ====================================================================== graphs
def _conv(x, **kw):
    return mx.sym.Convolution(x, name="layer", **kw)


LAYERS = {
    # name: (symbol builder, data shape, num_group)
    "conv": (lambda x: _conv(x, num_filter=6, kernel=(3, 3), pad=(1, 1)), (2, 4, 5, 5), 1),
    "grouped_conv": (lambda x: _conv(x, num_filter=6, kernel=(3, 3), num_group=2, no_bias=True), (2, 4, 5, 5), 2),
    "depthwise_conv": (lambda x: _conv(x, num_filter=4, kernel=(3, 3), pad=(1, 1), num_group=4), (2, 4, 5, 5), 4),
    "deconv": (lambda x: mx.sym.Deconvolution(x, num_filter=6, kernel=(2, 2), stride=(2, 2), name="layer"),
               (2, 4, 3, 3), 1),
    "grouped_deconv": (lambda x: mx.sym.Deconvolution(x, num_filter=6, kernel=(3, 3), num_group=2, no_bias=True,
                                                      name="layer"), (2, 4, 3, 3), 2),
    "fc": (lambda x: mx.sym.FullyConnected(x, num_hidden=5, name="layer"), (3, 7), 1),
}


def _params(symbol, data_shape, seed=0, dead_channel=None):
    """Weights ~ N(0, 1) with varied magnitudes per output channel (so per-channel scales
    differ), small biases. `dead_channel`: zero the weights of that output channel."""
    params = init_params(symbol, {"data": data_shape}, seed, weight_std=1.0, channel_spread=(0.2, 3.0))
    if dead_channel is not None:  # Deconvolution weights are (C_in, C_out/g, k...)
        deconv = "Deconvolution" in symbol.tojson()
        params["layer_weight"][(slice(None), dead_channel) if deconv else dead_channel] = 0
    return params


def _graph(kind, seed=0, dead_channel=None):
    build, data_shape, groups = LAYERS[kind]
    symbol = build(mx.sym.var("data"))
    graph = Graph.from_json(symbol.tojson(), _params(symbol, data_shape, seed, dead_channel), input_names=["data"])
    graph.input_shapes = {"data": data_shape}
    return graph, data_shape, groups


def _exit_node(graph, layer, kind):
    """The exit node of the fake-quant subgraph of `kind` ('weight'/'input') feeding `layer`."""
    found = [n for n in graph.nodes() if SPEC_ATTR in graph.attrs(n)
             and json.loads(graph.attrs(n)[SPEC_ATTR])["kind"] == kind
             and json.loads(graph.attrs(n)[SPEC_ATTR])["layer"] == layer]
    assert len(found) == 1, f"expected one {kind} fake-quant exit for {layer}, found {found}"
    return found[0]


def _run_with_taps(graph, x, taps):
    """Forward the graph with the given nodes added as outputs; returns [model out, *taps]."""
    graph = graph.copy()
    graph.set_outputs(list(graph.outputs[:1]) + [TensorRef(t) for t in taps])
    out = qgraph.to_block(graph)(mx.nd.array(x))
    out = out if isinstance(out, (list, tuple)) else [out]
    return [o.asnumpy() for o in out]


def _insert(graph, config):
    rewritten, report = PassManager(passes.default_pipeline(config)).run(graph, config)
    return rewritten, report


def _layer_nd(kind, x, W, b):
    """The layer itself computed by MXNet's own operator, fed the given tensors."""
    build, _, _ = LAYERS[kind]
    node = json.loads(build(mx.sym.var("data")).tojson())["nodes"][-1]
    kwargs = dict(node.get("attrs", {}))
    args = [mx.nd.array(x), mx.nd.array(W)]
    if b is None:
        kwargs["no_bias"] = "True"
    else:
        args.append(mx.nd.array(b))
    return getattr(mx.nd, node["op"])(*args, **kwargs).asnumpy()


def _spec(**fields):
    """A FakeQuantSpec with the given fields (those the installed version knows)."""
    known = {f.name for f in dataclasses.fields(FakeQuantSpec)}
    return FakeQuantSpec(**{k: v for k, v in fields.items() if k in known})


# ====================================================================== weights
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("quant_type", ["layer", "group", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_weight_quantization_matches_numpy(kind, quant_type, bits):
    graph, data_shape, groups = _graph(kind, seed=bits)
    W = graph.params["layer_weight"]
    config = QuantConfig(weight_bits=bits, quant_type=quant_type, quantize_input=False, exclude_first_conv=False)
    rewritten, _ = _insert(graph, config)
    x = np.random.default_rng(1).standard_normal(data_shape).astype(F32)
    out, quantized_w = _run_with_taps(rewritten, x, [_exit_node(rewritten, "layer", "weight")])

    op = graph.op("layer")
    expected_w = ref_weight_quant_masks(W, bits, scale_group_masks(op, W.shape, groups, quant_type))
    np.testing.assert_array_equal(quantized_w, expected_w)
    # at most 2^b - 1 distinct values in each scale group, all of them multiples of its scale
    assert len(np.unique(expected_w)) <= (2 ** bits - 1) * len(scale_group_masks(op, W.shape, groups, quant_type))
    # the layer computes with exactly those weights (the data input is not quantized here)
    bias = graph.params.get("layer_bias")
    np.testing.assert_array_equal(out, _layer_nd(kind, x, expected_w, bias))
    if bits <= 4:  # coarse enough to change the output noticeably: the test can see a no-op
        assert not np.array_equal(out, _layer_nd(kind, x, W, bias))


def test_weight_rounding_is_half_away_from_zero():
    """W / s lands exactly on .5 values: round-half-to-even would give different integers."""
    W = np.array([[127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5]], F32)  # s = 127 / 127 = 1
    symbol = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=1, no_bias=True, name="layer")
    graph = Graph.from_json(symbol.tojson(), {"layer_weight": W}, input_names=["data"])
    config = QuantConfig(weight_bits=8, quantize_input=False)
    rewritten, _ = _insert(graph, config)
    _, quantized = _run_with_taps(rewritten, np.ones((1, 8), F32), [_exit_node(rewritten, "layer", "weight")])
    assert quantized.tolist() == [[127, 1, 2, 3, -1, -3, 4, -127]]


@pytest.mark.parametrize("quant_type", ["layer", "group", "channel"])
def test_direct_weight_fake_quant_with_explicit_grouping(quant_type):
    """add_weight_fake_quant with a hand-written spec computes ref_weight_quant(W, bits, reshape, axes)."""
    graph, data_shape, _ = _graph("grouped_conv", seed=3)
    W = graph.params["layer_weight"]
    reshape = {"layer": (1, -1), "group": (2, -1), "channel": (W.shape[0], -1)}[quant_type]
    spec = _spec(kind="weight", layer="layer", slot=1, bits=4, granularity=quant_type, reshape=reshape,
                 axes=(1,), shape=tuple(W.shape))
    exit_node = add_weight_fake_quant(graph, spec, ste=False)
    _, quantized = _run_with_taps(graph, np.ones(data_shape, F32), [exit_node])
    np.testing.assert_array_equal(quantized, ref_weight_quant(W, 4, reshape, (1,)))


def test_weight_spec_without_shape_is_filled_in_or_rejected():
    graph, data_shape, _ = _graph("conv", seed=3)
    W = graph.params["layer_weight"]
    spec = FakeQuantSpec("weight", "layer", 1, 4)  # the documented fields only: per-layer, 4 bits
    try:
        exit_node = add_weight_fake_quant(graph, spec, ste=False)
    except qgraph.QGraphError as err:  # a clear refusal at insertion time is fine too
        assert "shape" in str(err)
        return
    _, quantized = _run_with_taps(graph, np.ones(data_shape, F32), [exit_node])
    np.testing.assert_array_equal(quantized, ref_weight_quant(W, 4))


@pytest.mark.parametrize("quant_type", ["layer", "channel"])
@pytest.mark.parametrize("kind", ["conv", "depthwise_conv", "deconv", "fc"])
def test_dead_output_channel_quantizes_to_zero_without_nan(kind, quant_type):
    graph, data_shape, groups = _graph(kind, seed=5, dead_channel=1)
    W = graph.params["layer_weight"]
    config = QuantConfig(weight_bits=8, quant_type=quant_type, exclude_first_conv=False, input_signed=True)
    rewritten, _ = _insert(graph, config)
    x = np.random.default_rng(2).standard_normal(data_shape).astype(F32)
    out, quantized = _run_with_taps(rewritten, x, [_exit_node(rewritten, "layer", "weight")])
    assert np.isfinite(out).all() and np.isfinite(quantized).all()
    assert np.all(quantized[:, 1] == 0) if kind == "deconv" else np.all(quantized[1] == 0)
    bias = graph.params.get("layer_bias", np.zeros(out.shape[1], F32))  # Deconvolution: no bias by default
    assert np.all(out[:, 1] == bias[1])  # the dead output channel yields exactly its bias
    expected = ref_weight_quant_masks(W, 8, scale_group_masks(graph.op("layer"), W.shape, groups, quant_type))
    np.testing.assert_array_equal(quantized, expected)


@pytest.mark.parametrize("quant_type", ["layer", "group", "channel"])
def test_all_zero_weights_quantize_to_zero(quant_type):
    graph, data_shape, _ = _graph("grouped_conv", seed=6)
    graph.set_param("layer_weight", np.zeros_like(graph.params["layer_weight"]))
    rewritten, _ = _insert(graph, QuantConfig(quant_type=quant_type, exclude_first_conv=False, input_signed=True))
    out, quantized = _run_with_taps(rewritten, np.ones(data_shape, F32), [_exit_node(rewritten, "layer", "weight")])
    assert np.array_equal(quantized, np.zeros_like(quantized)) and np.array_equal(out, np.zeros_like(out))


# ====================================================================== inputs
def _input_graph(data_shape=(4, 6), online=True, threshold=None, bits=8, signed=False, stat="max"):
    """data -> FullyConnected with an input fake-quant added directly (weights untouched)."""
    symbol = LAYERS["fc"][0](mx.sym.var("data"))
    graph = Graph.from_json(symbol.tojson(), _params(symbol, data_shape), input_names=["data"])
    name = ""
    if not online:
        name = graph.add_variable("layer_data_threshold", np.array([threshold], F32))
    spec = _spec(kind="input", layer="layer", slot=0, bits=bits, signed=signed, online=online, stat=stat,
                 threshold=name)
    return graph, spec


def _quantized_input(graph, spec, x, ste=False):
    graph = graph.copy()
    exit_node, _ = add_input_fake_quant(graph, spec, ste=ste)
    return _run_with_taps(graph, x, [exit_node])


def _activations(rng, shape):
    """Mixed-sign values with a few large ones, on a scale where 2..16-bit steps all matter."""
    x = rng.standard_normal(shape).astype(F32) * F32(2)
    x.flat[3] = F32(7.25)
    x.flat[5] = F32(-9.5)
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("online", [True, False])
def test_input_quantization_matches_numpy(bits, signed, online):
    rng = np.random.default_rng(bits)
    x = _activations(rng, (4, 6))
    T = ref_online_threshold(x, signed) if online else F32(3.3)  # offline: clips the large values
    graph, spec = _input_graph(online=online, threshold=T, bits=bits, signed=signed)
    out, quantized = _quantized_input(graph, spec, x)
    expected = ref_input_quant(x, T, bits, signed)
    np.testing.assert_array_equal(quantized, expected)
    # the top level is levels * s, which float32 may put one ulp above T (e.g. 3 * (3.3 / 3))
    bound = T * F32(1 + 1e-6)
    assert quantized.min() >= (-bound if signed else 0) and quantized.max() <= bound
    np.testing.assert_array_equal(out, _layer_nd("fc", expected, graph.params["layer_weight"],
                                                  graph.params["layer_bias"]))


@pytest.mark.parametrize("signed", [False, True])
def test_input_rounding_is_half_away_from_zero(signed):
    levels = 127 if signed else 255
    x = np.array([[0.5, 1.5, 2.5, 3.5, 100.5, -0.5, -2.5, levels]], F32)  # T = levels: s = 1
    graph, spec = _input_graph(data_shape=x.shape, online=False, threshold=levels, signed=signed)
    _, quantized = _quantized_input(graph, spec, x)
    negatives = [-1, -3] if signed else [0, 0]
    assert quantized.tolist() == [[1, 2, 3, 4, 101, *negatives, levels]]


@pytest.mark.parametrize("signed", [False, True])
def test_mean_max_online_statistic(signed):
    rng = np.random.default_rng(11)
    x = _activations(rng, (4, 6))
    graph, spec = _input_graph(signed=signed, stat="mean_max")
    _, quantized = _quantized_input(graph, spec, x)
    T = ref_online_threshold(x, signed, "mean_max")
    assert T < ref_online_threshold(x, signed)  # it clips the largest samples, unlike 'max'
    np.testing.assert_allclose(quantized, ref_input_quant(x, T, 8, signed), rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("online", [True, False])
def test_all_zero_input_gives_zeros_not_nan(signed, online):
    x = np.zeros((2, 6), F32)
    graph, spec = _input_graph(data_shape=x.shape, online=online, threshold=0.0, signed=signed)
    out, quantized = _quantized_input(graph, spec, x)
    assert np.array_equal(quantized, x)
    np.testing.assert_array_equal(out, np.broadcast_to(graph.params["layer_bias"], out.shape))


def test_all_negative_input_unsigned_online_gives_zeros():
    x = -np.abs(np.random.default_rng(0).standard_normal((2, 6)).astype(F32)) - 0.1
    graph, spec = _input_graph(data_shape=x.shape, signed=False)
    _, quantized = _quantized_input(graph, spec, x)
    assert np.isfinite(quantized).all() and np.array_equal(quantized, np.zeros_like(x))


@pytest.mark.parametrize("kind", ["conv", "grouped_conv", "depthwise_conv", "deconv", "grouped_deconv", "fc"])
@pytest.mark.parametrize("signed", [False, True])
def test_pass_quantizes_input_and_weight_of_every_layer_kind(kind, signed):
    """insert_fake_quant with online thresholds: both quantizers match numpy and the layer output
    equals the layer computed by MXNet on the reference-quantized input and weight."""
    graph, data_shape, groups = _graph(kind, seed=7)
    config = QuantConfig(weight_bits=4, input_bits=4, quant_type="channel", input_signed=signed,
                         exclude_first_conv=False)
    rewritten, _ = _insert(graph, config)
    x = _activations(np.random.default_rng(3), data_shape)
    out, qx, qw = _run_with_taps(rewritten, x, [_exit_node(rewritten, "layer", "input"),
                                                _exit_node(rewritten, "layer", "weight")])
    W = graph.params["layer_weight"]
    expected_x = ref_input_quant(x, ref_online_threshold(x, signed), 4, signed)
    expected_w = ref_weight_quant_masks(W, 4, scale_group_masks(graph.op("layer"), W.shape, groups, "channel"))
    np.testing.assert_array_equal(qx, expected_x)
    np.testing.assert_array_equal(qw, expected_w)
    np.testing.assert_array_equal(out, _layer_nd(kind, expected_x, expected_w, graph.params.get("layer_bias")))


@pytest.mark.parametrize("signed", [False, True])
def test_pass_offline_threshold_parameter(signed):
    graph, data_shape, _ = _graph("conv", seed=8)
    config = QuantConfig(input_bits=3, input_signed=signed, online=False, exclude_first_conv=False)
    rewritten, _ = _insert(graph, config)
    assert rewritten.params["layer_data_threshold"].tolist() == [0.0]  # until calibrated
    x = _activations(np.random.default_rng(4), data_shape)
    taps = [_exit_node(rewritten, "layer", "input")]
    _, uncalibrated = _run_with_taps(rewritten, x, taps)
    assert np.array_equal(uncalibrated, np.zeros_like(x))  # T = 0: zeros, no NaN
    rewritten.set_param("layer_data_threshold", np.array([1.7], F32))
    _, qx = _run_with_taps(rewritten, x, taps)
    np.testing.assert_array_equal(qx, ref_input_quant(x, 1.7, 3, signed))


def test_offline_insert_verifies_with_known_input_shapes():
    graph, _, _ = _graph("conv", seed=8)
    assert graph.input_shapes  # as the CLI (guess_input_shapes) and quantize(input_shape=...) set them
    config = QuantConfig(online=False, exclude_first_conv=False)
    rewritten, _ = _insert(graph, config)
    rewritten.verify()
    assert rewritten.params["layer_data_threshold"].shape == (1,)


# ====================================================================== ste=False vs ste=True
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("online", [True, False])
def test_ste_and_evaluation_forms_give_identical_forward_values(signed, online):
    graph, data_shape, _ = _graph("grouped_conv", seed=9)
    W = graph.params["layer_weight"]
    x = _activations(np.random.default_rng(5), data_shape)
    results = []
    for ste in (False, True):
        g = graph.copy()
        threshold = "" if online else g.add_variable("layer_data_threshold", np.array([2.5], F32))
        w_exit = add_weight_fake_quant(g, _spec(kind="weight", layer="layer", slot=1, bits=3, reshape=(2, -1),
                                                axes=(1,), granularity="group", shape=tuple(W.shape)), ste=ste)
        x_exit, _ = add_input_fake_quant(g, _spec(kind="input", layer="layer", slot=0, bits=3, signed=signed,
                                                  online=online, threshold=threshold), ste=ste)
        results.append(_run_with_taps(g, x, [x_exit, w_exit]))
    for evaluation, training in zip(*results):
        np.testing.assert_array_equal(evaluation, training)
    T = ref_online_threshold(x, signed) if online else 2.5
    np.testing.assert_array_equal(results[1][1], ref_input_quant(x, T, 3, signed))
    np.testing.assert_array_equal(results[1][2], ref_weight_quant(W, 3, (2, -1), (1,)))


# ====================================================================== gradients
def _fc_net(config, x_shape=(4, 6), hidden=3, seed=0):
    symbol = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=hidden, name="fc")
    params = _params(symbol, x_shape, seed)
    graph = Graph.from_json(symbol.tojson(), params, input_names=["data"])
    return passes.quantize(graph, config), params


def _grads(net, x, upstream):
    data = mx.nd.array(x)
    data.attach_grad()
    with autograd.record():
        y = net(data)
    y.backward(mx.nd.array(upstream))
    params = net.collect_params()
    return y.asnumpy(), data.grad.asnumpy(), params["fc_weight"].grad().asnumpy(), params["fc_bias"].grad().asnumpy()


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("online", [False, True])
def test_straight_through_gradients(signed, online):
    """d/dx = 1 inside the clip range, 0 outside (x > T; x < 0 unsigned, x < -T signed);
    d/dW = 1 (straight through round and clip of the weight quantizer)."""
    rng = np.random.default_rng(21)
    x = _activations(rng, (4, 6))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from relu's kink at 0
    config = QuantConfig(weight_bits=4, input_bits=4, input_signed=signed, online=online)
    net, params = _fc_net(config)
    T = ref_online_threshold(x, signed) if online else F32(1.5)
    if not online:
        net.set_thresholds({"fc": float(T)})
    upstream = rng.standard_normal((4, 3)).astype(F32)
    y, dx, dW, db = _grads(net, x, upstream)

    qx = ref_input_quant(x, T, 4, signed)
    qw = ref_weight_quant(params["fc_weight"], 4)
    lower = -T if signed else F32(0)
    inside = (x > lower) & (x < T)
    outside = (x < lower) | (x > T)
    assert inside.sum() >= 5
    if not (online and signed):  # an online signed threshold is max|x|: nothing lies outside
        assert outside.sum() >= 3
    np.testing.assert_allclose(y, qx @ qw.T + params["fc_bias"], rtol=1e-5, atol=1e-5)
    expected_dx = (upstream @ qw) * inside
    np.testing.assert_allclose(dx[inside | outside], expected_dx[inside | outside], rtol=1e-5, atol=1e-6)
    assert np.all(dx[outside] == 0)
    assert np.all(dx[inside] != 0)
    np.testing.assert_allclose(dW, upstream.T @ qx, rtol=1e-5, atol=1e-5)   # gradient 1 w.r.t. W
    np.testing.assert_allclose(db, upstream.sum(axis=0), rtol=1e-5, atol=1e-6)


def test_threshold_gets_no_gradient_and_training_forward_equals_evaluation():
    rng = np.random.default_rng(22)
    x = _activations(rng, (4, 6))
    net, _ = _fc_net(QuantConfig(weight_bits=4, input_bits=4, input_signed=True, online=False))
    net.set_thresholds({"fc": 2.0})
    evaluation = net(mx.nd.array(x)).asnumpy()
    y, *_ = _grads(net, x, np.ones((4, 3), F32))
    np.testing.assert_array_equal(y, evaluation)
    assert net.collect_params()["fc_data_threshold"].grad_req == "null"
