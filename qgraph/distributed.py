"""The workers of a data-parallel training run and what they share: the kvstore that sums their
gradients (a local one over the contexts of one process, or MXNet's parameter-server kvstore,
dist_*, over processes that qgraph.launch, or the README's per-host lines, started with the
DMLC_* environment), each worker's rank and the worker count, and the values workers must agree
on besides the weights: input thresholds (checked equal on every worker) and BatchNorm running
statistics (each context and worker updates its own from its own images; `average_statistics`
gives all of them the mean).

A worker's rank is kv.rank, which ps-lite assigns by sorting the nodes' (host, port), not by
launch or connection order: shard data by `Workers.rank`. Synchronous kvstores sum gradients
and every worker runs the optimizer on the sum (update_on_kvstore=False), so optimizer state
stays on the workers, where a checkpoint can save it; dist_async runs the optimizer on the
servers, as MXNet requires.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import mxnet as mx
import numpy as np

from .errors import ConfigError, DataError

KVSTORES = ("device", "local", "dist_sync", "dist_device_sync", "dist_async")
DMLC_VARIABLES = ("DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER")
SCHEDULER_WAIT = 60.0  # seconds a worker waits for the scheduler to accept connections
# kvstore keys of our own, after gluon.Trainer's (0 .. parameters - 1); ps-lite picks a key's
# server by key * 9973 in 32-bit ints, so keys stay below 2**31 / 9973
FIRST_KEY = 100_000
RUNNING_STATISTICS = ("running_mean", "running_var", "moving_mean", "moving_var")
LAUNCH_HINT = "python -m qgraph.launch -n WORKERS -s SERVERS -- COMMAND"


def worker_count(kvstore: str, environ: Mapping[str, str] | None = None) -> int:
    """How many workers a run with `kvstore` has: 1 for device and local, DMLC_NUM_WORKER for
    dist_* once the worker's DMLC environment is checked. ConfigError naming --kvstore or the
    variable otherwise."""
    environ = os.environ if environ is None else environ
    if kvstore not in KVSTORES:
        raise ConfigError(f"--kvstore {kvstore!r} is not one of {', '.join(KVSTORES)}")
    role = environ.get("DMLC_ROLE")
    if not kvstore.startswith("dist"):
        if role == "worker":
            raise ConfigError(f"DMLC_ROLE=worker is set (a qgraph.launch job?) but --kvstore {kvstore} trains alone: "
                              "use dist_sync, dist_device_sync or dist_async")
        return 1
    missing = [name for name in DMLC_VARIABLES if not environ.get(name)]
    if missing:
        raise ConfigError(f"--kvstore {kvstore} needs a worker's DMLC environment ({', '.join(missing)} unset): "
                          f"start the workers with {LAUNCH_HINT}")
    if role != "worker":
        raise ConfigError(f"--kvstore {kvstore} runs in workers, but DMLC_ROLE is {role!r}")
    numbers = {}
    for name in ("DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER"):
        value = environ[name]
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{name}={value!r} is not a positive integer")
        numbers[name] = int(value)
    if numbers["DMLC_PS_ROOT_PORT"] > 65535:
        raise ConfigError(f"DMLC_PS_ROOT_PORT={numbers['DMLC_PS_ROOT_PORT']} is not a port (1..65535)")
    return numbers["DMLC_NUM_WORKER"]


def wait_for_scheduler(host: str, port: int, wait: float = SCHEDULER_WAIT) -> None:
    """Return once something accepts TCP connections at host:port; ConfigError after `wait`
    seconds (ps-lite itself would retry forever)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(f"no kvstore scheduler answers at DMLC_PS_ROOT_URI={host} DMLC_PS_ROOT_PORT={port} "
                                  f"after {wait:g} s ({err.strerror or err}): is it running?") from None
        time.sleep(0.2)


@dataclass
class Workers:
    """This process's place among the workers: the kvstore name, the dist kvstore when there is
    one, this worker's rank and the worker count. Methods that talk to the kvstore must be
    called by every worker, in the same order."""

    name: str = "device"
    kvstore: mx.kv.KVStore | None = None
    rank: int = 0
    count: int = 1
    _keys: dict = field(default_factory=dict, repr=False)

    @property
    def distributed(self) -> bool:
        return self.kvstore is not None

    @property
    def asynchronous(self) -> bool:
        return "async" in self.name

    def trainer_options(self) -> dict:
        """The kvstore arguments of gluon.Trainer (see the module docstring)."""
        return {"kvstore": self.kvstore if self.distributed else self.name,
                "update_on_kvstore": True if self.asynchronous else False}

    def _key(self, use: str, value: mx.nd.NDArray) -> int:
        """The kvstore key of `use`, initialised (to rank 0's `value`) the first time."""
        if use not in self._keys:
            self._keys[use] = FIRST_KEY + len(self._keys)
            self.kvstore.init(self._keys[use], value)
        return self._keys[use]

    def check_same(self, what: str, values: Mapping[str, float]) -> None:
        """DataError on every worker whose `values` differ from rank 0's (compared bit for bit
        as float32); nothing to do for a single process."""
        if not self.distributed or self.count == 1 or not values:
            return
        names = sorted(values)
        mine = mx.nd.array([values[n] for n in names])
        reference = mx.nd.zeros_like(mine)
        self.kvstore.pull(self._key(what, mine), out=reference)
        mine, reference = mine.asnumpy(), reference.asnumpy()
        if not np.array_equal(mine, reference):
            i = int(np.argmax(np.abs(mine - reference)))
            raise DataError(f"{what} differ between workers: '{names[i]}' is {mine[i]!r} on rank {self.rank} but "
                            f"{reference[i]!r} on rank 0; every worker must compute them from the same data")

    def average_statistics(self, params: Iterable) -> None:
        """Give every context and worker the mean of each BatchNorm running statistic in
        `params` (a ParameterDict's values; other parameters are left alone). dist_async
        averages over contexts only: its servers apply the optimizer to whatever is pushed."""
        params = [p for p in params if p.grad_req == "null" and p.name.endswith(RUNNING_STATISTICS)]
        if not params or (len(params[0].list_ctx()) == 1 and (self.count == 1 or self.asynchronous)):
            return
        cpu = mx.cpu()
        means = [mx.nd.add_n(*[d.as_in_context(cpu) for d in p.list_data()]) / len(p.list_data()) for p in params]
        flat = mx.nd.concat(*[m.reshape((-1,)) for m in means], dim=0)
        if self.distributed and self.count > 1 and not self.asynchronous:
            self.kvstore.pushpull(self._key("running statistics", flat), flat, out=flat)
            flat /= self.count
        offset = 0
        for param, mean in zip(params, means):
            param.set_data(flat[offset:offset + mean.size].reshape(mean.shape))
            offset += mean.size
        if self.distributed:
            mx.nd.waitall()  # as after a training step (qgraph.training.train_step)


def join(kvstore: str = "device", environ: Mapping[str, str] | None = None, wait: float = SCHEDULER_WAIT) -> Workers:
    """This process's Workers: alone for device/local; for dist_*, once the DMLC environment is
    checked and the scheduler answers, the dist kvstore (mx.kv.create blocks until every
    worker and server has joined)."""
    environ = os.environ if environ is None else environ
    worker_count(kvstore, environ)
    if not kvstore.startswith("dist"):
        return Workers(kvstore)
    wait_for_scheduler(environ["DMLC_PS_ROOT_URI"], int(environ["DMLC_PS_ROOT_PORT"]), wait)
    store = mx.kv.create(kvstore)
    return Workers(kvstore, store, store.rank, store.num_workers)
