"""The report's figures as PNG bytes (matplotlib, Agg, no pyplot state): per-layer bars, input
histograms with each calibration method's threshold, per-output-channel weight ranges before and
after BatchNorm folding, and top-1 against weight bits. Callers write the bytes atomically.

Every figure sizes itself by what it shows (a bar row per layer, a panel per layer), labels its
axes, and is saved with a tight bounding box so that long layer names are not clipped.
"""
from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PANELS_PER_PAGE = 12
COLUMNS = 3
METHOD_COLORS = {"naive": "#1f77b4", "kl": "#d62728", "entropy": "#9467bd", "percentile": "#2ca02c",
                 "mse": "#ff7f0e"}


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", pad_inches=0.15)
    return buffer.getvalue()


def _values(values) -> np.ndarray:
    """None and infinities as NaN (not drawn)."""
    return np.array([np.nan if v is None or (isinstance(v, float) and math.isinf(v)) else v for v in values],
                    dtype=np.float64)


def layer_bars(layers: Sequence[str], series: Mapping[str, Sequence], xlabel: str, title: str,
               log: bool = False) -> bytes:
    """Horizontal grouped bars, one row per layer (top to bottom in the given order), one bar
    per series; series with no value at all are left out. `log`: a log axis, bars from 1."""
    series = {name: _values(v) for name, v in series.items() if not np.isnan(_values(v)).all()}
    count = max(len(series), 1)
    figure = _figure(11, 1.6 + 0.13 * len(layers) * (count + 1))
    axes = figure.add_subplot()
    height = 0.8 / count
    rows = np.arange(len(layers))
    for i, (name, values) in enumerate(series.items()):
        base = 1.0 if log else 0.0
        axes.barh(rows + (i - (count - 1) / 2) * height, np.nan_to_num(values, nan=base) - base, height,
                  left=base, label=name)
    axes.set_yticks(rows, layers, fontsize=8)
    axes.set_ylim(len(layers) - 0.5, -0.5)
    if log:
        axes.set_xscale("log")
    else:
        axes.axvline(0, color="black", linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("layer (network order)")
    axes.set_title(title, fontsize=11)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return _png(figure)


def _pages(panels: Sequence[Mapping], title: str, draw, row_height: float) -> list[bytes]:
    """PANELS_PER_PAGE panels a page, COLUMNS a row; draw(axes, panel) fills one."""
    pages = []
    for start in range(0, len(panels), PANELS_PER_PAGE):
        chunk = panels[start:start + PANELS_PER_PAGE]
        rows = -(-len(chunk) // COLUMNS)
        figure = _figure(15, 0.6 + row_height * rows)
        for i, panel in enumerate(chunk):
            axes = figure.add_subplot(rows, COLUMNS, i + 1)
            draw(axes, panel)
            axes.tick_params(labelsize=7)
            axes.legend(fontsize=6.5, loc="upper right")
        figure.suptitle(f"{title} (page {start // PANELS_PER_PAGE + 1})", fontsize=12)
        pages.append(_png(figure))
    return pages


def input_histograms(panels: Sequence[Mapping]) -> list[bytes]:
    """Pages of histograms, one panel per quantized input: `layer`, `counts`, `edges`, `signed`,
    `bits` and `thresholds` (method -> T, drawn at T, and -T for signed inputs)."""

    def draw(axes, panel):
        edges, counts = np.asarray(panel["edges"]), np.asarray(panel["counts"], dtype=np.float64)
        axes.stairs(np.maximum(counts, 0.5), edges, fill=True, color="#9bb8d3", baseline=0.5)
        axes.set_yscale("log")
        for method, value in panel["thresholds"].items():
            color = METHOD_COLORS.get(method, "black")
            axes.axvline(value, color=color, linewidth=1.2, label=f"{method} T={value:.3g}")
            if panel["signed"]:
                axes.axvline(-value, color=color, linewidth=1.2, linestyle="--")
        top = max([float(edges[-1])] + list(panel["thresholds"].values()))
        low = min(float(edges[0]), -top if panel["signed"] else float(edges[0]))
        axes.set_xlim(low, top + 0.5 * (top - low))  # room on the right for the legend, clear of the lines
        axes.set_title(f"{panel['layer']} ({'int' if panel['signed'] else 'uint'}{panel['bits']})", fontsize=9)
        axes.set_xlabel("input value", fontsize=8)
        axes.set_ylabel("count (log)", fontsize=8)

    return _pages(panels, "Quantized inputs: histogram and each calibration method's threshold", draw, 3.0)


def weight_ranges(panels: Sequence[Mapping], bits: int) -> list[bytes]:
    """Pages of per-output-channel max |w| (log scale), one panel per layer: `layer`, `before`
    and `after` (None without a BatchNorm to fold), channels sorted by the folded range. The
    dotted line is half of one step of a single per-layer `bits`-bit scale: channels whose whole
    range lies below it round to zero when the layer shares one scale."""
    levels = 2 ** (bits - 1) - 1

    def draw(axes, panel):
        before = np.asarray(panel["before"], dtype=np.float64)
        after = None if panel["after"] is None else np.asarray(panel["after"], dtype=np.float64)
        order = np.argsort(-(after if after is not None else before), kind="stable")
        channels = np.arange(len(before))
        axes.plot(channels, np.maximum(before[order], 1e-12), ".", markersize=3, label="before BN folding")
        if after is not None:
            axes.plot(channels, np.maximum(after[order], 1e-12), ".", markersize=3, label="after BN folding")
        top = float((after if after is not None else before).max())
        axes.axhline(top / (2 * levels), color="black", linestyle=":", linewidth=1,
                     label=f"half an int{bits} step, one scale per layer")
        axes.set_yscale("log")
        highest = max(top, float(before.max()))
        axes.set_ylim(top=highest * 40)  # headroom above the channels for the legend
        axes.set_title(panel["layer"], fontsize=9)
        axes.set_xlabel("output channel (sorted by its folded range)", fontsize=8)
        axes.set_ylabel("max |w| of the channel", fontsize=8)

    return _pages(panels, "Per-output-channel weight ranges before and after BatchNorm folding", draw, 2.9)


def top1_against_bits(points: Sequence[Mapping], target: float | None, title: str) -> bytes:
    """Top-1 (%) against average weight bits: each point has `bits` (per weight), `top1`,
    `label` and `kind` ('uniform', 'step', 'chosen' or 'test'); `target` a dashed line."""
    figure = _figure(9, 5.5)
    axes = figure.add_subplot()
    styles = {"step": dict(marker=".", color="#999999", linestyle="none", markersize=6),
              "uniform": dict(marker="s", color="#1f77b4", linestyle="none", markersize=7),
              "chosen": dict(marker="*", color="#d62728", linestyle="none", markersize=14),
              "test": dict(marker="D", color="#2ca02c", linestyle="none", markersize=9, fillstyle="none",
                           markeredgewidth=1.8)}
    names = {"step": "configurations the search tried (held-out)", "uniform": "every layer alike (held-out)",
             "chosen": "chosen mix (held-out)", "test": "test split: FP32, the config, the chosen mix"}
    for kind, style in styles.items():
        chosen = [p for p in points if p["kind"] == kind]
        if chosen:
            axes.plot([p["bits"] for p in chosen], [100 * p["top1"] for p in chosen], label=names[kind], **style)
            for p in chosen:
                if p.get("label") and kind != "step":
                    axes.annotate(p["label"], (p["bits"], 100 * p["top1"]), textcoords="offset points",
                                  xytext=(6, -12 if kind == "test" else 5), fontsize=8)
    if target is not None:
        axes.axhline(100 * target, color="#d62728", linestyle="--", linewidth=1,
                     label=f"target on held-out data ({100 * target:.2f}%)")
    axes.set_xscale("log", base=2)
    axes.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
    axes.set_xlabel("average bits per weight (Convolution/FullyConnected weights; float = 32)")
    axes.set_ylabel("top-1 (%)")
    axes.set_title(title, fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    return _png(figure)


def range_ratios(layers: Sequence[str], before: Sequence[float], after: Sequence) -> bytes:
    """Per layer, the largest channel's max |w| over the median channel's, before and after
    BatchNorm folding (log scale): how badly one per-layer scale fits the channels."""
    return layer_bars(layers, {"before BN folding": before, "after BN folding": after},
                      "largest / median per-channel max |w| (log scale)",
                      "How unevenly the output channels' weight ranges spread, per layer", log=True)
