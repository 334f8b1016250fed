"""The training loop for FP32 models and quantization-aware training: a gluon.Trainer with a
cosine learning rate, data-parallel steps over the contexts of a process and over worker
processes (a kvstore sums the gradients; see qgraph.distributed), and for QAT the schedule
that keeps quantization off for the first `quant_delay` steps and freezes BatchNorm from
`freeze_bn_after` on. tools/train.py, tools/demo.py and the benchmarks all use it.

Batch size and learning rate mean the same however many workers share a step: each worker's
batch is its share of the global batch (per-worker batch x workers), and the update is the
learning rate times the mean gradient over the global batch, as in one process.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from . import checkpoint
from .data import TrainShard
from .distributed import Workers
from .errors import ConfigError

OPTIMIZERS = ("nag", "sgd", "adam")


@dataclass(frozen=True)
class Optimization:
    """Optimizer, peak learning rate (cosine-decayed to 0 over `total_steps`), weight decay."""

    optimizer: str = "nag"
    lr: float = 0.1
    wd: float = 5e-4
    momentum: float = 0.9
    total_steps: int = 1

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0 or self.total_steps < 1:
            raise ConfigError(f"lr={self.lr} and total_steps={self.total_steps} must be positive")

    def trainer(self, params, kvstore="device", update_on_kvstore: bool | None = None) -> gluon.Trainer:
        """A gluon.Trainer over `params`; `kvstore` and `update_on_kvstore` as gluon.Trainer takes
        them (Workers.trainer_options() gives both)."""
        schedule = mx.lr_scheduler.CosineScheduler(max_update=self.total_steps, base_lr=self.lr, final_lr=0)
        options = {"learning_rate": self.lr, "lr_scheduler": schedule, "wd": self.wd}
        if self.optimizer in ("nag", "sgd"):
            options["momentum"] = self.momentum
        return gluon.Trainer(params, self.optimizer, options, kvstore=kvstore, update_on_kvstore=update_on_kvstore)


@dataclass(frozen=True)
class QATSchedule:
    """Quantizers off for the first `quant_delay` steps (offline input thresholds after that);
    BatchNorm frozen from step `freeze_bn_after` on (never when None)."""

    quant_delay: int = 0
    freeze_bn_after: int | None = None

    def quantizing(self, step: int) -> bool:
        """Whether the quantizers run at `step` (the learned thresholds get gradients only then)."""
        return step >= self.quant_delay

    def apply(self, net, step: int) -> None:
        if not self.quantizing(step):
            net.disable_quantize()
        else:
            net.enable_quantize()
            if net.input_specs:
                net.quantize_input(True, online=False)
        net.freeze_bn(self.freeze_bn_after is not None and step >= self.freeze_bn_after)


def train_step(net, trainer: gluon.Trainer, data: mx.nd.NDArray, label: mx.nd.NDArray,
               contexts: Sequence = (mx.cpu(),), loss_fn=None, num_workers: int = 1,
               ignore_stale_grad: bool = False) -> float:
    """One step: `data` (this worker's share of the global batch, `num_workers` equal shares)
    split over `contexts`, forward and backward on each, then the update with the gradient
    summed over contexts and workers and divided by the global batch. With several workers
    the step returns once the update is done: if a worker queues its next steps while the
    others are still busy (MXNet's engine is asynchronous), MXNet 1.9's dist kvstore can
    deadlock (seen here with gluon.Trainer and dist_sync). `ignore_stale_grad` lets parameters
    this step did not use keep their value (learned thresholds while the quantizers are off).
    Returns this worker's mean loss."""
    loss_fn = loss_fn or gluon.loss.SoftmaxCrossEntropyLoss()
    data_parts = gluon.utils.split_and_load(data, list(contexts), even_split=False)
    label_parts = gluon.utils.split_and_load(label, list(contexts), even_split=False)
    with autograd.record():
        losses = [loss_fn(net(x), y) for x, y in zip(data_parts, label_parts)]
    autograd.backward(losses)
    if num_workers > 1:
        _broadcast_before_first_update(trainer)
    trainer.step(data.shape[0] * num_workers, ignore_stale_grad=ignore_stale_grad)
    if num_workers > 1:  # MXNet 1.9's dist kvstore hangs when a worker queues steps ahead of the others
        mx.nd.waitall()
    return float(sum(loss.sum().asscalar() for loss in losses)) / data.shape[0]


def _broadcast_before_first_update(trainer: gluon.Trainer) -> None:
    """Copy rank 0's parameters to every worker and wait, before the first update. gluon.Trainer
    does that broadcast inside its first step(), and MXNet 1.9's dist kvstore does not order the
    broadcast's pull before the same step's gradient pushpull on the same key: a worker late to
    pull got the summed gradient as its weights (seen as a flaky two-worker test). Only for
    update_on_kvstore=False (dist_sync): with the optimizer on the servers (dist_async) the
    kvstore must not start before step() has set the gradient scale it sends them. Runs after
    the first forward, so no parameter is still waiting for deferred initialisation."""
    if trainer._kv_initialized or trainer._kvstore_params["update_on_kvstore"] is not False:
        return
    trainer._init_kvstore()
    trainer._init_params()
    mx.nd.waitall()


def fit(net, trainer: gluon.Trainer, epoch_batches: Callable[[int], Iterable], epochs: int, steps_per_epoch: int,
        contexts: Sequence = (mx.cpu(),), schedule: QATSchedule | None = None,
        after_epoch: Callable[[int, int], None] | None = None, progress: bool = True, first_step: int = 0,
        first_epoch: int = 0, num_workers: int = 1, seed: Sequence[int] | None = None,
        after_step: Callable[[], object] | None = None) -> int:
    """Train epochs `first_epoch` .. `epochs - 1`, each of at most `steps_per_epoch` steps over
    `epoch_batches(epoch)`, which yields (data, label) NDArrays (this worker's share when
    `num_workers` > 1). `schedule` (QAT) runs before every step, `first_step` being the step
    count so far; `after_epoch(epoch, steps taken so far)` after every epoch. With `seed`,
    MXNet's random generators restart from (seed..., epoch) at every epoch, so random
    operators (dropout) repeat when a run is resumed. `after_step()` runs after every update
    (e.g. qgraph.weight_ranges keeping weights within range). Returns the number of steps taken so far."""
    step = first_step
    for epoch in range(first_epoch, epochs):
        if seed is not None:
            mx.random.seed(int(np.random.SeedSequence([*seed, epoch]).generate_state(1)[0] >> 1))
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False, mininterval=5,
                   disable=not progress)
        for data, label in itertools.islice(epoch_batches(epoch), steps_per_epoch):
            if schedule is not None:
                schedule.apply(net, step)
            train_step(net, trainer, data, label, contexts, num_workers=num_workers,
                       ignore_stale_grad=schedule is not None and not schedule.quantizing(step))
            if after_step is not None:
                after_step()
            step += 1
            bar.update(1)
        bar.close()
        if after_epoch is not None:
            after_epoch(epoch, step)
    return step


@dataclass
class Run:
    """A training run over workers (one, or many with a dist kvstore) that can stop and resume:
    `fit()` trains `epochs` epochs of `steps_per_epoch` steps over this worker's `shard`
    (batches of `batch_size`, drawn from `seed`); after every epoch every worker averages the
    BatchNorm running statistics, then rank 0 alone calls back and writes the checkpoint
    (to `checkpoint_path`, unless None). `resume(checkpoint)` continues from one."""

    net: gluon.Block
    trainer: gluon.Trainer
    workers: Workers
    shard: TrainShard
    batch_size: int
    epochs: int
    steps_per_epoch: int
    settings: dict = field(default_factory=dict)   # what a resumed run must repeat (qgraph.checkpoint)
    contexts: Sequence = (mx.cpu(),)
    schedule: QATSchedule | None = None
    seed: int = 0
    checkpoint_path: str | Path | None = None
    epoch: int = 0                                 # epochs done
    step: int = 0                                  # steps done
    after_step: Callable[[], object] | None = None  # after every update, on every worker

    def resume(self, state: checkpoint.Checkpoint) -> None:
        """Take the parameters, optimizer state and position of `state` (checked against the
        model and the settings; see qgraph.checkpoint)."""
        if self.workers.asynchronous:
            raise ConfigError(f"{state.path}: --kvstore {self.workers.name} cannot resume: its optimizer state "
                              "lives on the kvstore servers; use dist_sync")
        checkpoint.restore(state, self.net.collect_params(), self.trainer, self.settings)
        self.epoch, self.step = state.epoch, state.step
        if self.epoch >= self.epochs:
            raise ConfigError(f"{state.path}: the run already finished its {self.epochs} epochs")

    def fit(self, stop_after: int | None = None, after_epoch: Callable[[int], None] | None = None) -> int:
        """Train up to `epochs` (or `stop_after` more epochs); returns the epochs done."""
        last = min(self.epochs, self.epoch + (stop_after or self.epochs))
        workers = self.workers

        def epoch_done(epoch: int, step: int) -> None:
            self.epoch, self.step = epoch + 1, step
            workers.average_statistics(self.net.collect_params().values())
            if workers.rank:
                return
            if after_epoch is not None:
                after_epoch(epoch)
            if self.checkpoint_path is not None and not workers.asynchronous:  # dist_async: state on the servers
                checkpoint.save(self.checkpoint_path, self.net.collect_params(), self.trainer, self.settings,
                                self.epoch, self.step)

        fit(self.net, self.trainer, lambda epoch: self.shard.batches(epoch, self.batch_size, self.seed,
                                                                      workers.asynchronous),
            last, self.steps_per_epoch, self.contexts, self.schedule, epoch_done, workers.rank == 0, self.step,
            self.epoch, workers.count, seed=(self.seed, workers.rank), after_step=self.after_step)
        return self.epoch
