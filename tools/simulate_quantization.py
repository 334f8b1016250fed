#!/usr/bin/env python
"""Simulate quantization of a classifier and print its top-1 accuracy (the seed's main tool, offline).

The model is a gluoncv model-zoo name (--model; its weights from --params, from the
project's models/NAME-symbol.json when it ships one, or --pretrained, which needs
network access) or an exported model (--symbol FILE-symbol.json [--params FILE]).
Every flag of the seed's examples/simulate_quantization.py is accepted with the same
meaning and default. Inputs are quantized with each batch's maximum (online) unless
--quantize-input-offline or --calib-mode asks for thresholds calibrated on
--num-sample images per class of the training split. Evaluation runs on the whole test
split (--num-eval N keeps N images spread evenly over it).

--grid runs the seed's results table in one go and prints it as markdown: `int8`
(input uint8/int8, offline none/naive/KL, weights per layer/channel, BN merged or not,
first conv excluded or not) or `lowbit` (uint6/int6 .. uint3/int3, per channel, BN
merged, first conv excluded, naive against KL). The FP32 model is evaluated once and each
graph variant is built once for all its rows.

examples:
  python tools/simulate_quantization.py --model cifar_resnet20_v1 --dataset cifar10 --quant-type channel
  python tools/simulate_quantization.py --symbol models/mnist_cnn-symbol.json --dataset mnist --calib-mode kl
  python tools/simulate_quantization.py --model cifar_resnet20_v1 --dataset cifar10 --grid --report grid.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import mxnet as mx  # noqa: E402

import passes  # noqa: E402
from qgraph import ConfigError, data, experiment, models  # noqa: E402
from qgraph.cli import (add_calib_args, add_quant_args, add_recovery_args, calibration_from_args,  # noqa: E402
                        config_from_args, recovery_from_args, run_reporting_errors)
from qgraph.io import write_atomic  # noqa: E402

PROG = "simulate_quantization.py"
DEFAULT_NUM_SAMPLE = 5          # images per class of the training split, as the seed
log = logging.getLogger(PROG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="model-zoo name (see --list-models); required unless --symbol is given")
    model.add_argument("--symbol", metavar="FILE-symbol.json", help="load an exported model instead of a zoo name")
    model.add_argument("--params", metavar="FILE",
                       help="weights: an exported checkpoint (arg:/aux: keys) or a save_parameters file (default: "
                            "beside --symbol; for --model, models/NAME_DATASET or models/NAME when qgraph ships it)")
    model.add_argument("--pretrained", action="store_true",
                       help="download the model zoo's pretrained weights (needs network access)")
    model.add_argument("--print-model", action="store_true", help="print the architecture of the model")
    model.add_argument("--list-models", action="store_true", help="list the names --model accepts and exit")
    model.add_argument("--use-gn", action="store_true", help="zoo model: GroupNorm instead of BatchNorm")
    model.add_argument("--batch-norm", action="store_true", help="zoo model: vgg with BatchNorm")
    model.add_argument("--use-se", action="store_true", help="zoo model: resnext with SE layers")
    model.add_argument("--last-gamma", action="store_true",
                       help="zoo model: initialise the last BN gamma of each bottleneck to 0")
    run = parser.add_argument_group("data and devices")
    run.add_argument("--dataset", choices=tuple(data.DATASETS), default=None,
                     help="data set to calibrate and evaluate on (default: imagenet as in the seed; cifar10 "
                          "for cifar* names, mnist for mnist* names)")
    run.add_argument("--data-dir", help="RecordIO folder: cifar10_{train,test}.rec (default: "
                                        "../shared/data/cifar10) or ImageNet's train.rec/val.rec; mnist is bundled")
    run.add_argument("--use-gpu", type=int, default=-1, metavar="N", help="run on gpu N (default: -1, cpu)")
    run.add_argument("-j", "--num-data-workers", dest="num_workers", type=int, default=4,
                     help="decoding threads for RecordIO data (default: 4)")
    run.add_argument("--batch-size", type=int, default=128,
                     help="evaluation (and calibration) batch size (default: 128)")
    run.add_argument("--num-eval", type=int, metavar="N",
                     help="evaluate on N test images spread evenly over the split (default: the whole split)")
    run.add_argument("--disable-cudnn-autotune", action="store_true",
                     help="disable MXNet's cuDNN autotune for convolution algorithms")
    add_quant_args(parser)
    calib = add_calib_args(parser)
    calib.add_argument("--eval-per-calib", action="store_true",
                       help="evaluate after every calibration epoch (naive) or after calibration (others)")
    add_recovery_args(parser)
    parser.set_defaults(calib_batch_size=None)
    parser._option_string_actions["--num-sample"].help = (
        f"calibration images per class, class-balanced with --fixed-random-seed (default: {DEFAULT_NUM_SAMPLE} of "
        "the training split, as the seed; all of --calib-data)")
    table = parser.add_argument_group("results tables and output")
    table.add_argument("--grid", nargs="?", const="int8", choices=tuple(experiment.GRIDS), default=None,
                       help="run the seed's results table and print it as markdown: int8 (the default) or lowbit "
                            "(naive vs KL at 6..3 bits); the grid sets dtype, offline mode, weight granularity, "
                            "BN merge and first-conv exclusion itself")
    table.add_argument("--report", metavar="OUT.json", help="write the results (and thresholds) as JSON")
    table.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    return parser


def resolve_dataset(args) -> str:
    if args.dataset:
        return args.dataset
    name = (args.model or Path(args.symbol).name).lower()
    return "mnist" if name.startswith("mnist") else ("cifar10" if name.startswith("cifar") else "imagenet")


def calibration_images(args, dataset: str):
    """--calib-data, or --num-sample images per class of the training split."""
    shape = data.dataset_info(dataset).input_shape
    if args.calib_data:
        return data.load_calibration_data(args.calib_data, shape, args.mean, args.std, args.num_sample,
                                          args.fixed_random_seed)[0]
    return data.calibration_subset(dataset, args.data_dir, args.num_sample or DEFAULT_NUM_SAMPLE,
                                   args.fixed_random_seed)


def _print_result(name: str, result) -> None:
    print(f"{name}: {result.images} images")
    print("{0: <8}: {1:2.2f}%".format("acc", 100 * result.top1))
    print("{0: <8}: {1:2.2f}%".format("avg_acc", 100 * result.avg_acc))


def run(args) -> int:
    for flag in ("batch_size", "num_eval", "num_sample", "calib_epoch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be at least 1")
    if args.use_gpu >= 0 and mx.context.num_gpus() <= args.use_gpu:
        raise ConfigError(f"--use-gpu {args.use_gpu}: this machine has {mx.context.num_gpus()} GPU(s)")
    if args.disable_cudnn_autotune:
        os.environ["MXNET_CUDNN_AUTOTUNE_DEFAULT"] = "0"
    ctx = mx.gpu(args.use_gpu) if args.use_gpu >= 0 else mx.cpu()
    dataset = resolve_dataset(args)
    info = data.dataset_info(dataset)
    log.info("%s", "\n".join(f"{key:25s}: {value}" for key, value in vars(args).items()))
    options = models.ZooOptions(args.use_gn, args.batch_norm, args.use_se, args.last_gamma)
    graph = models.load_model(args.model, args.symbol, args.params, info.input_shape, dataset, info.classes,
                              args.pretrained, options)
    if args.print_model:
        print(models.describe(graph))
    evalset = data.eval_set(dataset, args.data_dir, args.num_eval, args.num_workers)
    offline = bool(args.quantize_input_offline or args.calib_mode)
    recovery = recovery_from_args(args)
    if args.grid and recovery.active:
        raise ConfigError("--adaround and --bias-correction apply to one simulation, not to --grid")
    calib_images = calibration_images(args, dataset) if args.grid or offline or recovery.active else None
    calibration, progress = calibration_from_args(args), not args.quiet
    name = args.model or Path(args.symbol).name.replace("-symbol.json", "")
    report = {"model": name, "dataset": dataset, "eval_images": evalset.size or None, "argv": args.argv,
              "calibration_images": None if calib_images is None else len(calib_images)}
    if args.grid:
        rows = experiment.grid_rows(args.grid, args.weight_bits_width, args.input_bits_width)
        fp32, results = experiment.run_grid(graph, rows, config_from_args(args), evalset, calib_images, calibration,
                                            passes.quantize, args.batch_size, ctx, progress)
        print(f"model: {name}; {dataset} test, {fp32.images} images; calibration: {len(calib_images)} training "
              f"images, {args.calib_epoch} naive epochs\n")
        print(experiment.TABLES[args.grid](fp32, results))
        report.update(grid=args.grid, fp32=fp32.as_dict(), rows=[{**asdict(r), **a.as_dict()} for r, a in results])
    else:
        config = config_from_args(args).replace(online=not offline)
        result = experiment.simulate(graph, config, evalset, passes.quantize, calibration if offline else None,
                                     calib_images, args.batch_size, args.eval_per_calib, ctx, progress, recovery)
        for line in result.net.report.format().splitlines():
            log.info("%s", line)
        for i, accuracy in enumerate(result.per_calibration):
            _print_result(f"calibration {i + 1}", accuracy)
        for method, done in (result.recovery or {}).items():
            print(f"{method}: {done['seconds']:.1f} s on {len(calib_images)} calibration images")
        if not result.per_calibration or result.recovery:
            _print_result("result", result.accuracy)
        if offline:
            report["calibration"] = {"mode": calibration.mode, "thresholds": result.net.thresholds()}
        report.update(config=asdict(config), result=result.accuracy.as_dict(), recovery=result.recovery,
                      per_calib=[a.as_dict() for a in result.per_calibration] or None)
    if args.report:
        write_atomic(args.report, json.dumps(report, indent=2, default=str) + "\n")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.argv = argv
    if args.list_models:
        print("\n".join(models.model_names()))
        return 0
    if not args.model and not args.symbol:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: --model is required (or --symbol FILE-symbol.json for an exported model)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_reporting_errors(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
