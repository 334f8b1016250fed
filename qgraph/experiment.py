"""The seed's experiments: one simulated evaluation of a QuantConfig, and its results grids
(`int8`: the README table; `lowbit`: naive against KL, and against `best`, at 6..3 bits), with their
markdown tables.

A grid evaluates FP32 once and builds each graph variant once: rows that differ only in how
input thresholds are set share one QuantizedNet. Building a net runs the pass pipeline, which
lives in the `passes` package; the caller hands it in as `quantize` (passes.quantize).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from .calibrate import Calibration
from .config import QuantConfig
from .data import EvalSet, dataset_info
from .evaluate import Accuracy, accuracy
from .graph import Graph
from .io import to_block
from .recovery import Recovery
from .runtime import QuantizedNet

Quantize = Callable[..., QuantizedNet]   # passes.quantize(graph, config, ctx=...)
LOWBIT_BITS = (6, 5, 4, 3)


def evaluate_set(block, evalset: EvalSet, batch_size: int, ctx=None, desc: str = "eval",
                 progress: bool = False) -> Accuracy:
    """Accuracy of `block` over an evaluation set, per class included."""
    steps = -(-evalset.size // batch_size) if evalset.size else None
    return accuracy(block, evalset.batches(batch_size), dataset_info(evalset.dataset).classes, batch_size, ctx,
                    desc, progress, steps)


@dataclass(frozen=True)
class SimulationResult:
    """One simulated evaluation: the net, its accuracy, with --eval-per-calib the accuracy
    after each naive calibration epoch (or after the one calibration of other modes), and what
    the recovery methods did (qgraph.recovery.Recovery.run)."""

    net: QuantizedNet
    accuracy: Accuracy
    per_calibration: tuple = ()
    recovery: dict | None = None


def simulate(graph: Graph, config: QuantConfig, evalset: EvalSet, quantize: Quantize,
             calibration: Calibration | None = None, calib_images=None, batch_size: int = 128,
             eval_per_calib: bool = False, ctx=None, progress: bool = False,
             recovery: Recovery | None = None) -> SimulationResult:
    """Quantize `graph` as `config` says, calibrate offline thresholds when `calibration` is
    given (on `calib_images`), run the `recovery` methods (on the same images), and evaluate
    on `evalset`."""
    net = quantize(graph, config, ctx=ctx)
    per_calib = []

    def evaluate_now(epoch=None):
        label = f"eval {epoch + 1}/{calibration.epochs}" if epoch is not None else "eval"
        per_calib.append(evaluate_set(net, evalset, batch_size, ctx, label, progress))

    if calibration is not None:
        naive_epochs = eval_per_calib and calibration.mode == "naive"
        calibration.run(net, calib_images, progress, after_epoch=evaluate_now if naive_epochs else None)
        if eval_per_calib and not naive_epochs:
            evaluate_now()
    recovered = recovery.run(net, calib_images, progress) if recovery is not None and recovery.active else None
    result = per_calib[-1] if per_calib and not recovered else evaluate_set(net, evalset, batch_size, ctx, "eval",
                                                                            progress)
    return SimulationResult(net, result, tuple(per_calib), recovered)


# ---------------------------------------------------------------------- the seed's tables
@dataclass(frozen=True)
class Row:
    signed: bool
    offline: str | None       # None (online), "naive", "kl" or "best"
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

    @property
    def label(self) -> str:
        return (f"{_in_dtype(self)}/{self.offline or 'online'}/int{self.weight_bits} {self.quant_type}"
                f"{' merge-bn' if self.merge_bn else ''}{'' if self.exclude_first_conv else ' +1st-conv'}")


def int8_rows(weight_bits: int = 8, input_bits: int = 8) -> list[Row]:
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


LOWBIT_MODES = ("naive", "kl", "best")


def lowbit_rows() -> list[Row]:
    """The seed's naive-vs-KL comparison, with qgraph's `best` beside them: uint inputs, per-channel
    weights, BN merged, first conv excluded."""
    return [Row(False, mode, "channel", True, True, bits, bits) for bits in LOWBIT_BITS for mode in LOWBIT_MODES]


GRIDS = ("int8", "lowbit")


def grid_rows(grid: str, weight_bits: int = 8, input_bits: int = 8) -> list[Row]:
    """The rows of `grid` ('int8' at the given bits, or 'lowbit')."""
    return int8_rows(weight_bits, input_bits) if grid == "int8" else lowbit_rows()


def run_grid(graph: Graph, rows, base: QuantConfig, evalset: EvalSet, calib_images, calibration: Calibration,
             quantize: Quantize, batch_size: int = 128, ctx=None, progress: bool = False):
    """(FP32 accuracy, [(row, accuracy)] in row order): FP32 once, one QuantizedNet per graph
    variant, one calibration per (variant, mode)."""
    fp32 = evaluate_set(to_block(graph, ctx), evalset, batch_size, ctx, "fp32", progress)
    variants: dict = {}
    for row in rows:
        variants.setdefault(row.variant, []).append(row)
    results = {}
    bar = tqdm(total=len(rows), desc="grid", disable=not progress)
    for members in variants.values():
        row = members[0]
        config = base.replace(input_signed=row.signed, quant_type=row.quant_type, merge_bn=row.merge_bn,
                              exclude_first_conv=row.exclude_first_conv, weight_bits=row.weight_bits,
                              input_bits=row.input_bits, online=True, quantize_input=True)
        net = quantize(graph, config, ctx=ctx)
        for member in sorted(members, key=lambda r: r.offline is not None):  # online first: needs no thresholds
            if member.offline is None:
                net.enable_quantize()
                net.quantize_input(enable=True, online=True)
            else:
                calibration.replace(mode=member.offline).run(net, calib_images, progress)
            results[member] = evaluate_set(net, evalset, batch_size, ctx, member.label, progress)
            bar.update(1)
    bar.close()
    return fp32, [(row, results[row]) for row in rows]


def _in_dtype(row: Row) -> str:
    return f"{'int' if row.signed else 'uint'}{row.input_bits}"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _tick(flag: bool) -> str:
    return "√" if flag else " "


def format_int8_table(fp32: Accuracy, results: list) -> str:
    lines = ["| IN dtype | IN offline | WT dtype | WT qtype | Merge BN | w/o 1st conv | Top1 Acc |",
             "| :---: | :---: | :---: | :---: | :---: | :---: | :---: |",
             f"| float32 | / | float32 | / |   | / | {_pct(fp32.top1)} |"]
    for row, result in results:
        offline = {None: "x", "naive": "naive", "kl": "KL", "best": "best"}[row.offline]
        lines.append(f"| {_in_dtype(row)} | {offline} | int{row.weight_bits} | {row.quant_type} | "
                     f"{_tick(row.merge_bn)} | {_tick(row.exclude_first_conv)} | {_pct(result.top1)} |")
    return "\n".join(lines)


def format_lowbit_table(fp32: Accuracy, results: list) -> str:
    by_variant: dict = {}
    for row, result in results:
        by_variant.setdefault(row.variant, {})[row.offline] = (row, result)
    columns = [m for m in LOWBIT_MODES if any(m in modes for modes in by_variant.values())]
    names = {"naive": "naive", "kl": "KL", "best": "best"}
    lines = ["| IN dtype | WT dtype | WT qtype | Merge BN | w/o 1st conv | "
             + " | ".join(f"Top1 Acc@{names[m]}" for m in columns) + " |",
             "| :---: | :---: | :---: | :---: | :---: | " + " | ".join(":---:" for _ in columns) + " |",
             "| float32 | float32 | / |   | / | " + " | ".join(_pct(fp32.top1) for _ in columns) + " |"]
    for modes in by_variant.values():
        row = next(iter(modes.values()))[0]
        cells = [_pct(modes[m][1].top1) if m in modes else "" for m in columns]
        lines.append(f"| {_in_dtype(row)} | int{row.weight_bits} | {row.quant_type} | {_tick(row.merge_bn)} | "
                     f"{_tick(row.exclude_first_conv)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES = {"int8": format_int8_table, "lowbit": format_lowbit_table}
