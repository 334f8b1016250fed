#!/usr/bin/env python
"""Export an MXNet model to ONNX: the int8 QDQ model ONNX Runtime, TensorRT and OpenVINO read, and its FP32 twin.

Loads MODEL-symbol.json (+ MODEL-0000.params), folds BatchNorm into the layers before it,
simulates the int8 model (8-bit per-channel weights, int8 signed inputs by default, rounding
half to even as QuantizeLinear does, int32 biases as ONNX Runtime adds them), calibrates the
input thresholds with qgraph and writes OUT.onnx: the float graph with a QuantizeLinear/
DequantizeLinear pair on every input qgraph quantizes (scale threshold/127, or /255 for uint8
with --input-signed false|auto; zero point 0), int8 weights with DequantizeLinear per output
channel (axis 0) and int32 biases. OUT-fp32.onnx is the float model. Layers qgraph keeps in
float (--exclude-first-conv true, --exclude ...) stay float. Calibration images are
--num-sample per class (default 20) of the CIFAR-10 training set, or --calib-data.

--verify runs ONNX Runtime (every graph optimisation on, session.qdqisint8allowed=1 when inputs
are int8): FP32 ONNX against MXNet on a few images, then the int8 model against qgraph's
simulation over the CIFAR-10 test set (or --verify-data), and counts the convolutions the
optimised model runs as QLinearConv. Its last line is:
onnxruntime int8 top1 A, simulated top1 B, agreement C%
(exit status 1 when FP32 differs by more than 1e-4 relative or A and B by more than 0.3 point).

examples:
  python tools/export_onnx.py models/mobilenet0.5_cifar10-symbol.json --out out/mobilenet \\
      --data-dir ../shared/data/cifar10 --verify
  python tools/export_onnx.py model-symbol.json --out out/m --input-shape 1,3,224,224 \\
      --calib-data calib.npy --input-signed auto
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph.cli import config_from_args, positive_int, run_reporting_errors  # noqa: E402
from qgraph.deploy import onnx as deploy  # noqa: E402
from qgraph.deploy import workflow  # noqa: E402

PROG = "export_onnx.py"


def build_parser():
    parser, quant, check = workflow.export_parser(
        PROG, __doc__, "output prefix (default: ./NAME): writes OUT.onnx (int8 QDQ) and OUT-fp32.onnx", "onnxruntime")
    quant.description = ("QDQ int8: 8-bit weights per output channel (or per layer), 8-bit inputs, int8 by "
                         "default (--input-signed auto: uint8 after ReLUs), rounding half to even, int32 "
                         "biases. BatchNorm is always folded.")
    parser.set_defaults(rounding="half_even")
    check.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime threads (default: 1)")
    return parser


def run(args) -> int:
    config = config_from_args(args).replace(merge_bn=True, online=False)
    if not args.no_int8:
        deploy.check_config(config)
        config = config.replace(quantize_bias=True)  # ONNX Runtime fuses int8 layers with int32 biases
    deploy.require("onnx")
    if args.verify:
        try:
            deploy.require("onnxruntime")
        except qgraph.ConfigError as err:
            raise qgraph.ConfigError(f"--verify runs ONNX Runtime: {err}") from None

    def fp32_files(folded, job):
        return {Path(f"{job.out}-fp32.onnx"): deploy.export_fp32(folded, job.shape)}

    def int8_files(net, job, _):
        export = deploy.export_int8(net, job.shape)
        return export.folded, export.files(job.out), []

    def verify(folded, written, images, labels, net):  # written: OUT-fp32.onnx alone, or OUT.onnx and it
        return deploy.verify(folded, written[-1], images, labels, net, written[0] if net else None, args.threads)

    fold = qgraph.PassManager(passes.build_pipeline("fold_bn")).run
    exporter = workflow.Exporter("onnxruntime", fp32_files, int8_files, verify, check_graph=deploy.check_ops)
    return workflow.run_export(args, config, exporter, passes.quantize, fold, print)


def main(argv=None) -> int:
    return run_reporting_errors(PROG, run, build_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
