"""Resumable training state: one .npz file, written atomically (qgraph.io.write_atomic), that
holds everything a run needs to continue exactly where it stopped.

- every parameter's value: weights, BatchNorm running statistics, input thresholds;
- the optimizer's state as gluon.Trainer.save_states writes it: momentum or Adam moments, the
  update counts and so the learning-rate schedule's position;
- the step count, which the QAT schedule (quant delay, BN freeze) follows;
- the epochs done: the data position, since each epoch's order and augmentation derive from
  (seed, epoch, worker) alone (qgraph.data.TrainShard) and MXNet's generators restart from
  (seed, worker, epoch) (qgraph.training.fit);
- the run's settings (name -> value, e.g. "--batch-size" -> 128, "model" -> the model's name
  or symbol file): a resumed run must have the same ones.

A checkpoint of another model (other parameter names or shapes) or of other settings is a
ConfigError naming the file and the first difference.
"""
from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import mxnet as mx
import numpy as np

from .errors import ConfigError, DataError
from .io import write_atomic

FORMAT = "qgraph-checkpoint-1"
_PARAM = "param:"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    settings: dict
    epoch: int                    # epochs done
    step: int                     # optimizer steps done
    params: dict                  # name -> numpy array
    optimizer: bytes              # gluon.Trainer.save_states


def _trainer_states(trainer) -> bytes:
    with tempfile.TemporaryDirectory(prefix="qgraph-trainer-") as folder:
        path = Path(folder) / "states"
        trainer.save_states(str(path))
        return path.read_bytes()


def save(path, params: Mapping, trainer, settings: Mapping, epoch: int, step: int) -> Path:
    """Write the checkpoint of `params` (a ParameterDict: the first context's values; see
    Workers.average_statistics) and `trainer` after `epoch` epochs and `step` steps."""
    meta = {"format": FORMAT, "settings": dict(settings), "epoch": epoch, "step": step}
    arrays = {f"{_PARAM}{name}": param.data(param.list_ctx()[0]).asnumpy() for name, param in params.items()}
    arrays["optimizer"] = np.frombuffer(_trainer_states(trainer), np.uint8)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as stream:
            np.savez(stream, **arrays)

    return write_atomic(path, write)


def load(path) -> Checkpoint:
    """Read a checkpoint; DataError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint (--resume)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes().decode())
            if meta.get("format") != FORMAT:
                raise DataError(f"{path}: not a qgraph checkpoint (format {meta.get('format')!r})")
            params = {k[len(_PARAM):]: archive[k] for k in archive.files if k.startswith(_PARAM)}
            optimizer = archive["optimizer"].tobytes()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable qgraph checkpoint ({str(err).splitlines()[0][:120]})") from None
    return Checkpoint(path, meta["settings"], int(meta["epoch"]), int(meta["step"]), params, optimizer)


def check_model(checkpoint: Checkpoint, params: Mapping, model: str) -> None:
    """ConfigError unless the checkpoint holds exactly `params`' names and shapes."""
    written_for = checkpoint.settings.get("model", "?")
    ours = {name: tuple(param.shape) for name, param in params.items()}
    theirs = {name: tuple(value.shape) for name, value in checkpoint.params.items()}
    problem = next((f"it has no parameter '{n}'" for n in sorted(ours) if n not in theirs), None)
    problem = problem or next((f"'{n}' is not a parameter of this model" for n in sorted(theirs) if n not in ours),
                              None)
    problem = problem or next((f"'{n}' has shape {theirs[n]} there and {ours[n]} here" for n in sorted(ours)
                               if ours[n] != theirs[n]), None)
    if problem:
        raise ConfigError(f"{checkpoint.path}: a checkpoint of another model ({written_for}; this run trains {model}): "
                          f"{problem}")


def check_settings(checkpoint: Checkpoint, settings: Mapping) -> None:
    """ConfigError when the checkpoint is of another model (its "model" setting differs) or
    else names the first setting that differs from the checkpoint's."""
    written = checkpoint.settings
    if written.get("model") != settings.get("model"):
        raise ConfigError(f"{checkpoint.path}: a checkpoint of another model ({written.get('model')}; this run trains "
                          f"{settings.get('model')})")
    for name in sorted(set(written) | set(settings)):
        if written.get(name) != settings.get(name):
            raise ConfigError(f"{checkpoint.path}: written by a run with {name} {written.get(name)!r}, this run has "
                              f"{settings.get(name)!r}; resume with the same settings")


def restore(checkpoint: Checkpoint, params: Mapping, trainer, settings: Mapping) -> None:
    """Check the checkpoint against the model and the settings, then load its values into
    `params` (every context) and its optimizer state into `trainer`."""
    check_model(checkpoint, params, settings.get("model", "?"))
    check_settings(checkpoint, settings)
    for name, param in params.items():
        value = checkpoint.params[name]
        param.set_data(mx.nd.array(value, dtype=value.dtype))
    with tempfile.TemporaryDirectory(prefix="qgraph-trainer-") as folder:
        path = Path(folder) / "states"
        path.write_bytes(checkpoint.optimizer)
        trainer.load_states(str(path))
    # load_states may start a dist kvstore and broadcast the parameters: finish that pull before
    # the first step's gradient pushpull (MXNet 1.9 does not order the two; see training.train_step)
    mx.nd.waitall()
