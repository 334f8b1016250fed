"""qgraph.checkpoint: a restored checkpoint continues training exactly (parameters, optimizer
state and learning-rate position), a checkpoint of another model or of other settings is
refused naming the difference, anything else is no checkpoint, and a failed write keeps the
previous file."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import qgraph
from qgraph import checkpoint, training

SETTINGS = {"model": "tiny", "--batch-size": 8, "--lr": 0.1}


def _net(channels=4, seed=0):
    """The same parameter names every time (a fixed prefix), values from `seed`."""
    mx.random.seed(seed)
    net = gluon.nn.HybridSequential(prefix="tiny_")
    with net.name_scope():
        net.add(gluon.nn.Conv2D(channels, 3), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"), gluon.nn.Flatten(),
                gluon.nn.Dense(10))
    net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0))
    net(mx.nd.zeros((1, 1, 8, 8)))
    return net


def _trainer(net):
    return training.Optimization("nag", 0.1, 1e-4, total_steps=6).trainer(net.collect_params())


def _steps(net, trainer, first, count):
    rng = np.random.RandomState(first)
    for _ in range(count):
        data = mx.nd.array(rng.normal(size=(8, 1, 8, 8)))
        label = mx.nd.array(rng.randint(0, 10, 8))
        training.train_step(net, trainer, data, label)
    return {name.split("_", 1)[1]: p.data().asnumpy() for name, p in net.collect_params().items()}


def test_a_restored_checkpoint_continues_exactly(tmp_path):
    net = _net()
    trainer = _trainer(net)
    _steps(net, trainer, 0, 2)
    path = checkpoint.save(tmp_path / "run-checkpoint.npz", net.collect_params(), trainer, SETTINGS, 1, 2)
    straight = _steps(net, trainer, 1, 2)

    state = checkpoint.load(path)
    assert (state.epoch, state.step, state.settings) == (1, 2, SETTINGS)
    resumed_net = _net(seed=1)  # other values everywhere: the checkpoint must replace them all
    resumed_trainer = _trainer(resumed_net)
    checkpoint.restore(state, resumed_net.collect_params(), resumed_trainer, SETTINGS)
    assert resumed_trainer.optimizer.num_update == 2 and resumed_trainer.learning_rate < 0.1
    resumed = _steps(resumed_net, resumed_trainer, 1, 2)
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)

    # without the optimizer state (momentum, schedule position) the same two steps end elsewhere
    fresh_net = _net(seed=1)
    fresh_trainer = _trainer(fresh_net)
    for name, param in fresh_net.collect_params().items():
        param.set_data(mx.nd.array(state.params[name]))
    fresh = _steps(fresh_net, fresh_trainer, 1, 2)
    assert max(np.abs(fresh[n] - straight[n]).max() for n in straight) > 1e-4


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    net = _net()
    path = checkpoint.save(tmp_path / "c.npz", net.collect_params(), _trainer(net), SETTINGS, 1, 1)
    other = _net(channels=6)
    with pytest.raises(qgraph.ConfigError) as caught:
        checkpoint.restore(checkpoint.load(path), other.collect_params(), _trainer(other), SETTINGS)
    assert str(caught.value) == (f"{path}: a checkpoint of another model (tiny; this run trains tiny): "
                                 "'tiny_batchnorm0_beta' has shape (4,) there and (6,) here")
    with pytest.raises(qgraph.ConfigError, match=r"c\.npz: a checkpoint of another model \(tiny; this run trains big\)$"):
        checkpoint.restore(checkpoint.load(path), net.collect_params(), _trainer(net), dict(SETTINGS, model="big"))


def test_other_settings_are_refused_naming_the_first(tmp_path):
    net = _net()
    path = checkpoint.save(tmp_path / "c.npz", net.collect_params(), _trainer(net), SETTINGS, 1, 1)
    with pytest.raises(qgraph.ConfigError, match=r"c\.npz: written by a run with --batch-size 8, this run has 16; "
                                                 "resume with the same settings"):
        checkpoint.restore(checkpoint.load(path), net.collect_params(), _trainer(net),
                           dict(SETTINGS, **{"--batch-size": 16}))


def test_anything_else_is_no_checkpoint(tmp_path):
    with pytest.raises(qgraph.DataError, match=r"nope\.npz: no such checkpoint \(--resume\)"):
        checkpoint.load(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(qgraph.DataError, match=r"junk\.npz: not a readable qgraph checkpoint"):
        checkpoint.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "arrays.npz", meta=np.frombuffer(b'{"format": "other"}', np.uint8))
    with pytest.raises(qgraph.DataError, match=r"arrays\.npz: not a qgraph checkpoint \(format 'other'\)"):
        checkpoint.load(tmp_path / "arrays.npz")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net = _net()
    trainer = _trainer(net)
    path = checkpoint.save(tmp_path / "c.npz", net.collect_params(), trainer, SETTINGS, 1, 1)
    before = path.read_bytes()

    def full_disk(stream, **arrays):
        stream.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.np, "savez", full_disk)
    with pytest.raises(qgraph.QGraphError, match="No space left on device"):
        checkpoint.save(path, net.collect_params(), trainer, SETTINGS, 2, 2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]
