"""Command-line flags shared by the tools: the quantization options and how they become a QuantConfig.

The flag names follow the seed's simulate_quantization.py, so the same options read
the same in every qgraph tool.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from . import recovery
from .calibrate import MODES, Calibration
from .config import QuantConfig
from .distributed import KVSTORES
from .errors import ConfigError, QGraphError


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _signed(text: str):
    return "auto" if text.strip().lower() == "auto" else _bool(text)


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"{value} is outside 2..16")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def shape_arg(text: str) -> tuple:
    """An input shape flag: 1,3,32,32 (or 1x3x32x32)."""
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,32,32") from None
    if not dims or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,32,32")
    return dims


def add_model_file_args(parser: argparse.ArgumentParser, out_help: str,
                        shape_help: str = "input shape (default: guessed from the first layer)", shape_type=shape_arg):
    """The exported model's files and input, as one argument group."""
    files = parser.add_argument_group("model files")
    files.add_argument("symbol", help="exported symbol file, PREFIX-symbol.json")
    files.add_argument("--params", help="parameters file (default: PREFIX-0000.params beside the symbol)")
    files.add_argument("--out", help=out_help)
    files.add_argument("--input-name", default="data", help="name of the data input variable (default: data)")
    files.add_argument("--input-shape", type=shape_type, metavar="N,C,H,W", help=shape_help)
    return files


def add_quant_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The quantization flags, as one argument group."""
    group = parser.add_argument_group("quantization")
    group.add_argument("--weight-bits-width", type=_bits, default=8, metavar="B",
                       help="weight bits, 2..16 (default: 8)")
    group.add_argument("--quant-type", choices=("layer", "group", "channel"), default="layer",
                       help="weight scale per layer, per group or per output channel (default: layer)")
    group.add_argument("--input-signed", type=_signed, default=False, metavar="{false,true,auto}",
                       help="quantize inputs as signed ints; auto = unsigned only after ReLU-like producers "
                            "(default: false, one-sided uint as in the seed)")
    group.add_argument("--input-bits-width", type=_bits, default=8, metavar="B", help="input bits, 2..16 (default: 8)")
    group.add_argument("--no-quantize-input", action="store_true", help="quantize weights only")
    group.add_argument("--quantize-input-offline", action="store_true",
                       help="use stored (calibrated) input thresholds instead of each batch's maximum")
    group.add_argument("--online-stat", choices=("max", "mean_max"), default="max",
                       help="online threshold: batch max, or the seed's mean of per-sample maxima (default: max)")
    group.add_argument("--merge-bn", action="store_true", help="fold BatchNorm into the layers first")
    group.add_argument("--exclude-first-conv", type=_bool, default=True, metavar="{true,false}",
                       help="keep the first convolution in float (default: true)")
    group.add_argument("--exclude-last-fc", action="store_true", help="keep the last FullyConnected in float")
    group.add_argument("--exclude", action="append", default=[], metavar="NAME_OR_REGEX",
                       help="keep this node in float: an exact name or a regex matching whole names (repeatable)")
    group.add_argument("--exclude-op", action="append", default=[], metavar="OP",
                       help="keep every node of this op type in float, e.g. FullyConnected (repeatable)")
    group.add_argument("--layer-config", metavar="FILE.json",
                       help='per-layer settings: a JSON object from layer name or regex (whole name) to "float" or '
                            'some of weight_bits, input_bits, quant_type, input_signed; later entries win')
    group.add_argument("--wino_quantize", "--wino-quantize", dest="wino_quantize", choices=("none", "F23", "F43", "F63"),
                       default="none", help="quantize 3x3 stride-1 convolutions in this Winograd tile's domain "
                                            "(default: none)")
    group.add_argument("--wino-scales", choices=("channel", "tile"), default="channel",
                       help="full mode: one scale per output channel and one tile threshold per layer, or a scale "
                            "and threshold per tile position (default: channel)")
    group.add_argument("--rounding", choices=("half_away", "half_even"), default="half_away",
                       help="how quantizers round ties: half away from zero (MXNet, ncnn) or half to even (ONNX "
                            "Runtime, oneDNN) (default: half_away)")
    group.add_argument("--quantize-bias", action="store_true",
                       help="make each quantized layer's bias the int32 value at input step x weight step, as "
                            "ONNX Runtime's and oneDNN's int8 kernels add it (default: float bias)")
    group.add_argument("--equalize", action="store_true",
                       help="cross-layer equalization with bias absorption (DFQ) after BatchNorm folding; "
                            "needs --merge-bn")
    group.add_argument("--wino-mode", choices=("weight", "full"), default="weight",
                       help="weight: weights quantized in the Winograd domain, then a direct convolution (the "
                            "seed); full: the Winograd kernel, input tiles quantized too (default: weight)")
    return group


def add_run_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The flags of a training run over several workers that can stop and resume."""
    group = parser.add_argument_group("workers and resuming")
    group.add_argument("--kvstore", choices=KVSTORES, default="device",
                       help="how gradients are summed: over this process's contexts (device, local) or over the "
                            "workers python -m qgraph.launch starts (dist_*) (default: device)")
    group.add_argument("--resume", metavar="CHECKPOINT", help="continue the run that wrote CHECKPOINT "
                       "(OUT-checkpoint.npz, rewritten after every epoch), given the same flags")
    group.add_argument("--stop-after", type=positive_int, metavar="EPOCHS",
                       help="stop after EPOCHS epochs of this invocation; the schedule still spans --epochs")
    return group


def config_from_args(args) -> QuantConfig:
    return QuantConfig(weight_bits=args.weight_bits_width, quant_type=args.quant_type,
                       quantize_input=not args.no_quantize_input, input_signed=args.input_signed,
                       input_bits=args.input_bits_width, online=not args.quantize_input_offline,
                       online_stat=args.online_stat, merge_bn=args.merge_bn,
                       exclude_first_conv=args.exclude_first_conv, exclude_last_fc=args.exclude_last_fc,
                       exclude=tuple(args.exclude), exclude_ops=tuple(args.exclude_op),
                       winograd=args.wino_quantize, winograd_mode=args.wino_mode, rounding=args.rounding,
                       winograd_scales=args.wino_scales, learn_thresholds=getattr(args, "learn_thresholds", False),
                       quantize_bias=args.quantize_bias,
                       layer_overrides=read_layer_config(args.layer_config) if args.layer_config else (),
                       equalize=args.equalize)


def read_layer_config(path) -> dict:
    """The JSON object of a --layer-config file; ConfigError naming the file when it is not one."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--layer-config {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--layer-config {path}: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--layer-config {path}: must hold a JSON object (layer name or regex -> settings)")
    return value


def _floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_calib_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The offline-calibration flags, as one argument group."""
    group = parser.add_argument_group("calibration (offline input thresholds)")
    group.add_argument("--calib-mode", choices=MODES, default=None,
                       help="naive: EMA of batch maxima (the seed); kl: the seed's KL search; entropy: MXNet's "
                            "KL variant; percentile; mse; best: per layer, whichever of naive, entropy, "
                            "percentile and mse gives the least output error. Implies --quantize-input-offline")
    group.add_argument("--calib-epoch", type=int, default=3, help="passes over the data for naive (default: 3)")
    group.add_argument("--calib-data", metavar="PATH",
                       help="calibration images: a RecordIO .rec, a folder of images, or an .npy/.npz array")
    group.add_argument("--num-sample", type=int, default=None,
                       help="images per class for a class-balanced subset (needs labels; default: all)")
    group.add_argument("--calib-batch-size", type=int, default=128, help="calibration batch size (default: 128)")
    group.add_argument("--mean", type=_floats, default=None, metavar="R,G,B",
                       help="per-channel mean (fractions of 255) for images read from .rec or folders")
    group.add_argument("--std", type=_floats, default=None, metavar="R,G,B", help="per-channel std, as --mean")
    group.add_argument("--percentile", type=float, default=99.99, help="for --calib-mode percentile (default: 99.99)")
    group.add_argument("--fixed-random-seed", type=int, default=7,
                       help="seed for the class-balanced subset (default: 7, as the seed)")
    return group


def calibration_from_args(args, mode: str | None = None) -> Calibration:
    """The Calibration the calibration flags describe (`mode` overrides --calib-mode)."""
    batch_size = args.calib_batch_size or getattr(args, "batch_size", None) or 128
    return Calibration(mode or args.calib_mode or "naive", args.calib_epoch, batch_size, args.percentile)


def add_recovery_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The post-training recovery flags (run on the calibration images, after calibration)."""
    group = parser.add_argument_group("post-training recovery (after calibration, on the calibration images)")
    group.add_argument("--adaround", action="store_true",
                       help="learn each quantized weight's rounding, layer by layer (AdaRound); needs --merge-bn")
    group.add_argument("--adaround-iterations", type=positive_int, default=recovery.ITERATIONS, metavar="N",
                       help=f"AdaRound iterations per layer (default: {recovery.ITERATIONS})")
    group.add_argument("--adaround-images", type=positive_int, default=None, metavar="N",
                       help="AdaRound on at most N of the calibration images (default: all)")
    group.add_argument("--bias-correction", action="store_true",
                       help="empirical bias correction, layer by layer (after AdaRound when both are given)")
    return group


def recovery_from_args(args) -> recovery.Recovery:
    """The Recovery the recovery flags describe (seeded with --fixed-random-seed when present)."""
    return recovery.Recovery(adaround=args.adaround, iterations=args.adaround_iterations,
                             images=args.adaround_images, seed=getattr(args, "fixed_random_seed", 0),
                             bias_correction=args.bias_correction)


def run_reporting_errors(prog: str, run, args) -> int:
    """run(args), turning a qgraph or file error into one line `PROG: error: ...` and exit code 2."""
    # MXNet's, gluoncv's and numpy's objects live as long as the tool: frozen, the collector's
    # full passes skip them (each such pass cost ~80 ms amid a large model's graph edits)
    gc.collect()
    gc.freeze()
    try:
        return run(args)
    except (QGraphError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
    except OSError as err:
        print(f"{prog}: error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
    return 2
