#!/usr/bin/env python
"""Train an FP32 model and export it as PREFIX-symbol.json + PREFIX-0000.params.

Today: the project's bundled networks on the bundled MNIST digits (offline).
Example (how models/mnist_cnn was made):
    python tools/train.py --model mnist_cnn --out models/mnist_cnn
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=DeprecationWarning)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist_cnn", help="bundled network name (default: mnist_cnn)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=0.003, help="Adam learning rate, cosine-decayed (default: 0.003)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", required=True, help="export prefix, e.g. models/mnist_cnn")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import mxnet as mx
    import numpy as np
    from mxnet import autograd, gluon
    from tqdm import tqdm

    from qgraph import models
    from qgraph.data import mnist_split
    from qgraph.errors import ConfigError
    from qgraph.evaluate import top1
    from qgraph.io import ensure_writable_folder

    if args.model not in models.BUNDLED:
        raise ConfigError(f"--model {args.model!r} is not a bundled network ({', '.join(models.BUNDLED)})")
    ensure_writable_folder(args.out)
    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    (x_train, y_train), (x_test, y_test) = mnist_split()
    net = models.BUNDLED[args.model]()
    net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0))
    net.hybridize()
    steps = args.epochs * ((len(x_train) + args.batch_size - 1) // args.batch_size)
    schedule = mx.lr_scheduler.CosineScheduler(max_update=steps, base_lr=args.lr, final_lr=0)
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": args.lr, "lr_scheduler": schedule,
                                                           "wd": 1e-4})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(args.seed)
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        batches = range(0, len(order), args.batch_size)
        for start in tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            index = order[start:start + args.batch_size]
            data, label = mx.nd.array(x_train[index]), mx.nd.array(y_train[index])
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(len(index))
        logging.info("epoch %d: test top-1 %.4f", epoch + 1, top1(net, x_test, y_test))
    net.export(args.out)
    logging.info("wrote %s-symbol.json and %s-0000.params", args.out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
