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
calibrated by --calib-mode on --num-sample class-balanced training images per class (or
--calib-data) and then kept fixed, and the weights are fine-tuned through the fake-quant
graph with straight-through gradients. --fake-bn folds BatchNorm into the quantized
weights (arXiv:1712.05877); --quant-delay and --freeze-bn-after are in steps. The export
reloads with qgraph.QuantizedNet.load; --fix-params also writes PREFIX-fixed-*: BN folded
and weights holding their quantized values, for deployment.

How the shipped models were made:
    python tools/train.py --model mnist_cnn --out models/mnist_cnn
    python tools/train.py --model cifar_resnet20_v1 --dataset cifar10 --epochs 12 --out models/cifar_resnet20_v1
    python tools/train.py --model mobilenet0.5 --dataset cifar10 --epochs 15 --out models/mobilenet0.5_cifar10

QAT example (4-bit per-channel with fake BN):
    python tools/train.py --qat --symbol models/cifar_resnet20_v1-symbol.json --weight-bits-width 4 \\
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

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph import data, models, training  # noqa: E402
from qgraph.cli import (add_calib_args, add_quant_args, calibration_from_args, config_from_args,  # noqa: E402
                        run_reporting_errors)
from qgraph.evaluate import top1  # noqa: E402
from qgraph.io import check_output_prefix, export_block, model_files, save, to_block  # noqa: E402

PROG = "train.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    qat.add_argument("--learn-thresholds", action="store_true",
                     help="learn the input thresholds with LSQ's scaled gradient (initialised by --calib-mode)")
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
    cifar = (args.dataset or ("mnist" if not args.qat and args.model == "mnist_cnn" else "cifar10")) == "cifar10"
    args.dataset = "cifar10" if cifar else "mnist"
    if args.qat:  # fine-tuning: a short, gentle schedule
        args.epochs = args.epochs or 3
        args.lr = args.lr or (0.01 if cifar else 0.0003)
    args.epochs = args.epochs or (14 if cifar else 30)
    args.batch_size = args.batch_size or (128 if cifar else 64)
    args.lr = args.lr or (0.1 if cifar else 0.003)
    args.wd = args.wd if args.wd is not None else (5e-4 if cifar else 1e-4)
    return args


def calibration_images(args):
    if args.calib_data:
        info = data.dataset_info(args.dataset)
        mean, std = (args.mean, args.std) if args.mean or args.dataset == "mnist" else (info.mean, info.std)
        return data.load_calibration_data(args.calib_data, info.input_shape, mean, std, args.num_sample,
                                          args.fixed_random_seed)[0]
    return data.calibration_subset(args.dataset, args.data_dir, args.num_sample, args.fixed_random_seed)


def build(args, ctx, files):
    """The network to train: a calibrated QuantizedNet (--qat) or a fresh FP32 HybridBlock."""
    if args.qat:
        net = passes.quantize(qgraph.load_files(*files), config_from_args(args).replace(fake_bn=args.fake_bn,
                                                                                         online=False), ctx=ctx[0])
        logging.info("%s", net.report.format())
        thresholds = calibration_from_args(args).run(net, calibration_images(args))
        logging.info("calibrated %d input thresholds (%s)", len(thresholds), args.calib_mode)
        net.collect_params().reset_ctx(ctx)
        return net
    net = models.build_network(args.model, classes=10)
    net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0), ctx=ctx)
    net.hybridize()
    return net


def run(args) -> int:
    ctx = [mx.gpu(int(i)) for i in args.gpus.split(",") if i.strip()] or [mx.cpu(i) for i in range(max(1, args.cpus))]
    mx.random.seed(args.seed)
    rng = np.random.RandomState(args.seed)
    files = model_files(args.symbol, args.params) if args.qat else None  # inputs first, then the output
    if args.dataset == "cifar10":
        args.data_dir = data.data_dir_for("cifar10", args.data_dir)
        for split in ("train", "test"):
            data.record_file("cifar10", args.data_dir, split)
    check_output_prefix(args.out)
    net = build(args, ctx, files)
    test = data.eval_set(args.dataset, args.data_dir)
    if args.qat:
        logging.info("before QAT: test top-1 %.4f", top1(net, test.images, test.labels))
    steps = min(-(-data.train_size(args.dataset) // args.batch_size), args.steps_per_epoch or 1 << 60)
    optimization = training.Optimization("nag" if args.dataset == "cifar10" else "adam", args.lr, args.wd,
                                         total_steps=args.epochs * steps)
    schedule = training.QATSchedule(args.quant_delay, args.freeze_bn_after) if args.qat else None
    fixed = []

    def after_epoch(epoch):
        if args.qat:
            net.enable_quantize()
            net.quantize_input(True, online=False)
        logging.info("epoch %d: test top-1 %.4f", epoch + 1, top1(net, test.images, test.labels))
        if not args.qat:
            export_block(net, args.out)
            return
        net.export(args.out)
        if args.fix_params:
            fixed[:] = [passes.fixed_graph(net)]
            save(fixed[0], f"{args.out}-fixed")

    training.fit(net, optimization.trainer(net.collect_params()), lambda epoch: data.train_batches(
        args.dataset, args.data_dir, args.batch_size, rng), args.epochs, steps, ctx, schedule, after_epoch)
    if fixed:
        logging.info("deployable graph (BN folded, weights fixed): test top-1 %.4f",
                     top1(to_block(fixed[0]), test.images, test.labels))
    logging.info("wrote %s-symbol.json and %s-0000.params%s", args.out, args.out, " (and -fixed-*)" if fixed else "")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_reporting_errors(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
