#!/usr/bin/env python
"""Rewrite an exported MXNet model with qgraph passes and save the result.

Loads MODEL-symbol.json (+ MODEL-0000.params), runs the pass pipeline, writes
PREFIX-symbol.json + PREFIX-0000.params atomically and prints what each pass
changed or skipped. By default the pipeline is the one the quantization flags ask
for (fold_bn with --merge-bn, exclude, insert_fake_quant); --passes picks passes
by name instead. The output uses stock MXNet operators only: SymbolBlock.imports
loads it, qgraph.QuantizedNet.load brings it back with its modes.

examples:
  python tools/quantize_symbol.py models/mnist_cnn-symbol.json --quant-type channel --out out/mnist_int8
  python tools/quantize_symbol.py model-symbol.json --weight-bits-width 4 --input-signed auto --dump-graph dumps/
  python tools/quantize_symbol.py models/mnist_cnn-symbol.json --passes fold_bn --out out/mnist_folded
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph.cli import (add_calib_args, add_model_file_args, add_quant_args, add_recovery_args,  # noqa: E402
                        calibration_from_args, config_from_args, recovery_from_args, run_reporting_errors)
from qgraph.data import load_calibration_data  # noqa: E402
from qgraph.io import check_output_prefix, guess_input_shapes, model_files, write_atomic  # noqa: E402
from qgraph.quantizer import fake_quant_specs  # noqa: E402

PROG = "quantize_symbol.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_file_args(parser, "output prefix (default: ./NAME-qgraph); writes OUT-symbol.json and OUT-0000.params",
                        "input shape, used to verify parameter shapes (default: guessed from the first layer)")
    pipeline = parser.add_argument_group("pipeline")
    pipeline.add_argument("--passes", default=None,
                          help="comma-separated passes to run in order, e.g. fold_bn (default: the "
                               "quantization pipeline the flags below describe); see --list-passes")
    pipeline.add_argument("--list-passes", action="store_true", help="list the available passes and exit")
    pipeline.add_argument("--no-verify", action="store_true",
                          help="do not run Graph.verify() before the first and after each pass")
    add_quant_args(parser)
    add_calib_args(parser)
    add_recovery_args(parser)
    diagnostics = parser.add_argument_group("diagnostics")
    diagnostics.add_argument("--dump-graph", metavar="DIR",
                             help="write the graph after each pass as DIR/NN_pass.dot (+ .svg when "
                                  "graphviz is installed), inserted/changed nodes highlighted; with --calib-mode "
                                  "also NN_calibrated, thresholds in the labels")
    diagnostics.add_argument("--dump-format", default="svg",
                             help="comma-separated graphviz formats for --dump-graph (default: svg)")
    diagnostics.add_argument("--dump-detail", choices=("collapsed", "full"), default="collapsed",
                             help="collapsed: each fake-quant subgraph as one node labelled with its kind, bits, "
                                  "granularity, sign and threshold; full: every node (default: collapsed)")
    diagnostics.add_argument("--report", metavar="FILE.json",
                             help="write the input thresholds (layer -> threshold, method, bits, signed) as JSON")
    diagnostics.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return parser


def default_out(symbol: str) -> str:
    name = Path(symbol).name
    name = name[: -len("-symbol.json")] if name.endswith("-symbol.json") else Path(name).stem
    return f"{name}-qgraph"


def run(args) -> int:
    recovery = recovery_from_args(args)
    if args.calib_mode:
        args.quantize_input_offline = True
    if (args.calib_mode or recovery.active) and not args.calib_data:
        raise qgraph.ConfigError(f"--{'calib-mode' if args.calib_mode else 'adaround/--bias-correction'} needs "
                                 "--calib-data")
    config = config_from_args(args)
    pipeline = passes.build_pipeline(args.passes) if args.passes else passes.default_pipeline(config)
    symbol_path, params_path = model_files(args.symbol, args.params)
    out = args.out or default_out(args.symbol)
    out_files = {Path(f"{out}-symbol.json").resolve(), Path(f"{out}-0000.params").resolve()}
    if {symbol_path.resolve(), params_path.resolve()} & out_files:
        raise qgraph.ConfigError(f"--out {out} would overwrite the input files; choose another prefix")
    graph = qgraph.load_files(symbol_path, params_path, input_names=[args.input_name])
    if args.input_shape:
        graph.input_shapes = {args.input_name: args.input_shape}
    elif not args.no_verify:
        graph.input_shapes = guess_input_shapes(graph)
    check_output_prefix(out)
    instruments = [qgraph.TimingInstrument()]
    dumps = None
    if args.dump_graph:
        dumps = qgraph.DumpInstrument(args.dump_graph, formats=args.dump_format.split(","), detail=args.dump_detail)
        instruments.append(dumps)
    result, report = qgraph.PassManager(pipeline, instruments, verify=not args.no_verify).run(graph, config)
    thresholds = recovered = None
    if (args.calib_mode or recovery.active) and fake_quant_specs(result):
        net = qgraph.QuantizedNet(result)
        shape = graph.input_shapes.get(args.input_name) or args.input_shape
        if shape is None:
            raise qgraph.ConfigError("cannot tell the input shape for reading calibration images; pass --input-shape")
        images, _ = load_calibration_data(args.calib_data, shape, args.mean, args.std, args.num_sample,
                                          args.fixed_random_seed)
        if args.calib_mode:
            thresholds = calibration_from_args(args).run(net, images, progress=not args.quiet)
        recovered = recovery.run(net, images, progress=not args.quiet)
        written = net.export(out)
        if dumps is not None:
            dumps.dump(net.current_graph(), "calibrated")
    else:
        written = qgraph.save(result, out)
    if args.report:
        write_atomic(args.report, json.dumps({"calibration": thresholds or {}, "recovery": recovered or {},
                                              "passes": [e._asdict() for e in report.entries]}, indent=2))
    if not args.quiet:
        print(report.format())
        if thresholds:
            print(f"calibrated {len(thresholds)} input thresholds ({args.calib_mode})")
        for method, done in (recovered or {}).items():
            print(f"{method}: {len(done['layers'])} layers in {done['seconds']:.1f} s")
        print(f"nodes: {len(graph)} -> {len(result)}; wrote {written[0]} and {written[1]}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if "--list-passes" in argv:
        for name, cls in sorted(passes.PASSES.items()):
            print(f"{name:20s} {(cls.__module__ and sys.modules[cls.__module__].__doc__ or '').splitlines()[0]}")
        return 0
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_reporting_errors(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
