#!/usr/bin/env python
"""Calibration speed: qgraph `kl` against MXNet's own `quantize_net_v2(calib_mode='entropy')`.

Both calibrate cifar_resnet20_v1 (models/cifar_resnet20_v1 when it is there, else the
gluoncv network with random weights) on the same 1,000 class-balanced CIFAR-10 training
images from ../shared/data/cifar10, interleaved in one run (`--repeats` rounds, the
best time of each kept). Timed: building the quantized graph plus calibration, on both sides.
Last line: `kl calibration speedup vs mxnet entropy: X`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.filterwarnings("ignore")

from resnet20 import resnet20_prefix  # noqa: E402


def load_network(prefix: Path):
    """(qgraph Graph, a fresh-SymbolBlock factory) for the trained model, or random weights."""
    import mxnet as mx

    import qgraph

    prefix = resnet20_prefix(prefix)

    def fresh_block():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")

    return qgraph.load(f"{prefix}-symbol.json"), fresh_block


def time_mxnet(fresh_block, images, batch_size) -> float:
    import mxnet as mx
    from mxnet.contrib.quantization import quantize_net_v2

    block = fresh_block()
    start = time.perf_counter()
    calib = mx.io.NDArrayIter(images, batch_size=batch_size)
    quantized = quantize_net_v2(block, quantized_dtype="auto", calib_mode="entropy", calib_data=calib,
                                num_calib_examples=len(images), ctx=mx.cpu())
    quantized(mx.nd.array(images[:2])).wait_to_read()
    return time.perf_counter() - start


def time_qgraph(graph, images, batch_size) -> float:
    import mxnet as mx

    import passes
    import qgraph

    start = time.perf_counter()
    net = passes.quantize(graph, qgraph.QuantConfig(quant_type="channel", input_signed="auto", online=False))
    net.calibrate(images, "kl", batch_size=batch_size, progress=False)
    net(mx.nd.array(images[:2])).wait_to_read()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 RecordIO folder (default: ../shared/data/cifar10)")
    parser.add_argument("--num-sample", type=int, default=100, help="images per class (default: 100 -> 1,000)")
    parser.add_argument("--batch-size", type=int, default=100, help="calibration batch size (default: 100)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (default: 2)")
    parser.add_argument("--model", default=str(ROOT / "models" / "cifar_resnet20_v1"), help="exported model prefix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("MXNET_HOME", tempfile.mkdtemp(prefix="mxnet-home-"))
    from qgraph import data as D

    data_dir = Path(args.data_dir) if args.data_dir else D.default_cifar10_dir()
    if data_dir is None or not (data_dir / "cifar10_train.rec").exists():
        print("calib_speed.py: error: CIFAR-10 not found; pass --data-dir", file=sys.stderr)
        return 2
    images, labels = D.load_calibration_data(data_dir / "cifar10_train.rec", (1, 3, 32, 32), D.CIFAR10_MEAN,
                                             D.CIFAR10_STD, args.num_sample, seed=7)
    graph, fresh_block = load_network(Path(args.model))
    mxnet_times, qgraph_times = [], []
    for round_ in range(args.repeats):
        mxnet_times.append(time_mxnet(fresh_block, images, args.batch_size))
        qgraph_times.append(time_qgraph(graph, images, args.batch_size))
        print(f"round {round_ + 1}: mxnet entropy {mxnet_times[-1]:.2f} s, qgraph kl {qgraph_times[-1]:.2f} s")
    best_mxnet, best_qgraph = min(mxnet_times), min(qgraph_times)
    print(f"{len(images)} images, batch {args.batch_size}: mxnet entropy {best_mxnet:.2f} s, qgraph kl {best_qgraph:.2f} s")
    print(f"kl calibration speedup vs mxnet entropy: {best_mxnet / best_qgraph:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
