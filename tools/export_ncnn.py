#!/usr/bin/env python
"""Export an MXNet model to ncnn: FP32 .param/.bin, the int8 calibration table and the int8 model.

Loads MODEL-symbol.json (+ MODEL-0000.params), folds BatchNorm into the layers before it and
writes OUT.param + OUT.bin (float32). With calibration data it also simulates the int8 model
ncnn runs (int8 signed inputs, per-channel weights), calibrates the input thresholds with qgraph
and writes OUT.table (ncnn2table's format: 127/absmax weight scales, 127/threshold input scales)
and OUT-int8.param + OUT-int8.bin (what ncnn2int8 makes of the FP32 model and the table; load it
with ncnn's use_int8_inference, the default). Layers qgraph keeps in float (--exclude-first-conv
true, --exclude ...) get no table line, so ncnn runs them in float too. Calibration images are
--num-sample per class (default 20) of the CIFAR-10 training set, or --calib-data.

--verify runs the real ncnn runtime: FP32 ncnn against MXNet on a few images, then the int8 ncnn
model against qgraph's simulation over the CIFAR-10 test set (or --verify-data), and prints as
its last line: ncnn int8 top1 A, simulated top1 B, agreement C%
(exit status 1 when FP32 differs by more than 1e-4 relative or A and B by more than 0.3 point).

examples:
  python tools/export_ncnn.py models/mnist_cnn-symbol.json --out out/mnist_cnn
  python tools/export_ncnn.py models/cifar_resnet20_v1-symbol.json --out out/r20 \\
      --data-dir ../shared/data/cifar10 --verify
  python tools/export_ncnn.py model-symbol.json --out out/m --input-shape 1,3,224,224 \\
      --calib-data calib.npy --calib-mode kl
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph import data  # noqa: E402
from qgraph.cli import (add_calib_args, add_model_file_args, add_quant_args, add_recovery_args,  # noqa: E402
                        calibration_from_args, config_from_args, positive_int, recovery_from_args,
                        run_reporting_errors, shape_arg)
from qgraph.deploy import ncnn as deploy  # noqa: E402
from qgraph.io import (check_output_prefix, guess_input_shapes, model_files, model_prefix,  # noqa: E402
                       write_files_atomic)

PROG = "export_ncnn.py"
CIFAR10_PER_CLASS = 20  # calibration images per class drawn from the CIFAR-10 training set


def _shape(text: str) -> tuple:
    dims = shape_arg(text)
    if len(dims) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,32,32")
    return dims


def _option(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or value not in ("0", "1") or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=0 or FIELD=1")
    return key, value == "1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_file_args(parser, "output prefix (default: ./NAME): writes OUT.param, OUT.bin and, when "
                                "calibrating, OUT.table, OUT-int8.param, OUT-int8.bin", shape_type=_shape)
    quant = add_quant_args(parser)
    quant.description = ("ncnn's int8 is fixed: 8-bit signed inputs, 8-bit weights per output channel (or "
                         "one scale per layer). BatchNorm is always folded.")
    add_calib_args(parser)
    add_recovery_args(parser)
    parser.set_defaults(quant_type="channel", input_signed=True, merge_bn=True, exclude_first_conv=False,
                        calib_mode="entropy")
    check = parser.add_argument_group("verification with the ncnn runtime")
    check.add_argument("--data-dir", help="CIFAR-10 RecordIO folder (implies --input-shape 1,3,32,32 unless "
                                          "given): calibration images (class-balanced subset of the training "
                                          "set) when --calib-data is not given, and the test set for --verify "
                                          "(default for 3-channel models: ../shared/data/cifar10 if present)")
    check.add_argument("--no-int8", action="store_true", help="write only the FP32 ncnn model")
    check.add_argument("--verify", action="store_true",
                       help="compare FP32 ncnn with MXNet, then int8 ncnn with the simulation on the test set")
    check.add_argument("--verify-data", metavar="FILE.npz",
                       help="evaluation images and labels (arrays 'data' and 'label') instead of CIFAR-10 test")
    check.add_argument("--verify-limit", type=positive_int, default=None, metavar="N",
                       help="evaluate only the first N test images (default: all)")
    check.add_argument("--ncnn-fp16", action="store_true",
                       help="let ncnn keep float data in fp16 where the CPU allows (its default); without it "
                            "--verify runs float layers in float32, as MXNet and the simulation do")
    check.add_argument("--ncnn-option", action="append", default=[], metavar="FIELD=0|1", type=_option,
                       help="set an ncnn.Option field for --verify, e.g. use_packing_layout=0 (repeatable)")
    check.add_argument("--threads", type=positive_int, default=1, help="ncnn threads (default: 1)")
    check.add_argument("-q", "--quiet", action="store_true", help="print only errors and the result lines")
    return parser


def run(args) -> int:
    config = config_from_args(args).replace(merge_bn=True, online=False)
    if args.no_int8 and recovery_from_args(args).active:
        raise qgraph.ConfigError("--adaround and --bias-correction change the int8 model: drop --no-int8")
    if not args.no_int8:
        deploy.check_config(config)
    symbol_path, params_path = model_files(args.symbol, args.params)
    out = args.out or Path(model_prefix(symbol_path)).name
    graph = qgraph.load_files(symbol_path, params_path, input_names=[args.input_name])
    shape = args.input_shape or guess_input_shapes(graph)[args.input_name]
    data_dir = args.data_dir
    if data_dir is None and len(shape) == 4 and shape[1] == 3 and (
            (not args.no_int8 and not args.calib_data) or (args.verify and not args.verify_data)):
        data_dir = data.default_cifar10_dir()
    if data_dir is not None and not args.input_shape:
        shape = data.CIFAR10.input_shape
    graph.input_shapes = {args.input_name: tuple(shape)}
    check_output_prefix(out)
    if args.verify and not args.no_int8 and data_dir is None and not args.verify_data:
        raise qgraph.ConfigError("--verify needs test images: --data-dir (CIFAR-10) or --verify-data")
    if not args.no_int8 and not args.calib_data and data_dir is None:
        raise qgraph.ConfigError("int8 export needs calibration images: --calib-data or --data-dir (or --no-int8)")
    say = (lambda *a: None) if args.quiet else print
    net = None
    if args.no_int8:
        folded, report = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(graph, config)
        model = deploy.to_ncnn(folded, shape)
        files = {Path(f"{out}.param"): model.param, Path(f"{out}.bin"): model.bin}
    else:
        net = passes.quantize(graph, config)
        report = net.report
        images = calibration_images(args, shape, data_dir)
        calibration_from_args(args).run(net, images, progress=not args.quiet)
        recovery_from_args(args).run(net, images, progress=not args.quiet)
        export = deploy.export_int8(net, shape)
        folded, files = export.folded, export.files(out)
        floats = sorted(n for n in folded.nodes(("Convolution", "FullyConnected")) if n not in net.thresholds())
        say(f"calibrated {len(net.thresholds())} int8 layers ({args.calib_mode}); float layers: {floats or 'none'}")
    for entry in report.for_pass("fold_bn"):
        if entry.action == "skipped":
            say(f"fold_bn skipped {entry.node}: {entry.reason}")
    written = write_files_atomic(files)
    say("wrote " + ", ".join(str(p) for p in written))
    return verify(args, folded, written, net, data_dir) if args.verify else 0


def calibration_images(args, shape, data_dir):
    if args.calib_data:
        return data.load_calibration_data(args.calib_data, shape, args.mean, args.std, args.num_sample,
                                          args.fixed_random_seed)[0]
    return data.calibration_subset("cifar10", data_dir, args.num_sample or CIFAR10_PER_CLASS, args.fixed_random_seed)


def evaluation_data(args, data_dir, shape):
    """--verify-data, the CIFAR-10 test set, or (no data at all) random images for the FP32 check."""
    if args.verify_data:
        images, labels = data.load_calibration_data(args.verify_data, shape)
        if labels is None:
            raise qgraph.ConfigError(f"{args.verify_data}: --verify-data needs arrays 'data' and 'label'")
        return images[:args.verify_limit], labels[:args.verify_limit]
    if data_dir is not None:
        return data.cifar10_arrays(data_dir, "test", limit=args.verify_limit)
    return np.random.default_rng(0).standard_normal((16,) + tuple(shape[1:])).astype("f4"), None


def verify(args, folded, written, net, data_dir) -> int:
    """Print the FP32 and int8 checks; 1 when either misses its tolerance, else 0."""
    images, labels = evaluation_data(args, data_dir, folded.input_shapes[args.input_name])
    options = dict({} if args.ncnn_fp16 else deploy.FLOAT32_OPTIONS, **dict(args.ncnn_option))
    bar = None if args.quiet else (lambda items: tqdm(items, desc="ncnn int8", leave=False))
    result = deploy.verify(folded, written[:2], images if net else images[:16], labels, net,
                           written[3:5] if net else None, args.input_name, options, args.threads, progress=bar)
    status = "ok" if result.fp32_relative <= deploy.FP32_TOLERANCE else f"ABOVE {deploy.FP32_TOLERANCE:g}"
    print(f"fp32 ncnn vs MXNet: max relative difference {result.fp32_relative:.2e} over "
          f"{min(result.images, 16)} images ({status})")
    if net is not None:
        print(f"ncnn int8 top1 {result.ncnn_top1:.2f}, simulated top1 {result.simulated_top1:.2f}, "
              f"agreement {result.agreement:.2f}%")
    return int(not result.ok)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_reporting_errors(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
