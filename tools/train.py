#!/usr/bin/env python
"""Train an FP32 model, or fine-tune an exported one with quantization-aware training (--qat),
and export it as PREFIX-symbol.json + PREFIX-0000.params.

FP32 networks: the project's bundled ones (mnist_cnn) or any gluoncv classification model
name (built with classes=10). Data: the bundled MNIST digits or CIFAR-10 RecordIO from
--data-dir (default ../shared/data/cifar10). Training is data-parallel over --gpus or
--cpus contexts. The export is rewritten after every epoch, so an interrupted run leaves
the latest weights.

QAT (--qat --symbol MODEL-symbol.json): the exported model is rewritten with the
quantization flags (the same as simulate_quantization.py), input thresholds are
calibrated by --calib-mode on class-balanced training images (or --calib-data) and then
kept fixed, and the weights are fine-tuned through the fake-quant graph with
straight-through gradients. --fake-bn folds BatchNorm
into the quantized weights (arXiv:1712.05877); --quant-delay and --freeze-bn-after are in
steps. The export reloads with qgraph.QuantizedNet.load; --fix-params also writes
PREFIX-fixed-*: BN folded and weights holding their quantized values, for deployment.

How the shipped models were made:
    python tools/train.py --model mnist_cnn --out models/mnist_cnn
    python tools/train.py --model cifar_resnet20_v1 --dataset cifar10 --epochs 12 --out models/cifar_resnet20_v1
    python tools/train.py --model mobilenet0.5 --dataset cifar10 --epochs 15 --out models/mobilenet0.5_cifar10

QAT example (4-bit per-channel with fake BN):
    python tools/train.py --qat --symbol models/cifar_resnet20_v1-symbol.json --weight-bits-width 4 \
        --input-bits-width 4 --quant-type channel --input-signed auto --fake-bn --epochs 2 --out runs/r20_w4a4
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

from qgraph.cli import add_calib_args, add_quant_args, config_from_args  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist_cnn", help="bundled network or gluoncv model name (default: mnist_cnn)")
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default=None,
                        help="default: mnist for mnist_cnn, cifar10 otherwise (and for --qat)")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 RecordIO folder (default: ../shared/data/cifar10)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: 30 mnist, 14 cifar10)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: 64 mnist, 128 cifar10)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate, cosine-decayed (default: Adam 0.003 mnist, NAG 0.1 cifar10)")
    parser.add_argument("--wd", type=float, default=None, help="weight decay (default: 1e-4 mnist, 5e-4 cifar10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", required=True, help="export prefix, e.g. models/mnist_cnn")
    parser.add_argument("--gpus", default="", help="data-parallel over these GPUs, e.g. 0,1 (default: CPU)")
    parser.add_argument("--cpus", type=int, default=1,
                        help="data-parallel over this many CPU contexts cpu(0..N-1) when no --gpus (default: 1)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="cut each epoch short (default: all data)")
    qat = parser.add_argument_group("quantization-aware training")
    qat.add_argument("--qat", action="store_true", help="fine-tune an exported model (--symbol) through fake quantization")
    qat.add_argument("--symbol", help="the exported FP32 model to fine-tune, PREFIX-symbol.json")
    qat.add_argument("--params", help="its parameters (default: PREFIX-0000.params beside the symbol)")
    qat.add_argument("--fake-bn", action="store_true", help="fold BatchNorm into the quantized weights (fake BN)")
    qat.add_argument("--quant-delay", type=int, default=0, metavar="STEPS",
                     help="train with quantization off for the first STEPS steps (default: 0)")
    qat.add_argument("--freeze-bn-after", type=int, default=None, metavar="STEPS",
                     help="use and keep BatchNorm's running statistics from this step on (default: never)")
    qat.add_argument("--fix-params", action="store_true",
                     help="also write PREFIX-fixed-*: BN folded, weights holding their quantized values")
    add_quant_args(parser)
    add_calib_args(parser)
    parser.set_defaults(calib_mode="naive", num_sample=100)
    flags = parser._option_string_actions
    flags["--calib-mode"].help = "how --qat initialises the input thresholds, which then stay fixed (default: naive)"
    flags["--num-sample"].help = "--qat calibration images per class from the training split (default: 100)"
    flags["--calib-data"].help = ("--qat calibration images instead of the training split: a RecordIO .rec, a "
                                  "folder of images, or an .npy/.npz array")
    args = parser.parse_args(argv)
    if args.qat and not args.symbol:
        parser.error("--qat needs --symbol MODEL-symbol.json (an exported FP32 model)")
    if args.symbol and not args.qat:
        parser.error("--symbol is for --qat; FP32 training builds --model")
    model = "qat" if args.qat else args.model
    cifar = (args.dataset or ("mnist" if model == "mnist_cnn" else "cifar10")) == "cifar10"
    args.dataset = "cifar10" if cifar else "mnist"
    if args.qat:  # fine-tuning: a short, gentle schedule
        args.epochs = args.epochs or 3
        args.lr = args.lr or (0.01 if cifar else 0.0003)
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
            keep = batch.data[0].shape[0] - batch.pad
            yield batch.data[0][:keep].as_in_context(mx.cpu()), batch.label[0][:keep].as_in_context(mx.cpu())


def contexts(args) -> list:
    import mxnet as mx

    if args.gpus:
        return [mx.gpu(int(i)) for i in args.gpus.split(",") if i.strip()]
    return [mx.cpu(i) for i in range(max(1, args.cpus))]


def calibration_images(args):
    """--num-sample images per class from --calib-data or the training split, chosen with
    --fixed-random-seed."""
    from qgraph import data as D

    if args.calib_data:
        shape = (1, 1, 28, 28) if args.dataset == "mnist" else (1, 3, 32, 32)
        mean, std = (args.mean, args.std) if args.mean or args.dataset == "mnist" else (D.CIFAR10_MEAN, D.CIFAR10_STD)
        return D.load_calibration_data(args.calib_data, shape, mean, std, args.num_sample, args.fixed_random_seed)[0]
    if args.dataset == "mnist":
        (images, labels), _ = D.mnist_split()
    else:  # the training file is shuffled: its first 10,000 images hold about 1,000 per class
        images, labels = D.cifar10_arrays(args.data_dir, "train", limit=10000)
    return images[D.class_balanced_subset(labels, args.num_sample, args.fixed_random_seed)]


def model_files(args):
    """(symbol, params) paths of the model --qat fine-tunes; an error when either is missing."""
    from qgraph.errors import GraphError
    from qgraph.io import symbol_and_params_paths

    symbol_path, params_path = symbol_and_params_paths(args.symbol, args.params)
    if not symbol_path.is_file():
        raise GraphError(f"{symbol_path}: no such symbol file")
    if params_path is None:
        raise GraphError(f"{symbol_path}: no params file beside it; pass --params")
    return symbol_path, params_path


def build_qat_net(args, files, ctx):
    import qgraph

    config = config_from_args(args).replace(fake_bn=args.fake_bn, online=False)
    graph = qgraph.load_files(*files)
    net = qgraph.quantize(graph, config, ctx=ctx[0])
    logging.info("%s", net.report.format())
    thresholds = net.calibrate(calibration_images(args), args.calib_mode, calib_epoch=args.calib_epoch,
                               batch_size=args.calib_batch_size, percentile=args.percentile, progress=True)
    logging.info("calibrated %d input thresholds (%s)", len(thresholds), args.calib_mode)
    return net


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
    from qgraph.io import ensure_writable_folder, export_block, save, to_block

    ctx = contexts(args)
    mx.random.seed(args.seed)
    rng = np.random.RandomState(args.seed)
    try:
        ensure_writable_folder(args.out)
        files = model_files(args) if args.qat else None  # checked before any data is read
        if args.dataset == "cifar10":
            args.data_dir = args.data_dir or D.default_cifar10_dir()
            if args.data_dir is None:
                raise QGraphError("CIFAR-10 not found in ../shared/data/cifar10; pass --data-dir")
            x_test, y_test = D.cifar10_arrays(args.data_dir, "test")
            steps_per_epoch = 50000 // args.batch_size + 1
        else:
            _, (x_test, y_test) = D.mnist_split()
            steps_per_epoch = (4000 + args.batch_size - 1) // args.batch_size
        if args.qat:
            net = build_qat_net(args, files, ctx)
            net.collect_params().reset_ctx(ctx)
            logging.info("before QAT: test top-1 %.4f", top1(net, x_test, y_test))
        else:
            net = build_net(args.model)
            net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0), ctx=ctx)
            net.hybridize()
    except (QGraphError, FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch or steps_per_epoch)
    schedule = mx.lr_scheduler.CosineScheduler(max_update=args.epochs * steps_per_epoch, base_lr=args.lr, final_lr=0)
    optimizer = ("nag", {"momentum": 0.9}) if args.dataset == "cifar10" else ("adam", {})
    trainer = gluon.Trainer(net.collect_params(), optimizer[0],
                            {"learning_rate": args.lr, "lr_scheduler": schedule, "wd": args.wd, **optimizer[1]})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    step = 0
    for epoch in range(args.epochs):
        progress = tqdm(batches(args, rng), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                        leave=False, mininterval=5)
        for index, (data, label) in enumerate(progress):
            if index == steps_per_epoch:
                break
            if args.qat:
                _qat_schedule(net, args, step)
            data_parts = gluon.utils.split_and_load(data, ctx, even_split=False)
            label_parts = gluon.utils.split_and_load(label, ctx, even_split=False)
            with autograd.record():
                losses = [loss_fn(net(x), y) for x, y in zip(data_parts, label_parts)]
            autograd.backward(losses)
            trainer.step(data.shape[0])
            step += 1
        progress.close()
        if args.qat:
            net.enable_quantize()
            net.quantize_input(True, online=False)
        logging.info("epoch %d: test top-1 %.4f", epoch + 1, top1(net, x_test, y_test))
        if args.qat:
            net.export(args.out)
            if args.fix_params:
                fixed = net.fixed_graph()
                save(fixed, f"{args.out}-fixed")
        else:
            export_block(net, args.out)
    if args.qat and args.fix_params:
        logging.info("deployable graph (BN folded, weights fixed): test top-1 %.4f",
                     top1(to_block(fixed), x_test, y_test))
    logging.info("wrote %s-symbol.json and %s-0000.params%s", args.out, args.out,
                 f" (and {args.out}-fixed-*)" if args.qat and args.fix_params else "")
    return 0


def _qat_schedule(net, args, step: int) -> None:
    """Quantizers off for the first --quant-delay steps; BN frozen from --freeze-bn-after on."""
    if step < args.quant_delay:
        net.disable_quantize()
    else:
        net.enable_quantize()
        net.quantize_input(True, online=False)
    net.freeze_bn(args.freeze_bn_after is not None and step >= args.freeze_bn_after)


if __name__ == "__main__":
    sys.exit(main())
