#!/usr/bin/env python
"""The README's main job: FP32 and simulated-quantized top-1 side by side on the bundled model.

Runs models/mnist_cnn on the 1,000 held-out bundled MNIST digits in float and
under several quantization strategies, with online input thresholds (each batch's
max) or offline ones calibrated on 20 training digits per class, then wins back the
int4 loss with a short quantization-aware training run (fake BN, --qat-steps), and
prints a markdown table. Options pick another exported model trained on the same data.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph import training  # noqa: E402
from qgraph.cli import run_reporting_errors  # noqa: E402
from qgraph.data import calibration_subset, mnist_split  # noqa: E402
from qgraph.evaluate import top1  # noqa: E402

# (label, QuantConfig fields, calibration mode or None for online thresholds)
STRATEGIES = [
    ("int8 per-layer, uint8 inputs", dict(weight_bits=8, quant_type="layer"), None),
    ("int8 per-channel, uint8 inputs", dict(weight_bits=8, quant_type="channel"), None),
    ("int8 per-channel, BN merged", dict(weight_bits=8, quant_type="channel", merge_bn=True), None),
    ("int8 per-channel, naive (EMA) calibration", dict(weight_bits=8, quant_type="channel", online=False), "naive"),
    ("int8 per-channel, entropy calibration", dict(weight_bits=8, quant_type="channel", online=False), "entropy"),
    ("int4 per-channel, uint4 inputs", dict(weight_bits=4, input_bits=4, quant_type="channel"), None),
    ("int4 per-channel, percentile calibration", dict(weight_bits=4, input_bits=4, quant_type="channel",
                                                      online=False), "percentile"),
    ("int4 per-layer, uint4 inputs, BN merged", dict(weight_bits=4, input_bits=4, quant_type="layer", merge_bn=True),
     None),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "mnist_cnn-symbol.json"),
                        help="exported model trained on the bundled MNIST split (default: models/mnist_cnn)")
    parser.add_argument("--batch-size", type=int, default=100, help="evaluation batch size (default: 100)")
    parser.add_argument("--qat-steps", type=int, default=150,
                        help="steps of the int4 QAT row, batch 64 (default: 150; 0 leaves the row out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return run_reporting_errors("demo.py", run, args)


def run(args) -> int:
    graph = qgraph.load(args.model)
    (train_images, train_labels), (images, labels) = mnist_split()
    calibration = calibration_subset("mnist", per_class=20, seed=7)
    fp32 = top1(qgraph.to_block(graph), images, labels, args.batch_size)
    rows = []
    for label, fields, calib_mode in tqdm(STRATEGIES, desc="strategies", leave=False):
        net = passes.quantize(graph, qgraph.QuantConfig(**fields))
        if calib_mode:
            net.calibrate(calibration, calib_mode, batch_size=50, progress=False)
        rows.append((label, top1(net, images, labels, args.batch_size)))
    if args.qat_steps:
        net = passes.quantize(graph, qgraph.QuantConfig(weight_bits=4, input_bits=4, quant_type="channel",
                                                        online=False, fake_bn=True))
        net.calibrate(calibration, "percentile", batch_size=50, progress=False)
        quantization_aware_training(net, train_images, train_labels, args.qat_steps)
        rows.append((f"int4 per-channel, percentile calibration + {args.qat_steps} QAT steps (fake BN)",
                     top1(net, images, labels, args.batch_size)))
    model = Path(args.model).resolve()
    shown = model.relative_to(ROOT) if model.is_relative_to(ROOT) else model
    print(f"model: {shown}; data: bundled MNIST, {len(labels)} held-out digits; first conv kept in float\n")
    print("| strategy | FP32 top-1 | simulated top-1 | change |")
    print("|---|---|---|---|")
    for label, accuracy in rows:
        print(f"| {label} | {100 * fp32:.2f} | {100 * accuracy:.2f} | {100 * (accuracy - fp32):+.2f} |")
    return 0


def quantization_aware_training(net, images, labels, steps: int, batch_size: int = 64) -> None:
    """The library's QAT loop on random batches: Adam, learning rate 1e-3 decaying to 0."""
    rng = np.random.RandomState(0)

    def batches(epoch):
        for _ in range(steps):
            index = rng.randint(0, len(images), batch_size)
            yield mx.nd.array(images[index]), mx.nd.array(labels[index])

    trainer = training.Optimization("adam", 1e-3, wd=0.0, total_steps=steps).trainer(net.collect_params())
    training.fit(net, trainer, batches, epochs=1, steps_per_epoch=steps, progress=False)


if __name__ == "__main__":
    sys.exit(main())
