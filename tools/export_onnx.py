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

import argparse
import logging
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
from qgraph.io import write_files_atomic  # noqa: E402

PROG = "export_onnx.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    quant, check = workflow.add_export_args(
        parser, "output prefix (default: ./NAME): writes OUT.onnx (int8 QDQ) and OUT-fp32.onnx", "onnxruntime")
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
    job = workflow.prepare(args)
    deploy.check_ops(job.graph)
    say = (lambda *a: None) if args.quiet else print
    net = None
    if args.no_int8:
        folded, _ = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(job.graph, config)
        files = {Path(f"{job.out}-fp32.onnx"): deploy.export_fp32(folded, job.shape)}
    else:
        net = passes.quantize(job.graph, config)
        workflow.calibrate(net, args, job)
        export = deploy.export_int8(net, job.shape)
        folded, files = export.folded, export.files(job.out)
        say(f"calibrated {len(net.thresholds())} int8 layers ({args.calib_mode}); float layers: "
            f"{workflow.float_layers(folded, net) or 'none'}")
    written = write_files_atomic(files)
    say("wrote " + ", ".join(str(p) for p in written))
    if not args.verify:
        return 0
    images, labels = workflow.evaluation_data(args, job)
    fp32_file, int8_file = (written[0], None) if net is None else (written[1], written[0])
    result = deploy.verify(folded, fp32_file, images if net else images[:16], labels, net, int8_file, args.threads)
    print("\n".join(workflow.report(result, "onnxruntime")))
    return int(not result.ok)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_reporting_errors(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
