#!/usr/bin/env python
"""Which layer costs the accuracy, and the cheapest mix of bit widths that keeps it: a report.

Quantizes MODEL as the quantization flags say and writes into --out: index.md (the per-layer
sensitivity table, the chosen mixed-precision config and its figures), sensitivity.json,
search.json, layer_config.json (the chosen mix, for --layer-config) and PNG plots: per-layer
sensitivity bars, per-layer SQNR, each quantized input's histogram with the threshold every
calibration method picks, per-output-channel weight ranges before and after BatchNorm folding,
and top-1 against weight bits.

Sensitivity and the search run on held-out training images (--holdout-per-class per class,
none of them calibration images); the test split is only used at the end, to report the top-1
of FP32, the config and the chosen mix, and whether the held-out target still holds there.
Input thresholds are each batch's maximum unless --calib-mode calibrates them offline on
--num-sample images per class of the training split.

examples:
  python tools/analyze_quantization.py mobilenet0.5_cifar10 --dataset cifar10 --weight-bits-width 4 \\
      --input-bits-width 4 --quant-type channel --merge-bn --calib-mode naive --num-sample 100 --out report/
  python tools/analyze_quantization.py cifar_resnet20_v1 --dataset cifar10 --exclude-first-conv false --no-search \\
      --out report_r20/
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
from qgraph import ConfigError, analysis, data, models  # noqa: E402
from qgraph.analysis.sweeps import SWEEPS  # noqa: E402
from qgraph.cli import (add_calib_args, add_quant_args, calibration_from_args, config_from_args,  # noqa: E402
                        positive_int, run_reporting_errors)
from qgraph.io import check_output_prefix  # noqa: E402

PROG = "analyze_quantization.py"


def _candidates(text: str) -> tuple:
    try:
        return tuple(None if v.strip() == "float" else int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 4,8,float") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="a shipped or zoo model name (cifar_resnet20_v1, "
                                                       "mobilenet0.5_cifar10, ...) or an exported PREFIX-symbol.json")
    parser.add_argument("--params", help="weights for MODEL (default: beside the symbol, or models/ for a name)")
    parser.add_argument("--dataset", choices=tuple(data.DATASETS), default="cifar10", help="(default: cifar10)")
    parser.add_argument("--data-dir", help="RecordIO folder (default: ../shared/data/cifar10)")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder (made when the report is written)")
    add_quant_args(parser)
    add_calib_args(parser)
    parser.set_defaults(num_sample=5)
    analysis_args = parser.add_argument_group("analysis")
    analysis_args.add_argument("--holdout-per-class", type=positive_int, default=500, metavar="N",
                               help="held-out training images per class for the search (default: 500)")
    analysis_args.add_argument("--sensitivity-images", type=positive_int, default=1000, metavar="N",
                               help="held-out images the sensitivity sweeps use (default: 1000)")
    analysis_args.add_argument("--sweeps", default=",".join(SWEEPS),
                               help=f"comma-separated sensitivity sweeps (default: {','.join(SWEEPS)})")
    analysis_args.add_argument("--max-drop", type=float, default=1.0,
                               help="top-1 points the mixed config may lose on held-out data (default: 1.0)")
    analysis_args.add_argument("--candidates", type=_candidates, default=(4, 8, None), metavar="4,8,float",
                               help="per-layer levels the search chooses from (default: 4,8,float)")
    analysis_args.add_argument("--no-search", action="store_true", help="sensitivity, histograms and ranges only")
    analysis_args.add_argument("--num-eval", type=positive_int, metavar="N",
                               help="test images for the final figures, spread over the split (default: all)")
    analysis_args.add_argument("--batch-size", type=positive_int, default=128, help="(default: 128)")
    analysis_args.add_argument("-q", "--quiet", action="store_true", help="print only the summary and errors")
    return parser


def run(args) -> int:
    if args.calib_data:
        raise ConfigError("--calib-data: the report calibrates on --num-sample training images per class")
    check_output_prefix(Path(args.out) / "index.md")
    info = data.dataset_info(args.dataset)
    exported = args.model.endswith(".json") or Path(f"{args.model}-symbol.json").is_file()
    graph = models.load_model(None if exported else args.model, args.model if exported else None, args.params,
                              info.input_shape, args.dataset, info.classes)
    offline = bool(args.calib_mode or args.quantize_input_offline)
    config = config_from_args(args).replace(online=not offline)
    calib = data.calibration_subset(args.dataset, args.data_dir, args.num_sample, args.fixed_random_seed)
    holdout = data.holdout_subset(args.dataset, args.data_dir, args.holdout_per_class, args.num_sample,
                                  args.fixed_random_seed)
    test = data.eval_set(args.dataset, args.data_dir, args.num_eval)
    result = analysis.analyze(
        graph, config, calib, holdout, test, quantize=passes.quantize,
        calibration=calibration_from_args(args) if offline else None, name=Path(args.model).name,
        sensitivity_images=args.sensitivity_images, max_drop=None if args.no_search else args.max_drop,
        candidates=args.candidates, sweeps=tuple(s for s in args.sweeps.split(",") if s),
        batch_size=args.batch_size, progress=not args.quiet)
    written = result.write(args.out)
    ranked = result.sensitivity.ranked()
    print("most sensitive layers: " + ", ".join(f"{r.layer} ({r.score:.2f})" for r in ranked[:3]))
    test_top1 = {key: f"{100 * acc.top1:.2f}%" for key, acc in result.test.items()}
    print("test top-1: " + ", ".join(f"{key} {value}" for key, value in test_top1.items()))
    if result.search is not None:
        search = result.search
        print(f"chosen mix: held-out {100 * search.top1:.2f}% (drop {search.drop:.2f}), weight bits "
              f"{search.weight_bits:,} vs {search.int8_weight_bits:,} at int8, "
              f"{100 * search.share_at(min(b for b in args.candidates if b)):.1f}% of weights at the lowest width")
        print(f"target {args.max_drop:g} points on the test split: "
              f"{'holds' if result.target_holds_on_test() else 'does not hold'}")
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_reporting_errors(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
