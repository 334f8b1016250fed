#!/usr/bin/env python
"""The README's main job: FP32 and simulated-quantized top-1 side by side on the bundled model.

Runs models/mnist_cnn on the 1,000 held-out bundled MNIST digits in float and
under several quantization strategies (online input thresholds: each batch's max),
and prints a markdown table. Options pick another exported model trained on the
same data.
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

STRATEGIES = [
    ("int8 per-layer, uint8 inputs", dict(weight_bits=8, quant_type="layer")),
    ("int8 per-channel, uint8 inputs", dict(weight_bits=8, quant_type="channel")),
    ("int8 per-channel, BN merged", dict(weight_bits=8, quant_type="channel", merge_bn=True)),
    ("int4 per-channel, uint4 inputs", dict(weight_bits=4, input_bits=4, quant_type="channel")),
    ("int4 per-layer, uint4 inputs, BN merged", dict(weight_bits=4, input_bits=4, quant_type="layer", merge_bn=True)),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "mnist_cnn-symbol.json"),
                        help="exported model trained on the bundled MNIST split (default: models/mnist_cnn)")
    parser.add_argument("--batch-size", type=int, default=100, help="evaluation batch size (default: 100)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from tqdm import tqdm

    import qgraph
    from qgraph.data import mnist_split
    from qgraph.evaluate import top1

    try:
        graph = qgraph.load(args.model)
    except qgraph.QGraphError as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 2
    _, (images, labels) = mnist_split()
    fp32 = top1(graph.to_block(), images, labels, args.batch_size)
    rows = []
    for label, fields in tqdm(STRATEGIES, desc="strategies", leave=False):
        net = qgraph.quantize(graph, qgraph.QuantConfig(**fields))
        rows.append((label, top1(net, images, labels, args.batch_size)))
    print(f"model: {args.model}; data: bundled MNIST, {len(labels)} held-out digits; first conv kept in float\n")
    print("| strategy | FP32 top-1 | simulated top-1 | change |")
    print("|---|---|---|---|")
    for label, accuracy in rows:
        print(f"| {label} | {100 * fp32:.2f} | {100 * accuracy:.2f} | {100 * (accuracy - fp32):+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
