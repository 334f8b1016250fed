#!/usr/bin/env python
"""Export an MXNet model to ncnn: FP32 .param/.bin, the int8 calibration table and the int8 model.

Loads MODEL-symbol.json (+ MODEL-0000.params), folds BatchNorm into the layers before it and
writes OUT.param + OUT.bin (float32). With calibration data it also simulates the int8 model
ncnn runs (int8 signed inputs, per-channel weights), calibrates the input thresholds with qgraph
and writes OUT.table (ncnn2table's format: 127/absmax weight scales, 127/threshold input scales)
and OUT-int8.param + OUT-int8.bin (what ncnn2int8 makes of the FP32 model and the table; load it
with ncnn's use_int8_inference, the default). Layers qgraph keeps in float (--exclude-first-conv
true, --exclude ...) get no table line, so ncnn runs them in float too.

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

from qgraph.cli import (add_calib_args, add_model_file_args, add_quant_args, config_from_args,  # noqa: E402
                        run_reporting_errors, shape_arg)

PROG = "export_ncnn.py"
FP32_CHECK_IMAGES = 16
FP32_TOLERANCE = 1e-4
TOP1_TOLERANCE = 0.3  # points of top-1 between ncnn int8 and the simulation
CIFAR10_SHAPE = (1, 3, 32, 32)
CIFAR10_PER_CLASS = 20  # calibration images per class drawn from the CIFAR-10 training set


def _shape(text: str) -> tuple:
    dims = shape_arg(text)
    if len(dims) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,32,32")
    return dims


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


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
    check.add_argument("--verify-limit", type=_positive, default=None, metavar="N",
                       help="evaluate only the first N test images (default: all)")
    check.add_argument("--ncnn-fp16", action="store_true",
                       help="let ncnn keep float data in fp16 where the CPU allows (its default); without it "
                            "--verify runs float layers in float32, as MXNet and the simulation do")
    check.add_argument("--ncnn-option", action="append", default=[], metavar="FIELD=0|1", type=_option,
                       help="set an ncnn.Option field for --verify, e.g. use_packing_layout=0 (repeatable)")
    check.add_argument("--threads", type=_positive, default=1, help="ncnn threads (default: 1)")
    check.add_argument("-q", "--quiet", action="store_true", help="print only errors and the result lines")
    return parser


def check_ncnn_config(config) -> None:
    """Refuse simulation settings ncnn's int8 kernels cannot run."""
    from qgraph.errors import ConfigError

    if config.weight_bits != 8 or config.input_bits != 8:
        raise ConfigError("ncnn int8 uses 8-bit weights and inputs: drop --weight-bits-width/--input-bits-width")
    if config.input_signed is not True:
        raise ConfigError("ncnn quantizes inputs as signed int8: use --input-signed true")
    if config.quant_type not in ("channel", "layer"):
        raise ConfigError("ncnn's table holds a weight scale per output channel: use --quant-type channel or layer")
    if not config.quantize_input:
        raise ConfigError("ncnn int8 quantizes every int8 layer's input: drop --no-quantize-input")
    if getattr(config, "winograd", "none") != "none":
        # measured: ncnn's int8 Winograd F(4,3) gives the same outputs as its direct int8
        # convolution, so it quantizes in the spatial domain, not the Winograd domain
        raise ConfigError("ncnn quantizes 3x3 convolutions in the spatial domain: drop --wino-quantize")


def _bar(progress: bool, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, leave=False)


def run(args) -> int:
    import passes
    import qgraph
    from qgraph.deploy import ncnn as deploy
    from qgraph.io import ensure_writable_folder, guess_input_shapes, symbol_and_params_paths

    config = config_from_args(args).replace(merge_bn=True, online=False)
    if not args.no_int8:
        check_ncnn_config(config)
    symbol_path, params_path = symbol_and_params_paths(args.symbol, args.params)
    if not symbol_path.is_file():
        raise qgraph.GraphError(f"{symbol_path}: no such symbol file")
    if params_path is None:
        raise qgraph.GraphError(f"{symbol_path}: no params file beside it; pass --params")
    name = symbol_path.name[: -len("-symbol.json")] if symbol_path.name.endswith("-symbol.json") else symbol_path.stem
    out = args.out or name
    ensure_writable_folder(out)
    graph = qgraph.load_files(symbol_path, params_path, input_names=[args.input_name])
    shape = args.input_shape or guess_input_shapes(graph)[args.input_name]
    data_dir = args.data_dir
    needs_data = (not args.no_int8 and not args.calib_data) or (args.verify and not args.verify_data)
    if data_dir is None and needs_data and len(shape) == 4 and shape[1] == 3:
        from qgraph.data import default_cifar10_dir

        data_dir = default_cifar10_dir()
    if data_dir is not None and not args.input_shape:
        shape = CIFAR10_SHAPE
    graph.input_shapes = {args.input_name: tuple(shape)}
    if args.verify and not args.no_int8 and data_dir is None and not args.verify_data:
        raise qgraph.ConfigError("--verify needs test images: --data-dir (CIFAR-10) or --verify-data")
    if not args.no_int8 and not args.calib_data and data_dir is None:
        raise qgraph.ConfigError("int8 export needs calibration images: --calib-data or --data-dir (or --no-int8)")
    folded, report = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(graph, config)
    say = (lambda *a: None) if args.quiet else print
    for entry in report.entries:
        if entry.action == "skipped":
            say(f"fold_bn skipped {entry.node}: {entry.reason}")
    fp32 = deploy.to_ncnn(folded, shape)
    files = {Path(f"{out}.param"): fp32.param.encode(), Path(f"{out}.bin"): fp32.bin}

    net = None
    if not args.no_int8:
        net = qgraph.quantize(folded, config)
        images = calibration_images(args, shape, data_dir)
        net.calibrate(images, args.calib_mode, calib_epoch=args.calib_epoch, batch_size=args.calib_batch_size,
                      percentile=args.percentile, progress=not args.quiet)
        text = deploy.calibration_table(folded, net.thresholds(), config.quant_type).format()
        # ncnn2int8 reads the scales back from the printed table, so the int8 model does too
        table = deploy.Table.parse(text)
        int8 = deploy.to_ncnn(folded, shape, table)
        files.update({Path(f"{out}.table"): text.encode(), Path(f"{out}-int8.param"): int8.param.encode(),
                      Path(f"{out}-int8.bin"): int8.bin})
        floats = sorted(n for n in folded.nodes(("Convolution", "FullyConnected")) if n not in table.inputs)
        say(f"calibrated {len(table.inputs)} int8 layers ({args.calib_mode}); float layers: {floats or 'none'}")
    written = deploy.write_files_atomic(files)
    say("wrote " + ", ".join(str(p) for p in written))
    outputs = {"fp32": written[:2], "int8": written[3:5]}
    return verify(args, folded, fp32, outputs, net, data_dir) if args.verify else 0


def calibration_images(args, shape, data_dir):
    import numpy as np

    from qgraph.data import cifar10_arrays, class_balanced_subset, load_calibration_data

    if args.calib_data:
        images, _ = load_calibration_data(args.calib_data, shape, args.mean, args.std, args.num_sample,
                                          args.fixed_random_seed)
        return images
    # the training .rec is shuffled, so its first 5,000 images hold every class
    images, labels = cifar10_arrays(data_dir, "train", limit=5000)
    keep = class_balanced_subset(labels, args.num_sample or CIFAR10_PER_CLASS, args.fixed_random_seed)
    return np.ascontiguousarray(images[keep])


def evaluation_data(args, data_dir):
    import numpy as np

    from qgraph.errors import ConfigError

    if args.verify_data:
        path = Path(args.verify_data)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such evaluation file")
        archive = np.load(path)
        if "data" not in archive or "label" not in archive:
            raise ConfigError(f"{path}: expected arrays 'data' and 'label'; found {list(archive)}")
        images, labels = archive["data"].astype(np.float32), archive["label"].astype(np.int64)
        return images[:args.verify_limit], labels[:args.verify_limit]
    from qgraph.data import cifar10_arrays

    return cifar10_arrays(data_dir, "test", limit=args.verify_limit)


def verify(args, folded, fp32, outputs, net, data_dir) -> int:
    """Print the FP32 and int8 checks; 1 when FP32 is off by more than FP32_TOLERANCE or the
    int8 top-1 accuracies differ by more than TOP1_TOLERANCE points, else 0."""
    import mxnet as mx
    import numpy as np

    from qgraph.deploy import ncnn as deploy

    if net is None and (args.verify_data or data_dir is not None):
        args.verify_limit = min(args.verify_limit or FP32_CHECK_IMAGES, FP32_CHECK_IMAGES)
    if args.verify_data or data_dir is not None:
        images, labels = evaluation_data(args, data_dir)
    else:
        shape = folded.input_shapes[args.input_name]
        images, labels = np.random.default_rng(0).standard_normal((FP32_CHECK_IMAGES,) + shape[1:]).astype("f4"), None
    sample = images[:FP32_CHECK_IMAGES]
    options = dict({} if args.ncnn_fp16 else deploy.FLOAT32_OPTIONS, **dict(args.ncnn_option))
    runner = deploy.NcnnRunner(*outputs["fp32"], input_name=args.input_name, output_name=fp32.outputs[0],
                               num_threads=args.threads, options=options)
    ours, ref = runner(sample), folded.to_block()(mx.nd.array(sample)).asnumpy()
    relative = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))
    status = "ok" if relative <= FP32_TOLERANCE else f"ABOVE {FP32_TOLERANCE:g}"
    print(f"fp32 ncnn vs MXNet: max relative difference {relative:.2e} over {len(sample)} images ({status})")
    if net is None:
        return int(relative > FP32_TOLERANCE)
    int8 = deploy.NcnnRunner(*outputs["int8"], input_name=args.input_name, output_name=fp32.outputs[0],
                             num_threads=args.threads, options=dict(options, use_int8_inference=True))
    ncnn_top = int8(images, progress=_bar(not args.quiet, "ncnn int8")).reshape(len(images), -1).argmax(1)
    sim_top = np.concatenate([net(mx.nd.array(images[i:i + 256])).asnumpy().reshape(len(images[i:i + 256]), -1)
                              for i in range(0, len(images), 256)]).argmax(1)
    agreement = 100.0 * float((ncnn_top == sim_top).mean())
    ncnn_acc, sim_acc = 100 * float((ncnn_top == labels).mean()), 100 * float((sim_top == labels).mean())
    print(f"ncnn int8 top1 {ncnn_acc:.2f}, simulated top1 {sim_acc:.2f}, agreement {agreement:.2f}%")
    return int(relative > FP32_TOLERANCE or abs(ncnn_acc - sim_acc) > TOP1_TOLERANCE)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_reporting_errors(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
