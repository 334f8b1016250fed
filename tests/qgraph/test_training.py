"""qgraph.training: the QAT schedule follows the step count, a data-parallel step over two
contexts equals one over a single context, fit() calls back after every epoch, and a Run
averages BatchNorm statistics and checkpoints after every epoch (dist_async cannot resume)."""
import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN

import passes
import qgraph
from qgraph import checkpoint, data, distributed, training
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


def test_a_dist_async_run_cannot_resume(tmp_path):
    """Its optimizer state lives on the kvstore servers, out of a checkpoint's reach."""
    net = _mlp()
    trainer = training.Optimization("sgd", 0.1, total_steps=4).trainer(net.collect_params())
    shard = data.train_shard("mnist", None, 2, 0)
    run = training.Run(net, trainer, distributed.Workers("dist_async"), shard, 8, epochs=2, steps_per_epoch=2)
    state = checkpoint.Checkpoint(tmp_path / "c.npz", {}, 1, 2, {}, b"")
    with pytest.raises(qgraph.ConfigError, match="--kvstore dist_async cannot resume: its optimizer state lives on "
                                                 "the kvstore servers; use dist_sync"):
        run.resume(state)


def test_a_run_trains_its_epochs_averages_statistics_and_checkpoints_after_each(tmp_path):
    contexts = [mx.cpu(0), mx.cpu(1)]
    net = mx.gluon.nn.HybridSequential(prefix="bn_")
    with net.name_scope():
        net.add(mx.gluon.nn.Flatten(), mx.gluon.nn.Dense(8), mx.gluon.nn.BatchNorm(), mx.gluon.nn.Dense(10))
    net.initialize(mx.init.Xavier(), ctx=contexts)
    trainer = training.Optimization("adam", 1e-3, total_steps=6).trainer(net.collect_params(), update_on_kvstore=False)
    shard = data.train_shard("mnist", None, 1, 0)
    seen = []
    run = training.Run(net, trainer, distributed.Workers(), shard, 16, 3, 2, {"model": "bn"}, contexts,
                       checkpoint_path=tmp_path / "c.npz")
    assert run.fit(stop_after=2, after_epoch=seen.append) == 2 and seen == [0, 1] and run.step == 4
    state = checkpoint.load(tmp_path / "c.npz")
    assert (state.epoch, state.step) == (2, 4)
    mean = [p for n, p in net.collect_params().items() if n.endswith("running_mean")][0]
    first, second = (a.asnumpy() for a in mean.list_data())
    np.testing.assert_array_equal(first, second)  # each context saw other images, then the mean
    np.testing.assert_array_equal(state.params[mean.name], first)
    assert np.abs(first).max() > 0
