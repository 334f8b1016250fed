#!/usr/bin/env python
"""dist_sync against one process: cifar_resnet20_v1 with 4-bit QAT and fake BN (per-channel
weights, inputs signed where needed, offline thresholds calibrated on the first global batch)
trained for --steps steps two ways, from the same model, calibration and seed:

- 2 workers started by qgraph.launch with the dist_sync kvstore, batch B each;
- 1 process with 2 CPU contexts, batch B each (global batch 2B, split by split_and_load).

Both take the same images at every step, and worker r the images context r takes, because
BatchNorm normalises each worker's or context's B images with their own statistics. The
images are the first steps x 2B training records, decoded once by this process in record
order (no threaded iterator, no augmentation) and handed to the workers in a file. Both runs
go through qgraph.training.train_step with SGD (momentum 0.9, lr 0.01, wd 5e-4) and the
gradient summed by a kvstore; the optimizer runs on every worker / context.

Last line: `dist_sync vs local max weight difference: X` (target: X <= 1e-5), the largest
absolute difference over every trained parameter after the last step.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.filterwarnings("ignore")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph import data, distributed, training  # noqa: E402
from qgraph.launch import fail_fast  # noqa: E402
from resnet20 import resnet20_prefix  # noqa: E402

WORKERS = 2


def calibrated_net(images: np.ndarray, batch: int, seed: int):
    """The QAT net, calibrated (naive, one pass) on the first global batch: the same on every run."""
    mx.random.seed(seed)
    config = qgraph.QuantConfig(weight_bits=4, input_bits=4, quant_type="channel", input_signed="auto",
                                fake_bn=True, online=False)
    net = passes.quantize(qgraph.load(f"{resnet20_prefix()}-symbol.json"), config)
    net.calibrate(images[:WORKERS * batch], "naive", calib_epoch=1, progress=False)
    return net


def train(net, images, labels, contexts, workers, batch: int, steps: int) -> dict:
    """`steps` steps; step k takes global batch k, this worker's share when there are workers."""
    net.collect_params().reset_ctx(contexts)
    trainer = training.Optimization("sgd", 0.01, 5e-4, total_steps=10**6).trainer(net.collect_params(),
                                                                                   **workers.trainer_options())
    share = slice(workers.rank * batch, (workers.rank + 1) * batch) if workers.count > 1 else slice(None)
    schedule = training.QATSchedule()
    for step in range(steps):
        index = np.arange(step * WORKERS * batch, (step + 1) * WORKERS * batch)[share]
        schedule.apply(net, step)
        training.train_step(net, trainer, mx.nd.array(images[index]), mx.nd.array(labels[index]), contexts,
                            num_workers=workers.count)
    return {name: p.data(contexts[0]).asnumpy() for name, p in net.collect_params().items() if p.grad_req != "null"}


def worker(folder: Path, batch: int, steps: int, seed: int) -> int:
    """One dist_sync worker: train, then write its weights to folder/worker-RANK.npz."""
    workers = distributed.join("dist_sync")
    arrays = np.load(folder / "images.npz")
    net = calibrated_net(arrays["images"], batch, seed)
    workers.check_same("input thresholds", net.thresholds())
    weights = train(net, arrays["images"], arrays["labels"], [mx.cpu()], workers, batch, steps)
    np.savez(folder / f"worker-{workers.rank}.npz", **weights)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    parser.add_argument("--batch-size", type=int, default=32, help="B, per worker and per context (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 RecordIO folder (default: ../shared/data/cifar10)")
    parser.add_argument("--worker", metavar="FOLDER", help=argparse.SUPPRESS)  # set for the launched workers
    args = parser.parse_args(argv)
    if args.worker:
        with fail_fast():  # a failed worker must not wait for the other at the kvstore's exit barrier
            return worker(Path(args.worker), args.batch_size, args.steps, args.seed)
    began = time.perf_counter()
    count = args.steps * WORKERS * args.batch_size
    path = data.record_file("cifar10", data.data_dir_for("cifar10", args.data_dir), "train")
    images, labels = data.read_records(path, range(count), "cifar10"), data.record_labels(path)[:count]
    with tempfile.TemporaryDirectory(prefix="qgraph-dist-equivalence-") as tmp:
        folder = Path(tmp)
        np.savez(folder / "images.npz", images=images, labels=labels)
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", tmp, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
        launched = subprocess.run([sys.executable, "-m", "qgraph.launch", "-n", str(WORKERS), "-s", "1", "--",
                                   *command], cwd=ROOT)
        if launched.returncode:
            print(f"dist_equivalence.py: error: the dist_sync workers failed (status {launched.returncode})",
                  file=sys.stderr)
            return 1
        dist = [dict(np.load(folder / f"worker-{rank}.npz")) for rank in range(WORKERS)]
    dist_seconds = time.perf_counter() - began
    net = calibrated_net(images, args.batch_size, args.seed)
    start = net.parameter_values()
    local = train(net, images, labels, [mx.cpu(i) for i in range(WORKERS)], distributed.Workers("device"),
                  args.batch_size, args.steps)
    moved = max(float(np.abs(local[n] - start[n]).max()) for n in local)
    between = max(float(np.abs(dist[1][n] - dist[0][n]).max()) for n in dist[0])
    difference = max(float(np.abs(dist[0][n] - local[n]).max()) for n in local)
    print(f"{len(local)} trained parameters, {args.steps} steps, global batch {WORKERS} x {args.batch_size}; "
          f"largest change from the start {moved:.3g}")
    print(f"dist_sync worker 1 vs worker 0 max weight difference: {between:.3g}")
    print(f"time: dist_sync run {dist_seconds:.0f} s (with launch and decoding), total "
          f"{time.perf_counter() - began:.0f} s")
    print(f"dist_sync vs local max weight difference: {difference:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
