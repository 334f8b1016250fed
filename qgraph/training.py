"""The training loop for FP32 models and quantization-aware training: a gluon.Trainer with a
cosine learning rate, data-parallel steps over several contexts, and for QAT the schedule
that keeps quantization off for the first `quant_delay` steps and freezes BatchNorm from
`freeze_bn_after` on. tools/train.py, tools/demo.py and benchmarks/qat_step.py all use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import mxnet as mx
from mxnet import autograd, gluon
from tqdm import tqdm

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

    def trainer(self, params, kvstore="device") -> gluon.Trainer:
        schedule = mx.lr_scheduler.CosineScheduler(max_update=self.total_steps, base_lr=self.lr, final_lr=0)
        options = {"learning_rate": self.lr, "lr_scheduler": schedule, "wd": self.wd}
        if self.optimizer in ("nag", "sgd"):
            options["momentum"] = self.momentum
        return gluon.Trainer(params, self.optimizer, options, kvstore=kvstore)


@dataclass(frozen=True)
class QATSchedule:
    """Quantizers off for the first `quant_delay` steps (offline input thresholds after that);
    BatchNorm frozen from step `freeze_bn_after` on (never when None)."""

    quant_delay: int = 0
    freeze_bn_after: int | None = None

    def apply(self, net, step: int) -> None:
        if step < self.quant_delay:
            net.disable_quantize()
        else:
            net.enable_quantize()
            if net.input_specs:
                net.quantize_input(True, online=False)
        net.freeze_bn(self.freeze_bn_after is not None and step >= self.freeze_bn_after)


def train_step(net, trainer: gluon.Trainer, data: mx.nd.NDArray, label: mx.nd.NDArray,
               contexts: Sequence = (mx.cpu(),), loss_fn=None) -> float:
    """One step: `data` split over `contexts`, forward and backward on each, then the update.
    Returns the mean loss."""
    loss_fn = loss_fn or gluon.loss.SoftmaxCrossEntropyLoss()
    data_parts = gluon.utils.split_and_load(data, list(contexts), even_split=False)
    label_parts = gluon.utils.split_and_load(label, list(contexts), even_split=False)
    with autograd.record():
        losses = [loss_fn(net(x), y) for x, y in zip(data_parts, label_parts)]
    autograd.backward(losses)
    trainer.step(data.shape[0])
    return float(sum(loss.sum().asscalar() for loss in losses)) / data.shape[0]


def fit(net, trainer: gluon.Trainer, epoch_batches: Callable[[int], Iterable], epochs: int, steps_per_epoch: int,
        contexts: Sequence = (mx.cpu(),), schedule: QATSchedule | None = None,
        after_epoch: Callable[[int], None] | None = None, progress: bool = True, first_step: int = 0) -> int:
    """Train for `epochs` of at most `steps_per_epoch` steps over `epoch_batches(epoch)`, which
    yields (data, label) NDArrays. `schedule` (QAT) runs before every step; `after_epoch(epoch)`
    after every epoch. Returns the number of steps taken."""
    step = first_step
    for epoch in range(epochs):
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False, mininterval=5,
                   disable=not progress)
        for index, (data, label) in enumerate(epoch_batches(epoch)):
            if index == steps_per_epoch:
                break
            if schedule is not None:
                schedule.apply(net, step)
            train_step(net, trainer, data, label, contexts)
            step += 1
            bar.update(1)
        bar.close()
        if after_epoch is not None:
            after_epoch(epoch)
    return step
