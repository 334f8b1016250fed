"""qgraph.weight_ranges: the least-squared-error range search against a plain numpy loop over the
contract's quantizer, and WeightRanges on the bundled MNIST model with fake BatchNorm at 2 bits:
the simulation's step becomes range / L, the error falls, a training step that leaves the range
is projected back, and the weights it cannot clip are named."""
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import passes
import qgraph
from qgraph.data import mnist_split
from qgraph.weight_ranges import FRACTIONS, WeightRanges, mse_ranges

ROOT = Path(__file__).resolve().parents[2]
MNIST = str(ROOT / "models" / "mnist_cnn-symbol.json")


def _contract(w, t, levels):
    """DESIGN.md's weight quantizer with step t / L, rounding half away from zero."""
    step = t / levels
    scaled = w / step
    return np.clip(np.sign(scaled) * np.floor(np.abs(scaled) + 0.5), -levels, levels) * step


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_range_search_picks_the_least_error_among_its_fractions(bits):
    rng = np.random.default_rng(bits)
    groups = rng.standard_normal((6, 200)) * rng.uniform(0.1, 2, (6, 1))
    levels = 2 ** (bits - 1) - 1
    chosen = mse_ranges(groups, levels, (1,))
    assert chosen.shape == (6, 1)
    for group, t in zip(groups, chosen[:, 0]):
        maximum = np.abs(group).max()
        errors = [((_contract(group, f * maximum, levels) - group) ** 2).sum() for f in FRACTIONS]
        assert ((_contract(group, t, levels) - group) ** 2).sum() <= min(errors) * (1 + 1e-9)
        assert t < maximum  # Gaussian weights: clipping the tails always pays at these widths


def test_a_group_on_its_own_grid_keeps_its_maximum_and_a_zero_group_stays_zero():
    exact = np.array([[-0.5, 0.0, 0.5, 0.5, -0.5, 0.0]])
    assert mse_ranges(exact, 1, (1,))[0, 0] == 0.5
    assert mse_ranges(np.zeros((2, 4)), 1, (1,)).tolist() == [[0.0], [0.0]]
    # per layer: one range over every group
    assert mse_ranges(np.ones((3, 4)), 1, (0, 1)).shape == (1, 1)


def _net(**config):
    config = qgraph.QuantConfig(**{"weight_bits": 2, "input_bits": 4, "quant_type": "channel",
                                   "input_signed": "auto", "fake_bn": True, **config})
    return passes.quantize(qgraph.load(MNIST), config)


def _folded(net, spec, values):
    """The weight the spec quantizes, computed from the stored parameters: W, or W * s with fake BN."""
    graph = net.float_graph
    source = graph.inputs(spec.layer)[spec.slot].node
    if graph.op(source) == "null":
        return values[source]
    fold = graph.inputs(source)[0].node
    weight = graph.inputs(fold)[0].node
    bn_name = [n for n in graph.nodes("BatchNorm") if graph.inputs(n)[0].node == spec.layer][0]
    gamma, _, _, var = (r.node for r in graph.inputs(bn_name)[1:5])
    attrs = graph.attrs(bn_name)
    scale = 1 / np.sqrt(values[var].astype(np.float64) + float(attrs.get("eps", 1e-3)))
    if attrs.get("fix_gamma", "True") in ("False", "0", "false"):
        scale = scale * values[gamma]
    return values[weight] * scale.reshape(-1, *([1] * (values[weight].ndim - 1)))


def test_clipping_makes_the_simulated_step_the_chosen_range_and_lowers_the_error():
    net = _net()
    before = {s.layer: _folded(net, s, net.parameter_values()) for s in net.weight_specs}
    ranges = WeightRanges.choose(net)
    assert ranges.moved > 0
    chosen = ranges.ranges()
    quantized = net.quantized_weights()
    values = net.parameter_values()
    for spec in net.weight_specs:
        original = before[spec.layer].reshape(spec.reshape)
        folded = _folded(net, spec, values).reshape(spec.reshape)
        t = chosen[spec.layer].reshape(-1, 1)
        np.testing.assert_allclose(np.abs(folded).max(axis=1, keepdims=True), t, rtol=1e-5, err_msg=spec.layer)
        # the simulation's 2-bit weight takes the values {-t, 0, t} per channel: its step is t
        codes = quantized[spec.layer].reshape(spec.reshape) / t
        np.testing.assert_allclose(np.abs(codes), np.round(np.abs(codes)), atol=1e-4, err_msg=spec.layer)
        assert np.abs(codes).max() <= 1 + 1e-4
        error_max = ((_contract(original, np.abs(original).max(axis=1, keepdims=True), 1) - original) ** 2).sum()
        error_clipped = ((quantized[spec.layer].reshape(spec.reshape) - original) ** 2).sum()
        assert error_clipped < error_max, spec.layer


def test_a_step_out_of_range_is_projected_back_with_the_starting_statistics():
    """After a training step (which also moves BatchNorm's running statistics) every W * s_0 is
    within its range again, s_0 the fold of the statistics QAT started from."""
    net = _net()
    (x, y), _ = mnist_split()
    net.calibrate(x[:32], "naive", progress=False)
    start = net.parameter_values()
    ranges = WeightRanges.choose(net)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(mx.nd.array(x[:32])), mx.nd.array(y[:32]))
    loss.backward()
    trainer.step(32)

    def excess(values):
        folded = {s.layer: _folded(net, s, {**values, **{k: v for k, v in start.items() if "running" in k
                                                           or "gamma" in k}}).reshape(s.reshape) for s in net.weight_specs}
        return max(float((np.abs(f).max(axis=1) / ranges.ranges()[layer]).max()) for layer, f in folded.items())

    assert excess(net.parameter_values()) > 1.01  # a large step leaves some ranges
    ranges.apply(net)
    assert excess(net.parameter_values()) <= 1 + 1e-5


def test_a_group_whose_range_is_zero_stays_free():
    net = _net(fake_bn=False)
    spec = net.weight_specs[-1]
    weight = net.float_graph.inputs(spec.layer)[spec.slot].node
    values = net.parameter_values()[weight].copy()
    values[0] = 0  # an all-zero output channel
    net.collect_params()[weight].set_data(mx.nd.array(values))
    ranges = WeightRanges.choose(net)
    assert ranges.ranges()[spec.layer][0] == 0
    net.collect_params()[weight].set_data(mx.nd.array(values + 0.01))
    ranges.apply(net)
    np.testing.assert_allclose(net.collect_params()[weight].data().asnumpy()[0], 0.01)


def test_weights_quantized_in_the_winograd_domain_are_refused_by_name():
    net = passes.quantize(qgraph.load(str(ROOT / "models" / "cifar_resnet20_v1-symbol.json")),
                          qgraph.QuantConfig(weight_bits=2, quant_type="channel", winograd="F23"))
    with pytest.raises(qgraph.ConfigError, match="weight ranges: '.*' quantizes its weight in the Winograd domain"):
        WeightRanges.choose(net)
