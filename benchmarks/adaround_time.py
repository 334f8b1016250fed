#!/usr/bin/env python
"""adaround_time: wall time of AdaRound on cifar_resnet20_v1, W4A8.

The project's cifar_resnet20_v1 (random weights when models/ lacks it), BatchNorm merged, int4
weights per output channel, int8 signed inputs calibrated offline (naive) on the same images,
first convolution in float; AdaRound (qgraph.recovery.adaround, its default iterations unless
--iterations) on 1,024 class-balanced CIFAR-10 training images (seed 7) from
../shared/data/cifar10, or on 1,024 random images when the data is not there. Timed: the
AdaRound call alone, which gathers each layer's statistics and fits its rounding. Prints the
machine's load average before and after (the 2 cores are shared), with --eval the top-1 on the
CIFAR-10 test set before and after, and as its last line
`adaround minutes for cifar_resnet20_v1: X`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph import data, experiment, recovery  # noqa: E402
from resnet20 import resnet20_prefix  # noqa: E402

IMAGES = 1024
CONFIG = qgraph.QuantConfig(weight_bits=4, input_bits=8, quant_type="channel", input_signed=True, merge_bn=True,
                            online=False)


def calibration_images(count: int) -> np.ndarray:
    """`count` class-balanced CIFAR-10 training images (seed 7), or random ones without the data."""
    folder = data.default_cifar10_dir()
    if folder is None:
        print("CIFAR-10 not found: using random images")
        return np.random.default_rng(7).standard_normal((count, 3, 32, 32)).astype(np.float32)
    per_class = -(-count // 10)
    return data.calibration_subset("cifar10", folder, per_class, 7)[:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=recovery.ITERATIONS, help="AdaRound iterations per layer")
    parser.add_argument("--images", type=int, default=IMAGES, help=f"calibration images (default: {IMAGES})")
    parser.add_argument("--eval", action="store_true", help="also print top-1 on the CIFAR-10 test set")
    args = parser.parse_args(argv)
    images = calibration_images(args.images)
    net = passes.quantize(resnet20_prefix(), CONFIG)
    net.calibrate(images, "naive", progress=False)
    evalset = data.eval_set("cifar10") if args.eval else None
    if evalset is not None:
        print(f"top-1 before AdaRound: {100 * experiment.evaluate_set(net, evalset, 128).top1:.2f}%")
    print(f"load average before: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cores)")
    start = time.perf_counter()
    fits = net.adaround(images, iterations=args.iterations)
    minutes = (time.perf_counter() - start) / 60
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"{len(fits)} layers, {args.iterations} iterations each, {len(images)} images; data error per layer "
          f"{np.mean([f.loss / f.loss_nearest for f in fits.values()]):.2f}x that of nearest rounding on average")
    if evalset is not None:
        print(f"top-1 after AdaRound: {100 * experiment.evaluate_set(net, evalset, 128).top1:.2f}%")
    print(f"adaround minutes for cifar_resnet20_v1: {minutes:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
