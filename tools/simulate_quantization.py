#!/usr/bin/env python
"""Simulate quantization of a classifier and print its top-1 accuracy (the seed's main tool, offline).

The model is a gluoncv model-zoo name (--model; its weights from --params, from the
project's models/NAME-symbol.json when it ships one, or --pretrained, which needs
network access) or an exported model (--symbol FILE-symbol.json [--params FILE]).
Every flag of the seed's examples/simulate_quantization.py is accepted with the same
meaning and default. Inputs are quantized with each batch's maximum (online) unless
--quantize-input-offline or --calib-mode asks for thresholds calibrated on
--num-sample images per class of the training split. Evaluation runs on the whole test
split (--num-eval N keeps N images spread evenly over it).

--grid runs the seed's results table in one go and prints it as markdown: `int8`
(input uint8/int8, offline none/naive/KL, weights per layer/channel, BN merged or not,
first conv excluded or not) or `lowbit` (uint6/int6 .. uint3/int3, per channel, BN
merged, first conv excluded, naive against KL). The FP32 model is evaluated once and each
graph variant is built once for all its rows.

examples:
  python tools/simulate_quantization.py --model cifar_resnet20_v1 --dataset cifar10 --quant-type channel
  python tools/simulate_quantization.py --symbol models/mnist_cnn-symbol.json --dataset mnist --calib-mode kl
  python tools/simulate_quantization.py --model cifar_resnet20_v1 --dataset cifar10 --grid --report grid.json
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=DeprecationWarning)

from qgraph.cli import add_calib_args, add_quant_args, config_from_args, run_reporting_errors  # noqa: E402

PROG = "simulate_quantization.py"
log = logging.getLogger(PROG)

INPUT_SHAPES = {"imagenet": (1, 3, 224, 224), "cifar10": (1, 3, 32, 32), "mnist": (1, 1, 28, 28)}
CLASSES = {"imagenet": 1000, "cifar10": 10, "mnist": 10}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_NUM_SAMPLE = 5          # images per class of the training split, as the seed
LOWBIT_BITS = (6, 5, 4, 3)


# ---------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="model-zoo name (see --list-models); required unless --symbol is given")
    model.add_argument("--symbol", metavar="FILE-symbol.json", help="load an exported model instead of a zoo name")
    model.add_argument("--params", metavar="FILE",
                       help="weights: an exported checkpoint (arg:/aux: keys) or a save_parameters file "
                            "(default: beside --symbol; for --model, models/NAME_DATASET or models/NAME when qgraph "
                            "ships it)")
    model.add_argument("--pretrained", action="store_true",
                       help="download the model zoo's pretrained weights (needs network access)")
    model.add_argument("--print-model", action="store_true", help="print the architecture of the model")
    model.add_argument("--list-models", action="store_true", help="list the names --model accepts and exit")
    model.add_argument("--use-gn", action="store_true", help="zoo model: GroupNorm instead of BatchNorm")
    model.add_argument("--batch-norm", action="store_true", help="zoo model: vgg with BatchNorm")
    model.add_argument("--use-se", action="store_true", help="zoo model: resnext with SE layers")
    model.add_argument("--last-gamma", action="store_true",
                       help="zoo model: initialise the last BN gamma of each bottleneck to 0")
    run = parser.add_argument_group("data and devices")
    run.add_argument("--dataset", choices=("imagenet", "cifar10", "mnist"), default=None,
                     help="data set to calibrate and evaluate on (default: imagenet as in the seed; cifar10 "
                          "for cifar* names, mnist for mnist* names)")
    run.add_argument("--data-dir", default=None,
                     help="RecordIO folder: cifar10_{train,test}.rec (default: ../shared/data/cifar10) or "
                          "ImageNet's train.rec/val.rec; mnist is bundled")
    run.add_argument("--use-gpu", type=int, default=-1, metavar="N", help="run on gpu N (default: -1, cpu)")
    run.add_argument("-j", "--num-data-workers", dest="num_workers", type=int, default=4,
                     help="decoding threads for RecordIO data (default: 4)")
    run.add_argument("--batch-size", type=int, default=128,
                     help="evaluation (and calibration) batch size (default: 128)")
    run.add_argument("--num-eval", type=int, default=None, metavar="N",
                     help="evaluate on N test images spread evenly over the split (default: the whole split)")
    run.add_argument("--disable-cudnn-autotune", action="store_true",
                     help="disable MXNet's cuDNN autotune for convolution algorithms")
    add_quant_args(parser)
    calib = add_calib_args(parser)
    calib.add_argument("--eval-per-calib", action="store_true",
                       help="evaluate after every calibration epoch (naive) or after calibration (others)")
    parser.set_defaults(calib_batch_size=None)
    # the shared flag's help describes --calib-data; here the default is the seed's 5 per class
    parser._option_string_actions["--num-sample"].help = (
        "calibration images per class, class-balanced with --fixed-random-seed (default: 5 of the training "
        "split, as the seed; all of --calib-data)")
    table = parser.add_argument_group("results tables and output")
    table.add_argument("--grid", nargs="?", const="int8", choices=("int8", "lowbit"), default=None,
                       help="run the seed's results table and print it as markdown: int8 (the default) or "
                            "lowbit (naive vs KL at 6..3 bits); the grid sets dtype, offline mode, weight "
                            "granularity, BN merge and first-conv exclusion itself")
    table.add_argument("--report", metavar="OUT.json", help="write the results (and thresholds) as JSON")
    table.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    return parser


def resolve_dataset(args) -> str:
    if args.dataset:
        return args.dataset
    name = (args.model or Path(args.symbol).name).lower()
    if name.startswith("mnist"):
        return "mnist"
    return "cifar10" if name.startswith("cifar") else "imagenet"


# ---------------------------------------------------------------------- model
def _zoo_names() -> list:
    from gluoncv.model_zoo import get_model_list

    from qgraph.models import BUNDLED

    return sorted(BUNDLED) + list(get_model_list())


def _zoo_kwargs(args, dataset: str) -> dict:
    kwargs = {"classes": CLASSES[dataset]}
    if args.use_gn:
        from gluoncv.nn import GroupNorm

        kwargs["norm_layer"] = GroupNorm
    if args.model.startswith("vgg"):
        kwargs["batch_norm"] = args.batch_norm
    elif args.model.startswith("resnext"):
        kwargs["use_se"] = args.use_se
    if args.last_gamma:
        kwargs["last_gamma"] = True
    return kwargs


def _build_zoo(args, dataset: str, pretrained: bool):
    from qgraph import ConfigError
    from qgraph.models import BUNDLED

    if args.model in BUNDLED:
        if pretrained:
            raise ConfigError(f"--pretrained: {args.model} is a qgraph model with no zoo weights; pass --params")
        return BUNDLED[args.model](classes=CLASSES[dataset])
    from gluoncv.model_zoo import get_model

    try:
        return get_model(args.model, pretrained=pretrained, **_zoo_kwargs(args, dataset))
    except Exception as err:  # gluoncv raises many kinds; a download failure is the usual one
        if not pretrained:
            raise ConfigError(f"--model {args.model}: gluoncv cannot build it with these options "
                              f"({type(err).__name__}: {err})") from None
        reason = str(err).split(" (Caused by")[0][:160]
        raise ConfigError(f"--pretrained: could not get the model zoo's weights for {args.model} "
                          f"(downloading needs network access; {type(err).__name__}: {reason}); "
                          "offline, pass --params FILE or --symbol FILE") from None


def _graph_with_params(block, params_path, shape):
    """A zoo block's traced graph with the weights of `params_path`, either format."""
    import mxnet as mx

    import qgraph
    from qgraph.io import read_params

    stored = read_params(params_path)
    raw = mx.nd.load(str(params_path))
    if any(key.startswith(("arg:", "aux:")) for key in raw):
        block.initialize()
        graph = qgraph.load(block, input_shape=shape)
        missing, extra = sorted(set(graph.params) - set(stored)), sorted(set(stored) - set(graph.params))
        if missing or extra:
            raise qgraph.GraphError(f"{params_path}: does not fit --model (missing {missing[:3]}, extra {extra[:3]}); "
                                    "an exported checkpoint needs its own -symbol.json: pass --symbol")
        for name, value in stored.items():
            if value.shape != graph.params[name].shape:
                raise qgraph.GraphError(f"{params_path}: parameter '{name}' has shape {value.shape}, the model "
                                        f"needs {graph.params[name].shape}")
        graph.params = {name: stored[name] for name in graph.params}
        return graph
    try:
        block.load_parameters(str(params_path))
    except (AssertionError, mx.base.MXNetError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise qgraph.GraphError(f"{params_path}: does not fit --model ({first[:300]})") from None
    return qgraph.load(block, input_shape=shape)


def load_model(args, dataset: str):
    """(graph, printable architecture) for the flags."""
    import qgraph
    from qgraph.io import symbol_and_params_paths

    shape = INPUT_SHAPES[dataset]
    if args.symbol:
        for flag in ("use_gn", "batch_norm", "use_se", "last_gamma", "pretrained"):
            if getattr(args, flag):
                raise qgraph.ConfigError(f"--{flag.replace('_', '-')} applies to --model built from the model zoo, "
                                         "not to --symbol")
        symbol_path, params_path = symbol_and_params_paths(args.symbol, args.params)
        if not symbol_path.is_file():
            raise qgraph.GraphError(f"{symbol_path}: no such symbol file")
        if params_path is None:
            raise qgraph.GraphError(f"{symbol_path}: no params file beside it; pass --params")
        graph = qgraph.load_files(symbol_path, params_path, input_shapes={"data": shape})
        return graph, None
    names = _zoo_names()
    if args.model not in names:
        raise qgraph.ConfigError(f"--model {args.model}: not a model-zoo name (see --list-models); "
                                 "for an exported model use --symbol")
    if args.params or args.pretrained:
        block = _build_zoo(args, dataset, pretrained=args.pretrained)
        graph = (_graph_with_params(block, args.params, shape) if args.params
                 else qgraph.load(block, input_shape=shape))
        return graph, block
    for shipped in (ROOT / "models" / f"{args.model}_{dataset}", ROOT / "models" / args.model):
        if Path(f"{shipped}-symbol.json").is_file():
            log.info("weights: %s-0000.params (shipped with qgraph)", shipped.relative_to(ROOT))
            return (qgraph.load_files(f"{shipped}-symbol.json", f"{shipped}-0000.params", input_shapes={"data": shape}),
                    None)
    raise qgraph.ConfigError(f"--model {args.model}: no weights; pass --params FILE (exported checkpoint or "
                             "save_parameters file), --symbol FILE-symbol.json, or --pretrained (needs network "
                             "access)")


def describe_graph(graph) -> str:
    return "\n".join(f"{graph.op(n):20s} {n}" for n in graph.nodes() if graph.op(n) != "null")


# ---------------------------------------------------------------------- data
@dataclass
class EvalSet:
    """The evaluation split: arrays in memory, or a function yielding (images, labels) batches."""

    dataset: str
    images: object = None
    labels: object = None
    stream: object = None
    size: int = 0

    def batches(self, batch_size: int):
        if self.stream is not None:
            yield from self.stream(batch_size)
            return
        for start in range(0, len(self.labels), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


def _data_dir(args, dataset: str) -> Path:
    from qgraph import ConfigError
    from qgraph.data import default_cifar10_dir

    folder = args.data_dir or (default_cifar10_dir() if dataset == "cifar10" else None)
    if folder is None:
        raise ConfigError(f"no {dataset} data found; pass --data-dir")
    return Path(folder)


def _rec(folder: Path, dataset: str, split: str) -> Path:
    names = {"cifar10": {"train": "cifar10_train.rec", "test": "cifar10_test.rec"},
             "imagenet": {"train": "train.rec", "test": "val.rec"}}
    path = folder / names[dataset][split]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such RecordIO file (is --data-dir right?)")
    return path


def _norm(dataset: str):
    from qgraph.data import CIFAR10_MEAN, CIFAR10_STD

    return (CIFAR10_MEAN, CIFAR10_STD) if dataset == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)


def _record_iter(path: Path, dataset: str, batch_size: int, threads: int):
    import mxnet as mx

    mean, std = _norm(dataset)
    extra = dict(resize=256) if dataset == "imagenet" else {}
    return mx.io.ImageRecordIter(path_imgrec=str(path), data_shape=INPUT_SHAPES[dataset][1:], batch_size=batch_size,
                                 preprocess_threads=max(1, threads), round_batch=True,  # False: garbage, pad 0
                                 **{f"mean_{c}": 255 * m for c, m in zip("rgb", mean)},
                                 **{f"std_{c}": 255 * s for c, s in zip("rgb", std)}, **extra)


@functools.lru_cache(maxsize=1)
def _mnist():
    """The bundled MNIST split, read once per process (reading it takes seconds); never modified."""
    from qgraph.data import mnist_split

    return mnist_split()


def spread(total: int, count: int):
    """`count` indices spread evenly over `total` (test splits are often sorted by class, so the
    first `count` images would be one class)."""
    import numpy as np

    return np.arange(count) * total // count if count < total else np.arange(total)


def load_eval_set(args, dataset: str) -> EvalSet:
    import numpy as np

    from qgraph import ConfigError

    limit = args.num_eval
    if dataset == "mnist":
        _, (images, labels) = _mnist()
        keep = spread(len(labels), limit) if limit else slice(None)
        return EvalSet(dataset, images[keep], labels[keep], size=len(labels[keep]))
    path = _rec(_data_dir(args, dataset), dataset, "test")
    index = path.with_suffix(".idx")
    size = sum(1 for _ in open(index)) if index.is_file() else None
    if limit and size is None:
        raise ConfigError(f"--num-eval: {index} is missing, so the subset cannot be spread over the split")
    wanted = set(spread(size, limit).tolist()) if limit else None

    def stream(batch_size):
        position = 0
        for batch in _record_iter(path, dataset, batch_size, args.num_workers):
            count = batch.data[0].shape[0] - batch.pad
            images = batch.data[0].asnumpy()[:count]
            labels = batch.label[0].asnumpy()[:count].astype(np.int64)
            if wanted is not None:
                mask = np.array([position + i in wanted for i in range(count)], bool)
                images, labels = images[mask], labels[mask]
            position += count
            if len(labels):
                yield images, labels

    if dataset == "cifar10":  # 10,000 small images: decode once, reuse for every row of a grid
        parts = list(stream(500))
        images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return EvalSet(dataset, images, labels, size=len(labels))
    return EvalSet(dataset, stream=stream, size=len(wanted) if wanted is not None else (size or 0))


def record_labels(path: Path):
    """Every record's label, read from the RecordIO headers without decoding the images."""
    import mxnet as mx
    import numpy as np

    reader = mx.recordio.MXRecordIO(str(path), "r")
    labels = []
    try:
        while True:
            item = reader.read()
            if item is None:
                break
            header, _ = mx.recordio.unpack(item)
            label = header.label
            labels.append(int(label if np.isscalar(label) else label[0]))
    finally:
        reader.close()
    return np.array(labels, np.int64)


def read_records(path: Path, indices, dataset: str):
    """The records at `indices` (sorted), decoded and normalised as the evaluation split is."""
    import mxnet as mx
    import numpy as np

    mean, std = _norm(dataset)
    wanted, images, position = set(int(i) for i in indices), [], 0
    reader = mx.recordio.MXRecordIO(str(path), "r")
    try:
        while len(images) < len(wanted):
            item = reader.read()
            if item is None:
                break
            if position in wanted:
                _, raw = mx.recordio.unpack(item)
                image = mx.image.imdecode(raw)
                if dataset == "imagenet":
                    image = mx.image.center_crop(mx.image.resize_short(image, 256, interp=1), (224, 224))[0]
                images.append(image.asnumpy().transpose(2, 0, 1))
            position += 1
    finally:
        reader.close()
    images = np.stack(images).astype(np.float32) / 255.0
    images -= np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    images /= np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return images


def load_calibration_set(args, dataset: str):
    """Calibration images: --calib-data, or --num-sample images per class of the training split."""
    from qgraph.data import class_balanced_subset, load_calibration_data

    if args.calib_data:
        images, _ = load_calibration_data(args.calib_data, INPUT_SHAPES[dataset], args.mean, args.std,
                                          args.num_sample, args.fixed_random_seed)
        return images
    per_class = args.num_sample if args.num_sample is not None else DEFAULT_NUM_SAMPLE
    if dataset == "mnist":
        (images, labels), _ = _mnist()
        return images[class_balanced_subset(labels, per_class, args.fixed_random_seed)]
    path = _rec(_data_dir(args, dataset), dataset, "train")
    keep = class_balanced_subset(record_labels(path), per_class, args.fixed_random_seed)
    return read_records(path, keep, dataset)


# ---------------------------------------------------------------------- evaluation
def evaluate(block, evalset: EvalSet, batch_size: int, ctx, desc: str, progress: bool) -> dict:
    """{'top1', 'avg_acc' (mean of per-class accuracies, the seed's second figure), 'images'}."""
    import numpy as np
    from tqdm import tqdm

    from qgraph.evaluate import predict

    classes = CLASSES[evalset.dataset]
    correct, total = np.zeros(classes), np.zeros(classes)
    steps = -(-evalset.size // batch_size) if evalset.size else None
    for images, labels in tqdm(evalset.batches(batch_size), total=steps, desc=desc, leave=False, disable=not progress):
        hits = predict(block, images, batch_size, ctx) == labels
        np.add.at(total, labels, 1)
        np.add.at(correct, labels, hits)
    seen = total > 0
    return {"top1": float(correct.sum() / total.sum()), "avg_acc": float(np.mean(correct[seen] / total[seen])),
            "images": int(total.sum())}


def calibrate(net, images, mode: str, args, evalset=None, ctx=None) -> list:
    """Calibrate `net` in place; with --eval-per-calib, the evaluation after each naive epoch
    (or after the one calibration of the other modes)."""
    batch_size = args.calib_batch_size or args.batch_size
    progress = not args.quiet
    if not (args.eval_per_calib and mode == "naive"):
        net.calibrate(images, mode, calib_epoch=args.calib_epoch, batch_size=batch_size,
                      percentile=args.percentile, progress=progress)
        if not args.eval_per_calib:
            return []
        return [evaluate(net, evalset, args.batch_size, ctx, f"eval {mode}", progress)]
    import mxnet as mx

    # the seed's loop: an EMA epoch over the calibration set, then an evaluation offline
    results = []
    net.enable_quantize()
    net.reset_thresholds()
    for epoch in range(args.calib_epoch):
        net.quantize_input(enable=True, online=True)
        for start in range(0, len(images), batch_size):
            net(mx.nd.array(images[start:start + batch_size], ctx=ctx))
            net.update_ema()
        net.quantize_input(enable=True, online=False)
        results.append(evaluate(net, evalset, args.batch_size, ctx, f"eval {epoch + 1}/{args.calib_epoch}", progress))
    return results


# ---------------------------------------------------------------------- the seed's tables
@dataclass(frozen=True)
class Row:
    signed: bool
    offline: str | None       # None (online), "naive" or "kl"
    quant_type: str
    merge_bn: bool
    exclude_first_conv: bool
    weight_bits: int = 8
    input_bits: int = 8

    @property
    def variant(self) -> tuple:
        """What the rewritten graph depends on: rows that share it share one QuantizedNet."""
        return (self.signed, self.quant_type, self.merge_bn, self.exclude_first_conv, self.weight_bits,
                self.input_bits)


def int8_rows(weight_bits: int = 8, input_bits: int = 8) -> list:
    """The rows of the seed's README results table, in its order."""
    rows = []
    for qtype in ("layer", "channel"):
        for signed, offline, merge, exclude in ((False, None, False, False), (False, None, False, True),
                                                (False, "naive", False, True), (False, "kl", False, True),
                                                (True, "naive", False, True), (True, "kl", False, True),
                                                (True, None, True, True), (True, "naive", True, True),
                                                (True, "kl", True, True)):
            rows.append(Row(signed, offline, qtype, merge, exclude, weight_bits, input_bits))
    return rows


def lowbit_rows() -> list:
    """The seed's naive-vs-KL comparison: uint inputs, per-channel weights, BN merged, first conv excluded."""
    return [Row(False, mode, "channel", True, True, bits, bits) for bits in LOWBIT_BITS for mode in ("naive", "kl")]


def run_grid(graph, rows, args, evalset, calib_images, ctx) -> tuple[dict, list]:
    """FP32 once, then every row; one QuantizedNet per graph variant, one calibration per (variant, mode)."""
    from tqdm import tqdm

    import qgraph

    progress = not args.quiet
    fp32 = evaluate(qgraph.to_block(graph, ctx), evalset, args.batch_size, ctx, "fp32", progress)
    base = config_from_args(args)
    results: dict = {}
    variants: dict = {}
    for row in rows:
        variants.setdefault(row.variant, []).append(row)
    bar = tqdm(total=len(rows), desc="grid", disable=not progress)
    for members in variants.values():
        row = members[0]
        config = base.replace(input_signed=row.signed, quant_type=row.quant_type, merge_bn=row.merge_bn,
                              exclude_first_conv=row.exclude_first_conv, weight_bits=row.weight_bits,
                              input_bits=row.input_bits, online=True, quantize_input=True)
        net = qgraph.quantize(graph, config, ctx=ctx)
        for member in sorted(members, key=lambda r: r.offline is not None):  # online first: needs no thresholds
            if member.offline is None:
                net.enable_quantize()
                net.quantize_input(enable=True, online=True)
            else:
                net.calibrate(calib_images, member.offline, calib_epoch=args.calib_epoch,
                              batch_size=args.calib_batch_size or args.batch_size, percentile=args.percentile,
                              progress=progress)
            results[member] = evaluate(net, evalset, args.batch_size, ctx, _row_label(member), progress)
            bar.update(1)
    bar.close()
    return fp32, [(row, results[row]) for row in rows]


def _row_label(row: Row) -> str:
    return (f"{_in_dtype(row)}/{row.offline or 'online'}/int{row.weight_bits} {row.quant_type}"
            f"{' merge-bn' if row.merge_bn else ''}{'' if row.exclude_first_conv else ' +1st-conv'}")


def _in_dtype(row: Row) -> str:
    return f"{'int' if row.signed else 'uint'}{row.input_bits}"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _tick(flag: bool) -> str:
    return "√" if flag else " "


def format_int8_table(fp32: dict, results: list) -> str:
    lines = ["| IN dtype | IN offline | WT dtype | WT qtype | Merge BN | w/o 1st conv | Top1 Acc |",
             "| :---: | :---: | :---: | :---: | :---: | :---: | :---: |",
             f"| float32 | / | float32 | / |   | / | {_pct(fp32['top1'])} |"]
    for row, result in results:
        offline = {None: "x", "naive": "naive", "kl": "KL"}[row.offline]
        lines.append(f"| {_in_dtype(row)} | {offline} | int{row.weight_bits} | {row.quant_type} | "
                     f"{_tick(row.merge_bn)} | {_tick(row.exclude_first_conv)} | {_pct(result['top1'])} |")
    return "\n".join(lines)


def format_lowbit_table(fp32: dict, results: list) -> str:
    lines = ["| IN dtype | WT dtype | WT qtype | Merge BN | w/o 1st conv | Top1 Acc@naive | Top1 Acc@KL |",
             "| :---: | :---: | :---: | :---: | :---: | :---: | :---: |",
             f"| float32 | float32 | / |   | / | {_pct(fp32['top1'])} | {_pct(fp32['top1'])} |"]
    by_variant: dict = {}
    for row, result in results:
        by_variant.setdefault(row.variant, {})[row.offline] = (row, result)
    for modes in by_variant.values():
        row = modes["naive"][0]
        lines.append(f"| {_in_dtype(row)} | int{row.weight_bits} | {row.quant_type} | {_tick(row.merge_bn)} | "
                     f"{_tick(row.exclude_first_conv)} | {_pct(modes['naive'][1]['top1'])} | "
                     f"{_pct(modes['kl'][1]['top1'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def _print_settings(args) -> None:
    log.info("%s Settings %s", "*" * 25, "*" * 25)
    for key, value in vars(args).items():
        log.info("%-25s: %s", key, value)


def _print_result(name: str, result: dict) -> None:
    print(f"{name}: {result['images']} images")
    print("{0: <8}: {1:2.2f}%".format("acc", 100 * result["top1"]))
    print("{0: <8}: {1:2.2f}%".format("avg_acc", 100 * result["avg_acc"]))


def run(args) -> int:
    import mxnet as mx

    import qgraph
    from qgraph.io import write_text_atomic

    if args.disable_cudnn_autotune:
        os.environ["MXNET_CUDNN_AUTOTUNE_DEFAULT"] = "0"
    for flag in ("batch_size", "num_eval", "num_sample", "calib_epoch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise qgraph.ConfigError(f"--{flag.replace('_', '-')}={value}: must be at least 1")
    if args.use_gpu >= 0 and mx.context.num_gpus() <= args.use_gpu:
        raise qgraph.ConfigError(f"--use-gpu {args.use_gpu}: this machine has {mx.context.num_gpus()} GPU(s)")
    ctx = mx.gpu(args.use_gpu) if args.use_gpu >= 0 else mx.cpu()
    if args.report:
        Path(args.report).resolve().parent.mkdir(parents=True, exist_ok=True)
    dataset = resolve_dataset(args)
    _print_settings(args)
    graph, block = load_model(args, dataset)
    if args.print_model:
        print(block if block is not None else describe_graph(graph))
    evalset = load_eval_set(args, dataset)
    offline = bool(args.quantize_input_offline or args.calib_mode)
    needs_calibration = args.grid is not None or offline
    calib_images = load_calibration_set(args, dataset) if needs_calibration else None
    name = args.model or Path(args.symbol).name.replace("-symbol.json", "")
    report = {"model": name, "dataset": dataset, "eval_images": evalset.size or None,
              "calibration_images": None if calib_images is None else len(calib_images),
              "argv": getattr(args, "argv", None)}

    if args.grid:
        rows = int8_rows(args.weight_bits_width, args.input_bits_width) if args.grid == "int8" else lowbit_rows()
        fp32, results = run_grid(graph, rows, args, evalset, calib_images, ctx)
        table = (format_int8_table if args.grid == "int8" else format_lowbit_table)(fp32, results)
        print(f"model: {name}; {dataset} test, {fp32['images']} images; calibration: "
              f"{len(calib_images)} training images, {args.calib_epoch} naive epochs\n")
        print(table)
        report.update(grid=args.grid, fp32=fp32,
                      rows=[{**asdict(row), **result} for row, result in results])
    else:
        config = config_from_args(args).replace(online=not offline)
        net = qgraph.quantize(graph, config, ctx=ctx)
        if net.report is not None:
            for line in net.report.format().splitlines():
                log.info("%s", line)
        per_calib = []
        if offline:
            mode = args.calib_mode or "naive"
            per_calib = calibrate(net, calib_images, mode, args, evalset, ctx)
            for i, result in enumerate(per_calib):
                _print_result(f"calibration {i + 1}", result)
            report["calibration"] = {"mode": mode, "thresholds": net.thresholds()}
        result = per_calib[-1] if per_calib else evaluate(net, evalset, args.batch_size, ctx, "eval", not args.quiet)
        if not per_calib:
            _print_result("result", result)
        report.update(config={k: v for k, v in asdict(config).items()}, result=result,
                      per_calib=per_calib or None)
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=2, default=str) + "\n")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.argv = argv
    if args.list_models:
        print("\n".join(_zoo_names()))
        return 0
    if not args.model and not args.symbol:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: --model is required (or --symbol FILE-symbol.json for an exported model)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_reporting_errors(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
