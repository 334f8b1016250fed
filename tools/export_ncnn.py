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

from tqdm import tqdm  # noqa: E402

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph.cli import config_from_args, positive_int, run_reporting_errors  # noqa: E402
from qgraph.deploy import ncnn as deploy  # noqa: E402
from qgraph.deploy import workflow  # noqa: E402

PROG = "export_ncnn.py"


def _option(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or value not in ("0", "1") or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=0 or FIELD=1")
    return key, value == "1"


def build_parser():
    parser, quant, check = workflow.export_parser(
        PROG, __doc__, "output prefix (default: ./NAME): writes OUT.param, OUT.bin and, when calibrating, "
                       "OUT.table, OUT-int8.param, OUT-int8.bin", "ncnn")
    quant.description = ("ncnn's int8 is fixed: 8-bit signed inputs, 8-bit weights per output channel (or "
                         "one scale per layer). BatchNorm is always folded.")
    check.add_argument("--ncnn-fp16", action="store_true",
                       help="let ncnn keep float data in fp16 where the CPU allows (its default); without it "
                            "--verify runs float layers in float32, as MXNet and the simulation do")
    check.add_argument("--ncnn-option", action="append", default=[], metavar="FIELD=0|1", type=_option,
                       help="set an ncnn.Option field for --verify, e.g. use_packing_layout=0 (repeatable)")
    check.add_argument("--threads", type=positive_int, default=1, help="ncnn threads (default: 1)")
    return parser


def run(args) -> int:
    config = config_from_args(args).replace(merge_bn=True, online=False)
    if not args.no_int8:
        deploy.check_config(config)
    options = dict({} if args.ncnn_fp16 else deploy.FLOAT32_OPTIONS, **dict(args.ncnn_option))
    bar = None if args.quiet else (lambda items: tqdm(items, desc="ncnn int8", leave=False))

    def fp32_files(folded, job):
        model = deploy.to_ncnn(folded, job.shape)
        return {Path(f"{job.out}.param"): model.param, Path(f"{job.out}.bin"): model.bin}

    def int8_files(net, job, _):
        export = deploy.export_int8(net, job.shape)
        return export.folded, export.files(job.out), []

    def verify(folded, written, images, labels, net):
        return deploy.verify(folded, written[:2], images, labels, net, written[3:5] if net else None,
                             args.input_name, options, args.threads, progress=bar)

    exporter = workflow.Exporter("ncnn", fp32_files, int8_files, verify)
    return workflow.run_export(args, config, exporter, passes.quantize,
                               qgraph.PassManager(passes.build_pipeline("fold_bn")).run, print)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_reporting_errors(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
