#!/usr/bin/env python
"""Train an FP32 model, or fine-tune an exported one with quantization-aware training (--qat),
and export it as PREFIX-symbol.json + PREFIX-0000.params.

FP32 networks: the bundled ones (mnist_cnn) or any gluoncv classification model name (built
with classes=10). Data: the bundled MNIST digits or CIFAR-10 RecordIO from --data-dir
(default ../shared/data/cifar10). Training is data-parallel over --gpus or --cpus contexts
and, with --kvstore dist_sync (dist_device_sync, dist_async), over the workers `python -m
qgraph.launch -n WORKERS -s SERVERS -- python tools/train.py ...` starts: each trains on its
own share of the data, --batch-size is per worker (global batch = that times the workers),
rank 0 alone logs and writes. After every epoch the export and PREFIX-checkpoint.npz are
rewritten; --resume PREFIX-checkpoint.npz, with the same flags, continues the run exactly.

QAT (--qat --symbol MODEL-symbol.json): the exported model is rewritten with the
quantization flags (as simulate_quantization.py's), input thresholds are calibrated by
--calib-mode on --num-sample training images per class (or --calib-data) and then kept
fixed, and the weights are fine-tuned through the fake-quant graph (straight-through
gradients). --fake-bn folds BatchNorm into the quantized weights (arXiv:1712.05877);
--quant-delay and --freeze-bn-after count steps. The export reloads with
qgraph.QuantizedNet.load; --fix-params also writes PREFIX-fixed-*, the deployable graph.

    python tools/train.py --model cifar_resnet20_v1 --dataset cifar10 --epochs 12 --out models/cifar_resnet20_v1
    python tools/train.py --qat --symbol models/cifar_resnet20_v1-symbol.json --weight-bits-width 4 \\
        --input-bits-width 4 --quant-type channel --input-signed auto --fake-bn --epochs 2 --out runs/r20_w4a4
    python -m qgraph.launch -n 2 -s 1 -- python tools/train.py --kvstore dist_sync --batch-size 64 ...
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

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph import checkpoint, data, distributed, models, training, weight_ranges  # noqa: E402
from qgraph.cli import (add_calib_args, add_quant_args, add_run_args, calibration_from_args,  # noqa: E402
                        config_from_args, run_reporting_errors)
from qgraph.evaluate import top1  # noqa: E402
from qgraph.io import check_output_prefix, export_block, model_files, save, to_block  # noqa: E402
from qgraph.launch import fail_fast  # noqa: E402

PROG = "train.py"
RESUMED_FLAGS = ("qat", "dataset", "epochs", "batch_size", "lr", "wd", "seed", "steps_per_epoch", "fake_bn",
                 "quant_delay", "freeze_bn_after", "pad_fill")  # a resumed run must repeat them (the checkpoint records them)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist_cnn", help="bundled network or gluoncv model name (default: mnist_cnn)")
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default=None,
                        help="default: mnist for mnist_cnn, cifar10 otherwise (and for --qat)")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 RecordIO folder (default: ../shared/data/cifar10)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: 30 mnist, 14 cifar10)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size of each worker; the global batch is this times the workers "
                             "(default: 64 mnist, 128 cifar10)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate, cosine-decayed (default: Adam 0.003 mnist, NAG 0.1 cifar10; "
                             "with --qat 0.0003 and 0.01)")
    parser.add_argument("--wd", type=float, default=None, help="weight decay (default: 1e-4 mnist, 5e-4 cifar10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", required=True, help="export prefix, e.g. models/mnist_cnn")
    parser.add_argument("--gpus", default="", help="data-parallel over these GPUs, e.g. 0,1 (default: CPU)")
    parser.add_argument("--cpus", type=int, default=1,
                        help="data-parallel over this many CPU contexts cpu(0..N-1) when no --gpus (default: 1)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="cut each epoch short (default: all data)")
    parser.add_argument("--pad-fill", type=int, default=data.PAD_FILL, metavar="0..255",
                        help="CIFAR-10 augmentation: the colour of the 4-pixel border before the random crop; "
                             "fine-tune with the value the model was trained with (default: 255, MXNet "
                             "ImageRecordIter's, which trained the shipped models; torchvision pads with 0)")
    add_run_args(parser)
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
    qat.add_argument("--weight-range", choices=weight_ranges.RANGES, default="max",
                     help="the range each weight scale group is quantized over: max, the contract's max|W|, or "
                          "mse, clipped before QAT to the range of least squared quantization error and kept "
                          "within it after every step (for 2- and 3-bit weights; default: max)")
    qat.add_argument("--fix-params", action="store_true",
                     help="also write PREFIX-fixed-*: BN folded, weights holding their quantized values")
    add_quant_args(parser)
    add_calib_args(parser)
    # QAT keeps calibrated thresholds (learned ones with --learn-thresholds): offline by definition
    parser.set_defaults(calib_mode="naive", num_sample=100, quantize_input_offline=True)
    flags = parser._option_string_actions
    flags["--calib-mode"].help = ("how --qat initialises the input thresholds, which then stay fixed (or are "
                                  "learned, with --learn-thresholds) (default: naive)")
    flags["--num-sample"].help = "--qat calibration images per class from the training split (default: 100)"
    flags["--calib-data"].help = ("--qat calibration images instead of the training split: a RecordIO .rec, a "
                                  "folder of images, or an .npy/.npz array")
    args = parser.parse_args(argv)
    if args.qat and not args.symbol:
        parser.error("--qat needs --symbol MODEL-symbol.json (an exported FP32 model)")
    if args.symbol and not args.qat:
        parser.error("--symbol is for --qat; FP32 training builds --model")
    if args.weight_range != "max" and not args.qat:
        parser.error(f"--weight-range {args.weight_range} is for --qat")
    if not 0 <= args.pad_fill <= 255:
        parser.error(f"--pad-fill {args.pad_fill}: a pixel value, 0..255")
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


def build(args, ctx, files, calibrate: bool):
    """A QuantizedNet (--qat; calibrated unless resuming) or a fresh FP32 HybridBlock, and the
    WeightRanges it is kept within (--weight-range mse), chosen from the exported weights, which a
    resumed run loads first too, so that it keeps the ranges the run started with."""
    if not args.qat:
        return models.trainable_network(args.model, 10, data.dataset_info(args.dataset).input_shape, ctx), None
    net = passes.quantize(qgraph.load_files(*files), config_from_args(args).replace(fake_bn=args.fake_bn), ctx=ctx[0])
    logging.info("%s", net.report.format())
    ranges = None
    if args.weight_range == "mse":  # before calibration: the thresholds see the clipped weights
        ranges = weight_ranges.WeightRanges.choose(net)
        logging.info("clipped %d weights to their least-squared-error ranges", ranges.moved)
    if calibrate:
        thresholds = calibration_from_args(args).run(net, calibration_images(args), progress=False)
        logging.info("calibrated %d input thresholds (%s)", len(thresholds), args.calib_mode)
    net.collect_params().reset_ctx(ctx)
    return net, ranges


def run(args) -> int:
    ctx = [mx.gpu(int(i)) for i in args.gpus.split(",") if i.strip()] or [mx.cpu(i) for i in range(max(1, args.cpus))]
    count = distributed.worker_count(args.kvstore)
    files = model_files(args.symbol, args.params) if args.qat else None  # inputs first, then the outputs
    if args.dataset == "cifar10":
        args.data_dir = data.data_dir_for("cifar10", args.data_dir)
        data.record_file("cifar10", args.data_dir, "test")
    data.check_parts(args.dataset, args.data_dir, count)
    settings = dict({f"--{name.replace('_', '-')}": getattr(args, name) for name in RESUMED_FLAGS},
                    model=Path(args.symbol).name if args.qat else args.model, workers=count,
                    quantization=repr(config_from_args(args)) if args.qat else None)
    if args.weight_range != "max":  # recorded only when set: checkpoints from before the flag still resume
        settings["--weight-range"] = args.weight_range
    state = checkpoint.load(args.resume) if args.resume else None
    if state is not None:
        checkpoint.check_settings(state, settings)
    check_output_prefix(args.out)
    workers = distributed.join(args.kvstore)
    if args.weight_range != "max" and workers.asynchronous:
        raise qgraph.ConfigError(f"--weight-range {args.weight_range}: --kvstore {workers.name} updates the weights "
                                 "on the servers, where they cannot be kept within range; use dist_sync")
    logging.getLogger().setLevel(logging.WARNING if workers.rank else logging.INFO)  # rank 0 alone logs, writes
    shard = data.train_shard(args.dataset, args.data_dir, workers.count, workers.rank, args.pad_fill)
    mx.random.seed(args.seed)
    net, ranges = build(args, ctx, files, calibrate=state is None)
    if args.qat and state is None:
        workers.check_same("input thresholds", net.thresholds())
    test = data.eval_set(args.dataset, args.data_dir) if workers.rank == 0 else None
    steps = min(shard.steps(args.batch_size, drop_last=workers.asynchronous), args.steps_per_epoch or 1 << 60)
    trainer = training.Optimization("nag" if args.dataset == "cifar10" else "adam", args.lr, args.wd,
                                    total_steps=args.epochs * steps).trainer(net.collect_params(),
                                                                             **workers.trainer_options())
    job = training.Run(net, trainer, workers, shard, args.batch_size, args.epochs, steps, settings, ctx,
                       training.QATSchedule(args.quant_delay, args.freeze_bn_after) if args.qat else None,
                       args.seed, f"{args.out}-checkpoint.npz")
    if state is not None:
        job.resume(state)
        logging.info("resumed from %s after epoch %d (step %d)", state.path, state.epoch, state.step)
    elif args.qat and test:
        logging.info("before QAT: test top-1 %.4f", top1(net, test.images, test.labels))
    if ranges is not None:
        job.after_step = lambda: ranges.apply(net)
    fixed = []

    def after_epoch(epoch):  # rank 0
        if args.qat:
            net.enable_quantize()
            net.quantize_input(True, online=False)
        logging.info("epoch %d: test top-1 %.4f", epoch + 1, top1(net, test.images, test.labels))
        export_block(net, args.out) if not args.qat else net.export(args.out)
        if args.fix_params:
            fixed[:] = [passes.fixed_graph(net)]
            save(fixed[0], f"{args.out}-fixed")

    done = job.fit(args.stop_after, after_epoch)
    if fixed:
        logging.info("deployable graph (BN folded, weights fixed): test top-1 %.4f",
                     top1(to_block(fixed[0]), test.images, test.labels))
    kept = "no checkpoint (dist_async)" if workers.asynchronous else f"{args.out}-checkpoint.npz (epoch {done})"
    logging.info("wrote %s-symbol.json, %s-0000.params%s, %s", args.out, args.out, ", -fixed-*" * bool(fixed), kept)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with fail_fast():  # a failed dist worker must exit now, not wait for the others at the kvstore's exit barrier
        status = run_reporting_errors(PROG, run, args)
        if status:
            sys.exit(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
