"""Quantization-aware training through QuantizedNet with a plain gluon.Trainer: every mode steps
without ignore_stale_grad, offline thresholds stay fixed, online ones follow update_ema, and a
few 4-bit QAT steps with fake BN lower the loss on the bundled MNIST model."""
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import passes
import qgraph
from qgraph.data import mnist_split

ROOT = Path(__file__).resolve().parents[2]
MNIST = str(ROOT / "models" / "mnist_cnn-symbol.json")


@pytest.fixture(scope="module")
def batch():
    (x, y), _ = mnist_split()
    return mx.nd.array(x[:64]), mx.nd.array(y[:64])


def _net(**config):
    config = qgraph.QuantConfig(**{"weight_bits": 4, "input_bits": 4, "quant_type": "channel",
                                   "input_signed": "auto", **config})
    return passes.quantize(qgraph.load(MNIST), config)


def _step(net, trainer, data, label):
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(data), label)
    loss.backward()
    trainer.step(data.shape[0])  # raises on stale gradients: no ignore_stale_grad here
    return float(loss.mean().asscalar())


def _weights(net):
    return {k: p.data().asnumpy().copy() for k, p in net.collect_params().items() if p.grad_req != "null"}


@pytest.mark.parametrize("mode", ["offline", "online", "disabled", "weights_only", "fake_bn"])
def test_a_plain_trainer_steps_in_every_mode(batch, mode):
    data, label = batch
    net = _net(online=mode == "online", fake_bn=mode == "fake_bn")
    if mode != "online":
        net.calibrate(data.asnumpy(), "naive", progress=False)
    if mode == "disabled":
        net.disable_quantize()
    if mode == "weights_only":
        net.quantize_input(False)
    thresholds = net.thresholds()
    before = _weights(net)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05})
    _step(net, trainer, data, label)
    after = _weights(net)
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before if k.endswith("weight"))
    if mode == "online":
        net.update_ema(momentum=0.5)
        assert net.thresholds() != thresholds
    else:
        assert net.thresholds() == thresholds  # offline thresholds are parameters without gradient


def test_qat_with_fake_bn_lowers_the_loss(batch):
    data, label = batch
    net = _net(weight_bits=3, input_bits=3, fake_bn=True, online=False)
    net.calibrate(data.asnumpy(), "naive", progress=False)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.02, "momentum": 0.9})
    losses = [_step(net, trainer, data, label) for _ in range(15)]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_changed_thresholds_select_a_new_constant_emission(batch):
    """Offline thresholds are baked into the emitted operators; a new value must be used at once."""
    data, _ = batch
    net = _net(online=False)
    net.calibrate(data.asnumpy(), "naive", progress=False)
    first = net(data).asnumpy()
    layer = next(iter(net.thresholds()))
    net.set_thresholds({layer: net.thresholds()[layer] * 0.25})
    second = net(data).asnumpy()
    assert np.abs(first - second).max() > 1e-3
    assert sum(1 for _, baked in net.cached_forms() if baked is not None) == 1  # the stale one was dropped
