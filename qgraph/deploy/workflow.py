"""The command line the exporters share (tools/export_ncnn.py, export_onnx.py,
export_mxnet_int8.py): model, quantization and calibration flags with export_ncnn's defaults
(8-bit per-channel weights, BatchNorm folded, every Convolution/FullyConnected int8, entropy
calibration on 20 class-balanced CIFAR-10 training images per class), the verification flags,
the data they name, checked before any output is written, and the lines --verify prints."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import data
from ..cli import (add_calib_args, add_model_file_args, add_quant_args, add_recovery_args, calibration_from_args,
                   positive_int, recovery_from_args, shape_arg)
from ..errors import ConfigError
from ..graph import Graph
from ..io import check_output_prefix, guess_input_shapes, load_files, model_files, model_prefix, write_files_atomic
from .verification import FP32_TOLERANCE, Verification

CIFAR10_PER_CLASS = 20  # calibration images per class drawn from the CIFAR-10 training set


def image_shape(text: str) -> tuple:
    dims = shape_arg(text)
    if len(dims) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,32,32")
    return dims


def export_parser(prog: str, doc: str, out_help: str, runtime: str):
    """An exporter's parser with the shared flags: (parser, quantization group, verification group)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_file_args(parser, out_help, shape_type=image_shape)
    quant = add_quant_args(parser)
    add_calib_args(parser)
    add_recovery_args(parser)
    parser.set_defaults(quant_type="channel", input_signed=True, merge_bn=True, exclude_first_conv=False,
                        calib_mode="entropy")
    check = parser.add_argument_group(f"verification with {runtime}")
    check.add_argument("--data-dir", help="CIFAR-10 RecordIO folder (implies --input-shape 1,3,32,32 unless "
                                          "given): calibration images (class-balanced subset of the training "
                                          "set) when --calib-data is not given, and the test set for --verify "
                                          "(default for 3-channel models: ../shared/data/cifar10 if present)")
    check.add_argument("--no-int8", action="store_true", help="write only the FP32 model")
    check.add_argument("--verify", action="store_true",
                       help=f"compare the FP32 model in {runtime} with MXNet, then the int8 model with the "
                            "simulation on the test set")
    check.add_argument("--verify-data", metavar="FILE.npz",
                       help="evaluation images and labels (arrays 'data' and 'label') instead of CIFAR-10 test")
    check.add_argument("--verify-limit", type=positive_int, default=None, metavar="N",
                       help="evaluate only the first N test images (default: all)")
    check.add_argument("-q", "--quiet", action="store_true", help="print only errors and the result lines")
    return parser, quant, check


@dataclass
class ExportJob:
    """What the flags name: the float graph (input shape set), the output prefix, the CIFAR-10
    folder when one is used, and whether int8 files are wanted."""

    graph: Graph
    shape: tuple
    out: str
    data_dir: Path | None
    int8: bool


def prepare(args) -> ExportJob:
    """Load the model and check every input the flags name, before anything is written."""
    symbol_path, params_path = model_files(args.symbol, args.params)
    out = args.out or Path(model_prefix(symbol_path)).name
    graph = load_files(symbol_path, params_path, input_names=[args.input_name])
    shape = args.input_shape or guess_input_shapes(graph)[args.input_name]
    data_dir, int8 = args.data_dir, not args.no_int8
    if data_dir is None and len(shape) == 4 and shape[1] == 3 and (
            (int8 and not args.calib_data) or (args.verify and not args.verify_data)):
        data_dir = data.default_cifar10_dir()
    if data_dir is not None and not args.input_shape:
        shape = data.CIFAR10.input_shape
    graph.input_shapes = {args.input_name: tuple(shape)}
    check_output_prefix(out)
    if args.verify and int8 and data_dir is None and not args.verify_data:
        raise ConfigError("--verify needs test images: --data-dir (CIFAR-10) or --verify-data")
    if not int8 and recovery_from_args(args).active:
        raise ConfigError("--adaround and --bias-correction change the int8 model: drop --no-int8")
    if int8 and not args.calib_data and data_dir is None:
        raise ConfigError("int8 export needs calibration images: --calib-data or --data-dir (or --no-int8)")
    return ExportJob(graph, tuple(shape), out, data_dir, int8)


def calibrate(net, args, job: ExportJob) -> np.ndarray:
    """Calibrate `net`'s input thresholds as the flags say (export_ncnn's defaults), then run the
    recovery flags (AdaRound, bias correction) on the same images; returns the images."""
    if args.calib_data:
        images = data.load_calibration_data(args.calib_data, job.shape, args.mean, args.std, args.num_sample,
                                            args.fixed_random_seed)[0]
    else:
        images = data.calibration_subset("cifar10", job.data_dir, args.num_sample or CIFAR10_PER_CLASS,
                                         args.fixed_random_seed)
    calibration_from_args(args).run(net, images, progress=not args.quiet)
    recovery_from_args(args).run(net, images, progress=not args.quiet)
    return images


def evaluation_data(args, job: ExportJob):
    """--verify-data, the CIFAR-10 test set, or (no data at all) random images for the FP32 check."""
    if args.verify_data:
        images, labels = data.load_calibration_data(args.verify_data, job.shape)
        if labels is None:
            raise ConfigError(f"{args.verify_data}: --verify-data needs arrays 'data' and 'label'")
        return images[:args.verify_limit], labels[:args.verify_limit]
    if job.data_dir is not None:
        return data.cifar10_arrays(job.data_dir, "test", limit=args.verify_limit)
    return np.random.default_rng(0).standard_normal((16,) + tuple(job.shape[1:])).astype("f4"), None


def float_layers(folded: Graph, net) -> list:
    """The Convolution/FullyConnected layers the simulation keeps in float."""
    return sorted(n for n in folded.nodes(("Convolution", "FullyConnected")) if n not in net.thresholds())


@dataclass(frozen=True)
class Exporter:
    """What a runtime's tool plugs into run_export: `fp32_files(folded, job)` and
    `int8_files(net, job, calibration images)` -> (folded graph, {path: content}, notes) make the
    files; `verify(folded, written paths, images, labels, net or None)` -> Verification runs them;
    `check_graph(graph)` refuses a model early (before calibration); `runtime` and `fp32_label`
    name them in the report."""

    runtime: str
    fp32_files: Callable
    int8_files: Callable
    verify: Callable
    check_graph: Callable = lambda graph: None
    fp32_label: str | None = None


def run_export(args, config, exporter: Exporter, quantize: Callable, fold: Callable, write: Callable) -> int:
    """What every exporter tool does: check the inputs, fold BatchNorm (`fold(graph, config)` ->
    (graph, report)) or quantize (`quantize(graph, config)`) and calibrate, write the files
    atomically and, with --verify, run them. `write` receives the lines to show (progress ones
    unless --quiet, then the report). Returns the exit status: 1 when a check misses its
    tolerance, else 0."""
    say = (lambda line: None) if args.quiet else write
    job = prepare(args)
    exporter.check_graph(job.graph)
    net = None
    if args.no_int8:
        folded, report_ = fold(job.graph, config)
        files = exporter.fp32_files(folded, job)
    else:
        net = quantize(job.graph, config)
        report_ = net.report
        folded, files, notes = exporter.int8_files(net, job, calibrate(net, args, job))
        say(f"calibrated {len(net.thresholds())} int8 layers ({args.calib_mode}); float layers: "
            f"{float_layers(folded, net) or 'none'}")
        for note in notes:
            say(f"note: {note}")
    for entry in report_.for_pass("fold_bn"):
        if entry.action == "skipped":
            say(f"fold_bn skipped {entry.node}: {entry.reason}")
    written = write_files_atomic(files)
    say("wrote " + ", ".join(str(p) for p in written))
    if not args.verify:
        return 0
    images, labels = evaluation_data(args, job)
    result = exporter.verify(folded, written, images if net else images[:16], labels, net)
    for line in report(result, exporter.runtime, exporter.fp32_label):
        write(line)
    return int(not result.ok)


def report(result: Verification, runtime: str, fp32: str | None = None, fp32_images: int = 16) -> list[str]:
    """The lines --verify prints; the last one is `RUNTIME int8 top1 A, simulated top1 B, agreement C%`.
    `fp32` names the FP32 comparison (default: `fp32 RUNTIME vs MXNet`)."""
    status = "ok" if result.fp32_relative <= FP32_TOLERANCE else f"ABOVE {FP32_TOLERANCE:g}"
    lines = [f"{fp32 or f'fp32 {runtime} vs MXNet'}: max relative difference {result.fp32_relative:.2e} over "
             f"{min(result.images, fp32_images)} images ({status})"]
    if result.agreement is not None:
        lines += list(result.notes)
        lines.append(f"{runtime} int8 top1 {result.runtime_top1:.2f}, simulated top1 {result.simulated_top1:.2f}, "
                     f"agreement {result.agreement:.2f}%")
    return lines
