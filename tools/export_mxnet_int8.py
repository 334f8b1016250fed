#!/usr/bin/env python
"""Export an MXNet model as MXNet's own int8 model (oneDNN), quantized with qgraph's thresholds.

Loads MODEL-symbol.json (+ MODEL-0000.params), folds BatchNorm into the layers before it,
simulates the int8 model MXNet's oneDNN backend runs (8-bit per-channel weights, uint8 inputs
after ReLUs and int8 elsewhere, rounding half to even, int32 biases), calibrates the input
thresholds with qgraph and hands them to MXNet's quantization flow (MKLDNN_QUANTIZE fusion,
quantize_graph, calib_graph with a custom collector, fusion again), mapping each tensor MXNet
asks a range for through oneDNN's fused nodes back to the layers that read it. Writes
OUT-symbol.json + OUT-0000.params, the int8 model to deploy: load it with
mx.sym.load + simple_bind, or mx.gluon.SymbolBlock.imports. Calibration images are
--num-sample per class (default 20) of the CIFAR-10 training set, or --calib-data.

--verify runs MXNet: its executor on the FP32 graph against Gluon on a few images, then the int8
model against qgraph's simulation over the CIFAR-10 test set (or --verify-data), and prints as
its last line: mxnet int8 top1 A, simulated top1 B, agreement C%
(exit status 1 when FP32 differs by more than 1e-4 relative or A and B by more than 0.3 point).
Where MXNet's arithmetic differs from the simulation, and how much, is in README.md.

examples:
  python tools/export_mxnet_int8.py models/cifar_resnet20_v1-symbol.json --out out/r20-int8 \\
      --data-dir ../shared/data/cifar10 --verify
  python tools/export_mxnet_int8.py model-symbol.json --out out/m-int8 --input-shape 1,3,224,224 \\
      --calib-data calib.npy
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph.cli import config_from_args, run_reporting_errors  # noqa: E402
from qgraph.deploy import mxnet_int8 as deploy  # noqa: E402
from qgraph.deploy import workflow  # noqa: E402
from qgraph.io import model_prefix  # noqa: E402

PROG = "export_mxnet_int8.py"


def build_parser():
    parser, quant, _ = workflow.export_parser(
        PROG, __doc__, "output prefix (default: ./NAME-int8): writes OUT-symbol.json and OUT-0000.params (with "
                       "--no-int8, the folded FP32 model)", "MXNet (oneDNN)")
    quant.description = ("MXNet's oneDNN int8: 8-bit weights per output channel, uint8 inputs after ReLUs and "
                         "int8 elsewhere (--input-signed auto), rounding half to even, int32 biases. BatchNorm is "
                         "always folded.")
    parser.set_defaults(input_signed="auto", rounding="half_even")
    return parser


def run(args) -> int:
    config = config_from_args(args).replace(merge_bn=True, online=False)
    if not args.no_int8:
        deploy.check_config(config)
        config = config.replace(quantize_bias=True)  # oneDNN adds int32 biases
    args.out = args.out or Path(model_prefix(args.symbol)).name + "-int8"

    def int8_files(net, job, images):
        model = deploy.convert(net, images)
        return net.current_float_graph().cleanup(), model.files(job.out), model.notes

    exporter = workflow.Exporter(
        "mxnet", lambda folded, job: deploy.fp32_files(folded, job.out), int8_files,
        lambda folded, written, images, labels, net: deploy.verify(folded, args.out, images, labels, net),
        fp32_label="fp32 MXNet executor (oneDNN fusion) vs Gluon")
    return workflow.run_export(args, config, exporter, passes.quantize,
                               qgraph.PassManager(passes.build_pipeline("fold_bn")).run, print)


def main(argv=None) -> int:
    return run_reporting_errors(PROG, run, build_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
