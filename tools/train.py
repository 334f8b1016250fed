#!/usr/bin/env python
"""Train an FP32 model and export it as PREFIX-symbol.json + PREFIX-0000.params.

Networks: the project's bundled ones (mnist_cnn) or any gluoncv classification
model name (built with classes=10). Data: the bundled MNIST digits or CIFAR-10
RecordIO from --data-dir (default ../shared/data/cifar10). The export is
rewritten after every epoch, so an interrupted run leaves the latest weights.

How the shipped models were made:
    python tools/train.py --model mnist_cnn --out models/mnist_cnn
    python tools/train.py --model cifar_resnet20_v1 --dataset cifar10 --epochs 12 --out models/cifar_resnet20_v1
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

PROG = "train.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist_cnn", help="bundled network or gluoncv model name (default: mnist_cnn)")
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default=None,
                        help="default: mnist for mnist_cnn, cifar10 otherwise")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 RecordIO folder (default: ../shared/data/cifar10)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: 30 mnist, 14 cifar10)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: 64 mnist, 128 cifar10)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate, cosine-decayed (default: Adam 0.003 mnist, NAG 0.1 cifar10)")
    parser.add_argument("--wd", type=float, default=None, help="weight decay (default: 1e-4 mnist, 5e-4 cifar10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", required=True, help="export prefix, e.g. models/mnist_cnn")
    args = parser.parse_args(argv)
    cifar = (args.dataset or ("mnist" if args.model == "mnist_cnn" else "cifar10")) == "cifar10"
    args.dataset = "cifar10" if cifar else "mnist"
    args.epochs = args.epochs or (14 if cifar else 30)
    args.batch_size = args.batch_size or (128 if cifar else 64)
    args.lr = args.lr or (0.1 if cifar else 0.003)
    args.wd = args.wd if args.wd is not None else (5e-4 if cifar else 1e-4)
    return args


def build_net(name: str):
    from qgraph import models

    if name in models.BUNDLED:
        return models.BUNDLED[name]()
    from gluoncv.model_zoo import get_model

    return get_model(name, classes=10)


def batches(args, rng):
    """Yield (data, label) NDArrays for one epoch of training."""
    import mxnet as mx

    from qgraph import data as D

    if args.dataset == "mnist":
        (x_train, y_train), _ = D.mnist_split()
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), args.batch_size):
            index = order[start:start + args.batch_size]
            yield mx.nd.array(x_train[index]), mx.nd.array(y_train[index])
    else:
        iterator = D.cifar10_iter(args.data_dir, "train", args.batch_size, augment=True, seed=int(rng.randint(1 << 30)))
        for batch in iterator:
            yield batch.data[0].as_in_context(mx.cpu()), batch.label[0].as_in_context(mx.cpu())


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import mxnet as mx
    import numpy as np
    from mxnet import autograd, gluon
    from tqdm import tqdm

    from qgraph import data as D
    from qgraph.errors import QGraphError
    from qgraph.evaluate import top1
    from qgraph.io import ensure_writable_folder, export_block

    try:
        ensure_writable_folder(args.out)
        if args.dataset == "cifar10":
            args.data_dir = args.data_dir or D.default_cifar10_dir()
            if args.data_dir is None:
                raise QGraphError("CIFAR-10 not found in ../shared/data/cifar10; pass --data-dir")
            x_test, y_test = D.cifar10_arrays(args.data_dir, "test")
            steps_per_epoch = 50000 // args.batch_size + 1
        else:
            _, (x_test, y_test) = D.mnist_split()
            steps_per_epoch = (4000 + args.batch_size - 1) // args.batch_size
        net = build_net(args.model)
    except (QGraphError, FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    mx.random.seed(args.seed)
    rng = np.random.RandomState(args.seed)
    net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0))
    net.hybridize()
    schedule = mx.lr_scheduler.CosineScheduler(max_update=args.epochs * steps_per_epoch, base_lr=args.lr, final_lr=0)
    optimizer = ("nag", {"momentum": 0.9}) if args.dataset == "cifar10" else ("adam", {})
    trainer = gluon.Trainer(net.collect_params(), optimizer[0],
                            {"learning_rate": args.lr, "lr_scheduler": schedule, "wd": args.wd, **optimizer[1]})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for epoch in range(args.epochs):
        for data, label in tqdm(batches(args, rng), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                                leave=False, mininterval=5):
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(data.shape[0])
        logging.info("epoch %d: test top-1 %.4f", epoch + 1, top1(net, x_test, y_test))
        export_block(net, args.out)
    logging.info("wrote %s-symbol.json and %s-0000.params", args.out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
