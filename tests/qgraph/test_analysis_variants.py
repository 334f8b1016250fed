"""qgraph.analysis.variants: every configuration computes what a QuantizedNet built for it
computes (bit for bit), weights switch without new blocks, a short last batch is topped up
without changing the result, and the SQNR measures agree with their definitions."""
import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN

import passes
from qgraph import ConfigError, DataError, QuantConfig
from qgraph.analysis.variants import Variants, check_images, sqnr_db
from qgraph.data import mnist_split

IMAGES = mnist_split()[1][0][::10].copy()  # 100 held-out digits


def _net(online=False, **fields):
    net = passes.quantize(MNIST_CNN, QuantConfig(quant_type="channel", input_signed="auto", online=online, **fields))
    if not online:
        net.calibrate(IMAGES[:40], "naive", calib_epoch=1, progress=False)
    return net


def _run(block, images):
    return np.concatenate([block(mx.nd.array(images[i:i + 50])).asnumpy() for i in range(0, len(images), 50)])


@pytest.mark.parametrize("online", [False, True])
def test_every_layer_quantized_is_the_net_and_nothing_quantized_is_float(online):
    net = _net(online)
    variants = Variants(net, IMAGES, batch_size=50)
    weights, inputs = list(variants.weight_specs.values()), list(variants.input_specs.values())
    np.testing.assert_array_equal(variants.logits(weights, inputs), _run(net, IMAGES))
    net.disable_quantize()
    np.testing.assert_array_equal(variants.logits(), _run(net, IMAGES))


@pytest.mark.parametrize("online", [False, True])
def test_a_short_last_batch_is_topped_up_with_its_own_images(online):
    """100 = 3 x 32 + 4: the last 4 run in a batch of 32 (oneDNN may round differently at
    another batch size, but an online threshold, the batch maximum, is the same)."""
    net = _net(online)
    short = Variants(net, IMAGES, batch_size=32)
    weights, inputs = list(short.weight_specs.values()), list(short.input_specs.values())
    logits = short.logits(weights, inputs)
    assert logits.shape == (100, 10)
    expected = np.concatenate([net(mx.nd.array(IMAGES[i:i + 32])).asnumpy() for i in range(0, 100, 32)])
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)


def test_one_layer_alone_is_the_net_a_layer_override_builds():
    layer = "mnistcnn_conv2_fwd"
    others = {n: "float" for n in ("mnistcnn_conv1_fwd", "mnistcnn_conv3_fwd", "mnistcnn_dense0_fwd")}
    net = _net()
    variants = Variants(net, IMAGES, batch_size=50)
    alone = _net(layer_overrides=others)
    alone.set_thresholds({layer: net.thresholds()[layer]})
    np.testing.assert_array_equal(variants.logits([variants.weight_specs[layer]], [variants.input_specs[layer]]),
                                  _run(alone, IMAGES))
    alone.quantize_input(False)
    np.testing.assert_array_equal(variants.logits([variants.weight_specs[layer]]), _run(alone, IMAGES))


def test_weights_switch_by_value_and_input_sets_are_built_once():
    variants = Variants(_net(), IMAGES, batch_size=50)
    specs = list(variants.weight_specs.values())
    first = variants.logits(specs[:1])
    for spec in specs:
        variants.logits([spec])
    assert len(variants._blocks) == 1   # one emission served every weights-only configuration
    np.testing.assert_array_equal(variants.logits(specs[:1]), first)
    other_bits = passes.quantize(MNIST_CNN, QuantConfig(weight_bits=3, quant_type="channel")).weight_specs[0]
    assert not np.array_equal(variants.logits([other_bits]), first)


def test_own_sqnr_of_the_first_quantized_layer_is_its_output_sqnr():
    """The first quantized layer reads float tensors in both measures."""
    variants = Variants(_net(), IMAGES, batch_size=50)
    first = variants.layers[0]
    own = variants.own_sqnr()
    alone = variants.output_sqnr([variants.weight_specs[first]], [variants.input_specs[first]])
    assert own[first] == pytest.approx(alone[first], abs=1e-3)
    assert np.isinf(alone[variants.layers[0]]) is np.False_ and all(np.isfinite(list(own.values())))
    everything = variants.output_sqnr(list(variants.weight_specs.values()), list(variants.input_specs.values()))
    assert everything[variants.layers[-1]] < own[variants.layers[-1]]   # errors accumulate


def test_sqnr_and_data_checks():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == float("inf")
    with pytest.raises(DataError, match="labels: 3 labels for 4 images in data"):
        check_images(np.zeros((4, 1, 2, 2)), [0, 1, 2])
    with pytest.raises(DataError, match="data: holds NaN"):
        check_images(np.full((2, 1, 2, 2), np.nan))
    with pytest.raises(ConfigError, match="quantizes no layer"):
        Variants(passes.quantize(MNIST_CNN, QuantConfig(exclude_ops=("Convolution", "FullyConnected"))), IMAGES)
