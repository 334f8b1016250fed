"""Every form of the simulation trains: one gluon.Trainer step through direct, Winograd weight-mode
and Winograd full-mode kernels (F23/F43/F63, channel and tile scales), with fake BN or without,
online or offline thresholds, fixed or learned (LSQ); the loss is finite and the weights move. The
network has 16 channels per layer, where oneDNN used to fail to build the Winograd kernel's
backward pass ("could not create a primitive descriptor for a reorder primitive")."""
import itertools

import mxnet as mx
import numpy as np
import pytest
from helpers import init_params
from mxnet import autograd, gluon

import passes
import qgraph

S = mx.sym
SHAPE = (4, 3, 12, 12)


@pytest.fixture(scope="module")
def graph():
    x = S.var("data")
    for i, (channels, stride) in enumerate(((16, 1), (16, 1), (16, 2), (16, 1))):
        x = S.Convolution(x, num_filter=channels, kernel=(3, 3), stride=(stride, stride), pad=(1, 1),
                          no_bias=True, name=f"conv{i}")
        x = S.relu(S.BatchNorm(x, fix_gamma=False, name=f"bn{i}"))
    out = S.FullyConnected(S.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg"), num_hidden=10, name="fc")
    return qgraph.Graph.from_json(out.tojson(), init_params(out, {"data": SHAPE}, seed=3), input_names=["data"])


KERNELS = [dict()] + [dict(winograd=t, winograd_mode="weight") for t in ("F23", "F43", "F63")] + [
    dict(winograd=t, winograd_mode="full", winograd_scales=s) for t in ("F23", "F43", "F63") for s in ("channel", "tile")]
THRESHOLDS = [dict(online=True), dict(online=False), dict(online=False, learn_thresholds=True)]


@pytest.mark.parametrize("kernel, thresholds, fake_bn", list(itertools.product(KERNELS, THRESHOLDS, (False, True))),
                         ids=lambda v: ",".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else str(v))
def test_one_trainer_step_in_every_form(graph, kernel, thresholds, fake_bn):
    config = qgraph.QuantConfig(weight_bits=4, input_bits=4, quant_type="channel", input_signed="auto",
                                fake_bn=fake_bn, merge_bn=not fake_bn, **kernel, **thresholds)
    net = passes.quantize(graph, config)
    rng = np.random.RandomState(0)
    x, y = mx.nd.array(rng.standard_normal(SHAPE).astype(np.float32)), mx.nd.array(rng.randint(0, 10, SHAPE[0]))
    if not config.online:
        net.calibrate(x.asnumpy(), "naive", progress=False)
    params = net.collect_params()
    trainable = {k: p.data().asnumpy().copy() for k, p in params.items() if p.grad_req != "null"}
    learned = [s.threshold for s in net.input_specs if s.learned]
    assert set(learned) <= set(trainable) and bool(learned) == config.learn_thresholds
    trainer = gluon.Trainer(params, "sgd", {"learning_rate": 0.05, "momentum": 0.9})
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(x), y)
    loss.backward()
    trainer.step(SHAPE[0])
    assert np.isfinite(loss.asnumpy()).all()
    moved = [k for k, v in trainable.items() if not np.array_equal(params[k].data().asnumpy(), v)]
    assert "conv1_weight" in moved and "fc_weight" in moved
    if learned:
        assert set(learned) & set(moved)  # LSQ moved the thresholds
    assert np.isfinite(net(x).asnumpy()).all()  # and the evaluation form runs with the new values


def _fc_net(learned, rounding="half_away"):
    data = S.var("data")
    fc = S.FullyConnected(data, num_hidden=3, no_bias=True, name="fc")
    weight = np.random.RandomState(1).standard_normal((3, 20)).astype(np.float32)
    graph = qgraph.Graph.from_json(fc.tojson(), {"fc_weight": weight}, input_names=["data"])
    config = qgraph.QuantConfig(input_bits=4, online=False, learn_thresholds=learned, exclude_first_conv=False,
                                quantize_input=True, rounding=rounding)
    net = passes.quantize(graph, config)
    net.set_thresholds({"fc": 1.3})
    net.quantize_input(True, online=False)
    net.mode = net.mode.replace(weights=False)
    return net, weight


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_learned_and_fixed_thresholds_give_identical_forward_values(rounding):
    x = mx.nd.array(np.random.RandomState(2).uniform(-1, 2, (8, 20)).astype(np.float32))
    outputs = []
    for learned in (False, True):
        net, _ = _fc_net(learned, rounding)
        with autograd.record():
            outputs.append(net(x).asnumpy())
        outputs.append(net(x).asnumpy())
    np.testing.assert_array_equal(outputs[0], outputs[2])  # training forms
    np.testing.assert_array_equal(outputs[1], outputs[3])  # evaluation forms
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_the_threshold_gradient_is_lsqs():
    """dLoss/dT = g * L * sum(dLoss/dQ * dQ/ds), dQ/ds = round(x/s) - x/s inside the range, L above it,
    0 below (unsigned), g = 1 / sqrt(N * L): LSQ's step-size gradient in the threshold's units."""
    net, weight = _fc_net(True)
    rng = np.random.RandomState(3)
    x = rng.uniform(-0.5, 2.0, (8, 20)).astype(np.float32)
    r = rng.standard_normal((8, 3)).astype(np.float32)
    with autograd.record():
        loss = (net(mx.nd.array(x)) * mx.nd.array(r)).sum()
    loss.backward()
    got = float(net.collect_params()["fc_data_threshold"].grad().asnumpy()[0])
    levels, T = 15, 1.3
    s = np.float32(T) / np.float32(levels)
    v = x.astype(np.float64) / s
    dq_ds = np.where(v >= levels, levels, np.where(v <= 0, 0.0, np.floor(v + 0.5) - v))
    dloss_dq = r.astype(np.float64) @ weight.astype(np.float64)
    g = 1 / np.sqrt(20 * levels)
    np.testing.assert_allclose(got, g * levels * (dloss_dq * dq_ds).sum(), rtol=1e-4)


def test_a_learned_threshold_a_step_takes_below_zero_is_raised_to_the_floor_and_learns_back():
    """An LSQ step that overshoots zero (seen with 2-bit QAT: an 8-bit FC input's threshold at -12)
    left the threshold where the training form's floor passes no gradient, and every evaluation
    form read the negative value. The stored value is raised to the floor instead."""
    from qgraph.quantizer import LEARNED_FLOOR

    net, _ = _fc_net(True)
    param = net.collect_params()["fc_data_threshold"]
    param.set_data(mx.nd.array([-12.0]))
    assert net.thresholds()["fc"] == np.float32(LEARNED_FLOOR)  # what every form reads
    param.set_data(mx.nd.array([-12.0]))
    assert net.parameter_values()["fc_data_threshold"][0] == np.float32(LEARNED_FLOOR)  # what exporters read
    param.set_data(mx.nd.array([-12.0]))
    x = mx.nd.array(np.random.RandomState(5).uniform(0, 2, (8, 20)).astype(np.float32))
    trainer = gluon.Trainer([param], "sgd", {"learning_rate": 0.1})
    with autograd.record():
        loss = -(net(x) ** 2).sum()  # wants a larger threshold: more of x passes
    loss.backward()
    assert float(param.grad().asnumpy()[0]) < 0  # the gradient reaches it at the floor
    trainer.step(1)
    assert float(param.data().asnumpy()[0]) > LEARNED_FLOOR


@pytest.mark.parametrize("tile, scales", [("F23", "channel"), ("F43", "channel"), ("F43", "tile"), ("F63", "tile")])
def test_winograd_full_mode_gradient_is_the_float_gradient_at_16_bits(graph, tile, scales):
    """With 16-bit weights and tiles and thresholds well above the batch's range (so that nothing
    clips: straight-through gradients are zero where a value clips), the gradient through the
    Winograd kernel is the float network's."""
    config = qgraph.QuantConfig(weight_bits=16, input_bits=16, quant_type="channel", input_signed="auto",
                                merge_bn=True, online=False, winograd=tile, winograd_mode="full", winograd_scales=scales)
    net = passes.quantize(graph, config)
    rng = np.random.RandomState(0)
    x, y = mx.nd.array(rng.standard_normal(SHAPE).astype(np.float32)), mx.nd.array(rng.randint(0, 10, SHAPE[0]))
    net.calibrate(x.asnumpy(), "naive", progress=False)
    net.set_thresholds({layer: 4 * t for layer, t in net.thresholds().items()})

    def gradients():
        with autograd.record(train_mode=False):
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(x), y)
        loss.backward()
        return {name: net.collect_params()[name].grad().asnumpy().copy() for name in ("conv1_weight", "conv3_weight")}

    quantized = gradients()
    net.disable_quantize()
    reference = gradients()
    for name, g in quantized.items():
        r = reference[name]
        cosine = float((g * r).sum() / np.linalg.norm(g) / np.linalg.norm(r))
        # 16-bit rounding still flips a few ReLUs of this random net; a wrong transform gives < 0.9
        assert cosine > 0.99, (name, cosine)
