#!/usr/bin/env python
"""sensitivity_time: how long qgraph's per-layer sensitivity sweeps take.

cifar_resnet20_v1 (the shipped model, or random weights when it is absent), int8 per-layer
weights, uint8 inputs with online thresholds, every convolution quantized, the first one too
(the configuration of the sensitivity section of docs/RESULTS.md), on --images CIFAR-10 test
images spread over the split (random images when the data is absent), batch 128. One
qgraph.sensitivity() call with the weights-only and inputs-only sweeps is timed, quantization
included. Prints the three most costly layers, the CPU time this process spent and the load
average (other processes competing for the cores stretch the wall time), then, last,
`sensitivity seconds per layer: X` (wall time).
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
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

import passes  # noqa: E402
import qgraph  # noqa: E402
from benchmarks.resnet20 import resnet20_prefix  # noqa: E402
from qgraph import data  # noqa: E402

CONFIG = qgraph.QuantConfig(weight_bits=8, quant_type="layer", input_signed=False, online=True,
                            exclude_first_conv=False)


def images(count: int):
    """(images, labels): CIFAR-10 test images spread over the split, or random ones."""
    if data.default_cifar10_dir() is None:
        print("CIFAR-10 not found: using random images")
        rng = np.random.RandomState(0)
        return rng.standard_normal((count, 3, 32, 32)).astype(np.float32), rng.randint(0, 10, count)
    evalset = data.eval_set("cifar10", None, count)
    return evalset.images, evalset.labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="test images (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    args = parser.parse_args(argv)
    x, y = images(args.images)
    prefix = resnet20_prefix()
    start, cpu = time.perf_counter(), time.process_time()
    result = qgraph.sensitivity(prefix, CONFIG, x, y, quantize=passes.quantize, sweeps=("weights", "inputs"),
                                batch_size=args.batch_size)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    layers = len(result.rows)
    print(f"{layers} layers, {len(x)} images: FP32 top-1 {100 * result.fp32_top1:.2f}%, every layer quantized "
          f"{100 * result.quantized_top1:.2f}%")
    for rank, row in enumerate(result.ranked()[:3], 1):
        print(f"{rank}. {row.layer}: drop {row.drop_weights:.2f} (weights only), {row.drop_input:.2f} (input only)")
    print(f"sweeps: {seconds:.1f} s in all, {cpu:.1f} s of CPU time ({cpu / layers:.2f} a layer); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"sensitivity seconds per layer: {seconds / layers:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
