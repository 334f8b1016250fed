"""qgraph.training: the QAT schedule follows the step count, a data-parallel step over two
contexts equals one over a single context, and fit() calls back after every epoch."""
import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN

import passes
import qgraph
from qgraph import training
from qgraph.data import mnist_split


@pytest.fixture(scope="module")
def calibrated():
    net = passes.quantize(qgraph.load(f"{MNIST_CNN}-symbol.json"), qgraph.QuantConfig(fake_bn=True, online=False))
    net.calibrate(np.random.RandomState(0).rand(8, 1, 28, 28).astype(np.float32), "naive", progress=False)
    return net


def test_quant_delay_and_bn_freeze_follow_the_step_count(calibrated):
    schedule = training.QATSchedule(quant_delay=2, freeze_bn_after=3)
    states = []
    for step in range(5):
        schedule.apply(calibrated, step)
        mode = calibrated.mode
        states.append((mode.weights, mode.inputs, mode.online, mode.bn_frozen))
    assert states == [(False, False, False, False)] * 2 + [(True, True, False, False)] + [(True, True, False, True)] * 2


def _mlp():
    """No BatchNorm: each context's half batch would get its own batch statistics."""
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Flatten(), mx.gluon.nn.Dense(16, activation="relu"), mx.gluon.nn.Dense(10))
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    net(mx.nd.zeros((1, 1, 28, 28)))
    for i, param in enumerate(net.collect_params().values()):
        param.set_data(mx.nd.array(np.random.RandomState(i).normal(0, 0.1, param.shape)))
    return net


def test_a_step_over_two_contexts_equals_one_over_one():
    (x, y), _ = mnist_split()
    data, label = mx.nd.array(x[:32]), mx.nd.array(y[:32])
    results = []
    for contexts in ([mx.cpu(0)], [mx.cpu(0), mx.cpu(1)]):
        net = _mlp()
        net.collect_params().reset_ctx(contexts)
        trainer = training.Optimization("sgd", 0.1, wd=0.0, total_steps=10).trainer(net.collect_params())
        loss = training.train_step(net, trainer, data, label, contexts)
        results.append((loss, [p.data(contexts[0]).asnumpy() for p in net.collect_params().values()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for one, two in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-6)
    untrained = [p.data().asnumpy() for p in _mlp().collect_params().values()]
    assert not any(np.array_equal(a, b) for a, b in zip(untrained, results[0][1]))  # every weight moved


def test_fit_runs_epochs_of_at_most_steps_per_epoch_and_calls_back(calibrated):
    (x, y), _ = mnist_split()
    seen, calls = [], []

    def batches(epoch):
        for i in range(10):
            seen.append((epoch, i))
            yield mx.nd.array(x[i * 8:(i + 1) * 8]), mx.nd.array(y[i * 8:(i + 1) * 8])

    trainer = training.Optimization("adam", 1e-3, wd=0.0, total_steps=6).trainer(calibrated.collect_params())
    steps = training.fit(calibrated, trainer, batches, epochs=2, steps_per_epoch=3,
                         schedule=training.QATSchedule(), after_epoch=lambda *done: calls.append(done), progress=False)
    assert steps == 6 and calls == [(0, 3), (1, 6)]
    assert seen == [(e, i) for e in (0, 1) for i in range(3)]  # no batch drawn beyond the steps taken


@pytest.mark.parametrize("fields", [dict(optimizer="rmsprop"), dict(lr=0.0), dict(total_steps=0)])
def test_bad_optimization_is_a_config_error(fields):
    with pytest.raises(qgraph.ConfigError):
        training.Optimization(**fields)
