"""QuantConfig.quantize_bias: every form of the simulation (evaluation on fixed weights and
reorders, parameter thresholds, online thresholds, training) feeds each layer the int32 bias of
the numpy reference, ties and saturation included, for both roundings and every weight
granularity; the training form passes the bias gradient straight through; passes.fixed_graph
stores the same values as constants; an exported net reloads with its bias quantizers.

The numpy reference: s_x = float32(T) / float32(L), s_w = max(max|W_g| / 127, 1e-30) per weight
group (repeated over the group's output channels), s_b = max(float32(s_w * s_x), 1e-30),
v = float32(b / s_b) clipped to the largest float32 <= 2^31 - 1, rounded in float64 (half away
from zero or half to even), times s_b in float32."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import passes
import qgraph
from qgraph.emit import Mode, emit
from qgraph.io import evaluate

F32 = np.float32
LAYERS = {"dense": 1, "grouped": 2, "depthwise": 6, "fc": 1}
INT32_LIMIT = 2147483520.0  # the largest float32 below 2^31


def _symbol():
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=6, kernel=(3, 3), pad=(1, 1), name="dense")
    x = mx.sym.Convolution(mx.sym.relu(x), num_filter=6, kernel=(1, 1), num_group=2, name="grouped")
    x = mx.sym.Convolution(x, num_filter=6, kernel=(3, 3), pad=(1, 1), num_group=6, name="depthwise")
    return mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=5, name="fc")


def _params(seed, exact_steps):
    """Weights whose every output channel holds +-127/16 (so s_w = 1/16 exactly) or random ones;
    biases at rounding ties of the step 1/128 (large ones too), beyond int32, and random."""
    rng = np.random.default_rng(seed)
    shapes = {"dense": (6, 4, 3, 3), "grouped": (6, 3, 1, 1), "depthwise": (6, 1, 3, 3), "fc": (5, 6 * 5 * 5)}
    params = {}
    for layer, shape in shapes.items():
        weight = rng.uniform(-1, 1, shape).astype(F32)
        if exact_steps:
            weight = weight * F32(7.0)
            flat = weight.reshape(shape[0], -1)
            flat[:, 0] = np.where(rng.random(shape[0]) < 0.5, F32(-7.9375), F32(7.9375))
        params[f"{layer}_weight"] = weight
        ties = (rng.integers(-300, 300, shape[0]) + 0.5) / 128.0
        ties[:3] = [5000000.5 / 128, -5000001.5 / 128, 3.0e9 / 128]  # past 2^22 (float32 steps of 0.5), past int32
        params[f"{layer}_bias"] = (ties if exact_steps else rng.normal(0, 0.5, shape[0])).astype(F32)
    return params


def _net(quant_type, rounding, online=False, signed=True, seed=0, exact_steps=True, quantize_bias=True):
    graph = qgraph.Graph.from_json(_symbol().tojson(), _params(seed, exact_steps), input_names=["data"])
    config = qgraph.QuantConfig(quant_type=quant_type, rounding=rounding, online=online, input_signed=signed,
                                exclude_first_conv=False, quantize_bias=quantize_bias)
    return passes.quantize(graph, config)


def reference_bias(weight, bias, threshold, levels, granularity, groups, rounding):
    channels = bias.shape[0]
    slices = {"layer": 1, "group": groups, "channel": channels}[granularity]
    absmax = np.abs(weight.astype(F32).reshape(slices, -1)).max(axis=1)
    s_w = np.repeat(np.maximum(absmax / F32(127), F32(1e-30)), channels // slices)
    s_x = F32(threshold) / F32(levels)
    s_b = np.maximum((s_w * s_x).astype(F32), F32(1e-30))
    v = np.clip((bias / s_b).astype(F32), F32(-INT32_LIMIT), F32(INT32_LIMIT)).astype(np.float64)
    rounded = np.rint(v) if rounding == "half_even" else np.sign(v) * np.floor(np.abs(v) + 0.5)
    return (rounded.astype(F32) * s_b).astype(F32)


def _expected(net, thresholds, rounding, granularity):
    params = net.current_float_graph().params
    levels = {s.layer: s.levels for s in net.input_specs}
    groups = {"fc": 5}
    return {layer: reference_bias(params[f"{layer}_weight"], params[f"{layer}_bias"], thresholds[layer],
                                  levels[layer], granularity, groups.get(layer, LAYERS[layer]), rounding)
            for layer in LAYERS}


def _biases(net, mode, x, thresholds=None, input_shapes=None, fixed=False):
    """The bias each layer reads in the emission of `mode`, computed by MXNet."""
    emission = emit(net.current_float_graph(), net.weight_specs, net.input_specs, mode, thresholds, input_shapes,
                    fixed_weights={s.id: f"{s.layer}_weight_quantized" for s in net.weight_specs} if fixed else None)
    graph = emission.graph
    refs = [graph.inputs(layer)[2] for layer in LAYERS]
    if not mode.online:
        return dict(zip(LAYERS, evaluate(graph, refs)))
    graph.set_outputs(refs).cleanup()
    block = qgraph.to_block(graph)
    if mode.training:
        with autograd.record():
            outputs = block(mx.nd.array(x))
    else:
        outputs = block(mx.nd.array(x))
    return {layer: out.asnumpy() for layer, out in zip(LAYERS, outputs)}


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
@pytest.mark.parametrize("quant_type", ["layer", "group", "channel"])
def test_offline_forms_feed_the_reference_bias(quant_type, rounding):
    net = _net(quant_type, rounding)
    thresholds = {"dense": 15.875, "grouped": 15.875, "depthwise": 15.875, "fc": 15.875}  # s_x = 1/8
    net.set_thresholds(thresholds)
    net.quantize_input(True, online=False)
    expected = _expected(net, thresholds, rounding, quant_type)
    x = np.random.default_rng(1).standard_normal((2, 4, 5, 5)).astype(F32)
    forms = {
        "evaluation, fixed weights, reorders": dict(mode=Mode(), thresholds=thresholds,
                                                    input_shapes={"data": (1, 4, 5, 5)}, fixed=True),
        "evaluation, parameter thresholds": dict(mode=Mode()),
        "training, baked thresholds": dict(mode=Mode(training=True), thresholds=thresholds),
        "training, parameter thresholds": dict(mode=Mode(training=True)),
    }
    for name, form in forms.items():
        got = _biases(net, x=x, **form)
        for layer in LAYERS:
            np.testing.assert_array_equal(got[layer], expected[layer], err_msg=f"{name}: {layer}")
    ties = expected["dense"][:3] * 128
    assert ties[2] == INT32_LIMIT  # saturated
    assert ties[0] == (5000000 if rounding == "half_even" else 5000001)
    assert ties[1] == -5000002


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_random_steps_and_unsigned_inputs(rounding):
    net = _net("channel", rounding, signed="auto", seed=3, exact_steps=False)
    thresholds = {"dense": 2.3, "grouped": 1.7, "depthwise": 0.9, "fc": 3.1}
    net.set_thresholds(thresholds)
    expected = _expected(net, thresholds, rounding, "channel")
    assert [s.signed for s in net.input_specs] == [True, False, True, True]
    for mode in (Mode(), Mode(training=True)):
        got = _biases(net, mode, None, thresholds)
        for layer in LAYERS:
            np.testing.assert_array_equal(got[layer], expected[layer], err_msg=layer)


@pytest.mark.parametrize("training", [False, True])
def test_online_forms_use_the_batch_step(training):
    net = _net("channel", "half_even", online=True, seed=4, exact_steps=False)
    x = np.random.default_rng(2).standard_normal((3, 4, 5, 5)).astype(F32)
    float_graph = net.current_float_graph()
    inputs = {layer: float_graph.inputs(layer)[0] for layer in LAYERS}
    # the batch threshold of each layer: max |x| of its float input (every earlier layer quantized)
    emission = emit(float_graph, net.weight_specs, net.input_specs, Mode(online=True))
    stats = dict(zip(emission.stat_layers, qgraph.to_block(emission.graph)(mx.nd.array(x))[1:]))
    thresholds = {layer: float(stats[layer].asnumpy()[0]) for layer in inputs}
    expected = _expected(net, thresholds, "half_even", "channel")
    got = _biases(net, Mode(online=True, training=training), x, input_shapes=None if training else {"data": x.shape})
    for layer in LAYERS:
        np.testing.assert_array_equal(got[layer], expected[layer], err_msg=layer)


def test_training_form_passes_the_bias_gradient_straight_through():
    net = _net("channel", "half_even", seed=5, exact_steps=False)
    net.set_thresholds({"dense": 2.0, "grouped": 2.0, "depthwise": 2.0, "fc": 2.0})
    x = mx.nd.array(np.random.default_rng(3).standard_normal((2, 4, 5, 5)).astype(F32))
    with autograd.record():
        loss = net(x).sum()
    loss.backward()
    np.testing.assert_array_equal(net.collect_params()["fc_bias"].grad().asnumpy(), np.full(5, 2, F32))
    assert np.abs(net.collect_params()["dense_bias"].grad().asnumpy()).sum() > 0


def test_net_outputs_and_fixed_graph_hold_the_integer_bias(tmp_path):
    net = _net("channel", "half_even", seed=6, exact_steps=False)
    thresholds = {"dense": 2.5, "grouped": 1.5, "depthwise": 1.25, "fc": 3.0}
    net.set_thresholds(thresholds)
    net.quantize_input(True, online=False)
    expected = _expected(net, thresholds, "half_even", "channel")
    x = mx.nd.array(np.random.default_rng(4).standard_normal((2, 4, 5, 5)).astype(F32))
    simulated = net(x).asnumpy()
    fixed = passes.fixed_graph(net)
    for layer in LAYERS:
        np.testing.assert_array_equal(fixed.params[f"{layer}_bias_fixed"], expected[layer])
    np.testing.assert_allclose(qgraph.to_block(fixed)(x).asnumpy(), simulated, rtol=1e-5, atol=1e-5)
    # the integer bias moves outputs: the float-bias simulation differs
    plain = _net("channel", "half_even", seed=6, exact_steps=False, quantize_bias=False)
    plain.set_thresholds(thresholds)
    assert np.abs(plain(x).asnumpy() - simulated).max() > 1e-4
    net.export(tmp_path / "m")
    again = qgraph.QuantizedNet.load(tmp_path / "m")
    assert [s.bias_bits for s in again.weight_specs] == [32] * 4
    np.testing.assert_array_equal(again(x).asnumpy(), simulated)


def test_pass_report_and_layers_without_bias():
    data = mx.sym.var("data")
    out = mx.sym.FullyConnected(mx.sym.Convolution(data, num_filter=2, kernel=(1, 1), no_bias=True, name="c"),
                                num_hidden=3, name="f")
    params = {"c_weight": np.ones((2, 1, 1, 1), F32), "f_weight": np.ones((3, 8), F32), "f_bias": np.ones(3, F32)}
    graph = qgraph.Graph.from_json(out.tojson(), params, input_names=["data"])
    net = passes.quantize(graph, qgraph.QuantConfig(exclude_first_conv=False, quantize_bias=True),
                          input_shape=(1, 1, 2, 2))
    changes = {e.node: e.reason for e in net.report.for_pass("insert_fake_quant")}
    assert "bias int32" in changes["f"] and "bias" not in changes["c"]
    assert net(mx.nd.ones((1, 1, 2, 2))).shape == (1, 3)


@pytest.mark.parametrize("changes,blocker", [(dict(quantize_input=False), "quantize_input"),
                                             (dict(winograd="F23"), "winograd"), (dict(fake_bn=True), "fake_bn"),
                                             (dict(quantize_bias=1), "must be True or False")])
def test_config_refuses_what_has_no_integer_bias(changes, blocker):
    with pytest.raises(qgraph.ConfigError, match=f"quantize_bias.*{blocker}"):
        qgraph.QuantConfig(**dict(dict(quantize_bias=True), **changes))
