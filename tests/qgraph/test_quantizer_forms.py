"""Every form of the input quantizer gives the contract's integers, ties included, for both
roundings, as qgraph's fused operators and as MXNet operator chains (the `input_form` fixture):
the evaluation form on oneDNN's reorders (baked threshold, known shape), the
evaluation form with batch (online) thresholds, the parameter-threshold form and the training
(straight-through) form, at 2, 4, 8 and 16 bits, signed and unsigned, on a tensor in oneDNN's
layout (the output of a convolution) as the quantizer meets it in a model.

The numpy reference is the contract of DESIGN.md: s = float32(T) / float32(L), v = float32(x / s)
clipped to [lo, L], rounded in float64 (half away from zero, or half to even), times s in float32."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import passes
import qgraph
from qgraph.emit import Mode, emit

F32 = np.float32
SHAPE = (4, 3, 6, 8)


def reference(x, T, bits, signed, rounding):
    levels = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    s = F32(T) / F32(levels)
    v = (x / np.maximum(s, F32(1e-30))).astype(F32)
    v = np.minimum(np.maximum(v, F32(-levels if signed else 0)), F32(levels)).astype(np.float64)
    r = np.floor(np.abs(v) + 0.5) * np.sign(v) if rounding == "half_away" else np.rint(v)
    return (r.astype(F32) * s).astype(F32)


def tie_heavy(T, bits, signed, seed=0):
    """Values at and around every rounding tie of the step (float32 neighbours), beyond the
    clip range, zeros and random values, shaped as the layer's input."""
    levels = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    s = F32(T) / F32(levels)
    rng = np.random.default_rng(seed)
    k = rng.integers(-levels if signed else 0, levels, 200).astype(np.float64)
    ties = ((k + 0.5) * s).astype(F32)
    near = np.concatenate([np.nextafter(ties, F32(np.inf)), np.nextafter(ties, F32(-np.inf)), ties])
    values = np.concatenate([near, -near, rng.uniform(-1.5 * T, 1.5 * T, 200).astype(F32), [0, T, -T, 2 * T]])
    size = int(np.prod(SHAPE))
    return np.resize(values.astype(F32), size).reshape(SHAPE)


def _net(bits, signed, rounding, online):
    data = mx.sym.var("data")
    identity = mx.sym.Convolution(data, num_filter=3, num_group=3, kernel=(1, 1), no_bias=True, name="pre")
    layer = mx.sym.Convolution(identity, num_filter=2, kernel=(1, 1), no_bias=True, name="layer")
    params = {"pre_weight": np.ones((3, 1, 1, 1), F32), "layer_weight": np.full((2, 3, 1, 1), 0.5, F32)}
    graph = qgraph.Graph.from_json(layer.tojson(), params, input_names=["data"])
    config = qgraph.QuantConfig(input_bits=bits, input_signed=signed, rounding=rounding, online=online,
                                exclude=("pre",), exclude_first_conv=False)
    return passes.quantize(graph, config)


def _run(net, mode, x, thresholds=None, input_shapes=None, training=False, expect_op=None):
    emission = emit(net.current_float_graph(), net.weight_specs, net.input_specs, mode, thresholds, input_shapes)
    graph = emission.graph
    if expect_op is not None:
        op, expected = expect_op
        assert (op in [graph.op(n) for n in graph.nodes()]) is expected
    exit_node = graph.inputs("layer")[0].node
    graph.set_outputs(["pre", exit_node]).cleanup()
    block = qgraph.to_block(graph)
    if training:
        with autograd.record():
            outputs = block(mx.nd.array(x))
    else:
        outputs = block(mx.nd.array(x))
    pre, quantized = (o.asnumpy() for o in outputs)
    np.testing.assert_array_equal(pre, x)  # the conv in front is exact: the quantizer saw x
    return quantized


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_offline_forms_give_the_contract(bits, signed, rounding, input_form):
    T = 3.7
    net = _net(bits, signed, rounding, online=False)
    net.set_thresholds({"layer": T})
    x = tie_heavy(T, bits, signed)
    expected = reference(x, T, bits, signed, rounding)
    thresholds = {"layer": T}
    fused = input_form == "fused"
    forms = {
        "reorder evaluation": dict(mode=Mode(weights=False), thresholds=thresholds, input_shapes={"data": SHAPE},
                                   expect_op=("qgraph_fake_quant", True) if fused else
                                   ("_contrib_quantize_v2", bits <= 8)),
        "scalar evaluation": dict(mode=Mode(weights=False), thresholds=thresholds,
                                  expect_op=("qgraph_fake_quant", fused)),
        "parameter threshold": dict(mode=Mode(weights=False)),
        "training": dict(mode=Mode(weights=False, training=True), thresholds=thresholds, training=True,
                         expect_op=("qgraph_fake_quant", fused)),
        "training, parameter": dict(mode=Mode(weights=False, training=True), training=True),
    }
    for name, form in forms.items():
        got = _run(net, x=x, **form)
        mismatch = np.flatnonzero(got.ravel() != expected.ravel())
        assert mismatch.size == 0, f"{name}: {mismatch.size} values differ, e.g. x={x.ravel()[mismatch[:3]]}"


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_online_forms_give_the_contract_with_the_batch_threshold(bits, signed, rounding, input_form):
    net = _net(bits, signed, rounding, online=True)
    x = tie_heavy(2.5, bits, signed, seed=1)
    T = float(np.abs(x).max() if signed else max(x.max(), 0))
    expected = reference(x, T, bits, signed, rounding)
    fused = ("qgraph_fake_quant_online", input_form == "fused")
    for mode, shapes, training, expect_op in ((Mode(weights=False, online=True), {"data": SHAPE}, False, fused),
                                              (Mode(weights=False, online=True), None, False, None),
                                              (Mode(weights=False, online=True, training=True), None, True, None)):
        got = _run(net, mode, x, input_shapes=shapes, training=training, expect_op=expect_op)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("signed", [False, True])
def test_ties_round_as_configured(signed, input_form):
    """At exact ties the two roundings differ: 2.5 steps -> 3 (half away) or 2 (half even)."""
    T = 127.0 if signed else 255.0  # step 1: x is v itself
    x = np.resize(np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5], F32), int(np.prod(SHAPE))).reshape(SHAPE)
    away, even = (_run(_net(8, signed, r, online=False), Mode(weights=False), x, {"layer": T}, {"data": SHAPE})
                  for r in ("half_away", "half_even"))
    first = slice(0, 7)
    if signed:
        assert away.ravel()[first].tolist() == [1, 2, 3, 4, -1, -2, -3]
        assert even.ravel()[first].tolist() == [0, 2, 2, 4, -0.0, -2, -2]
    else:
        assert away.ravel()[first].tolist() == [1, 2, 3, 4, 0, 0, 0]
        assert even.ravel()[first].tolist() == [0, 2, 2, 4, 0, 0, 0]


def test_a_zero_threshold_gives_zeros_in_every_form(input_form):
    net = _net(8, False, "half_away", online=False)
    x = tie_heavy(1.0, 8, False)
    for shapes in ({"data": SHAPE}, None):
        assert not _run(net, Mode(weights=False), x, {"layer": 0.0}, shapes).any()
