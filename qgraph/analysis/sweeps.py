"""Which layer costs the accuracy: per-layer sensitivity sweeps over one quantized net.

For every quantized layer (after AIMET's QuantAnalyzer and PyTorch's Numeric Suite):
- top-1 with only that layer's weights quantized, and with only its input quantized;
- top-1 with every layer quantized but this one (what keeping it in float would win back);
- SQNR of the layer's own output against float: the layer alone quantized, reading the float
  network's tensors (its own error), and inside the fully quantized net (accumulated error);
- SQNR of the network output with only its weights, or only its input, quantized.
Top-1 figures need labels; without them the table ranks by output SQNR.

Every configuration runs on one qgraph.analysis.variants.Variants: the emissions of a sweep
share the net's parameters, weights switch by parameter value and each set of input quantizers
is emitted once. `sensitivity()` quantizes (with the pass pipeline it is handed, as
qgraph.experiment does) and calibrates; `sensitivity_of()` measures a QuantizedNet as it is.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..calibrate import Calibration
from ..config import QuantConfig
from ..errors import ConfigError
from ..io import write_files_atomic
from ..runtime import QuantizedNet
from . import plots
from .variants import Variants, check_images, sqnr_db

SWEEPS = ("weights", "inputs", "all_but", "sqnr")


@dataclass(frozen=True)
class LayerSensitivity:
    """One quantized layer. Drops are FP32 top-1 minus the configuration's, in points;
    `gain_float` is what keeping only this layer in float wins over the fully quantized net.
    SQNRs are in dB (inf: no error). None: not measured (no labels, no such quantizer or sweep)."""

    layer: str
    op: str
    weights: int                      # weight elements
    weight_quantizer: str             # e.g. "int8 per layer"
    input_quantizer: str              # e.g. "uint8", "" when the input stays float
    drop_weights: float | None = None
    drop_input: float | None = None
    gain_float: float | None = None
    sqnr_layer: float | None = None
    sqnr_layer_in_net: float | None = None
    sqnr_output_weights: float | None = None
    sqnr_output_input: float | None = None

    @property
    def score(self) -> float:
        """How much this layer costs: the largest of its drops and its float gain (points), or,
        without top-1 figures, minus the lowest network-output SQNR."""
        drops = [v for v in (self.drop_weights, self.drop_input, self.gain_float) if v is not None]
        if drops:
            return max(drops)
        sqnrs = [v for v in (self.sqnr_output_weights, self.sqnr_output_input) if v is not None]
        return -min(sqnrs) if sqnrs else float("-inf")


@dataclass(frozen=True)
class Sensitivity:
    """The sweeps' results: `rows` in topological order, `ranked()` most costly first."""

    config: QuantConfig | None
    images: int
    fp32_top1: float | None
    quantized_top1: float | None
    quantized_sqnr: float
    rows: tuple
    seconds: float = 0.0

    def ranked(self) -> list[LayerSensitivity]:
        return sorted(self.rows, key=lambda r: r.score, reverse=True)

    def to_markdown(self) -> str:
        """A summary line and the table, most costly layer first."""
        summary = f"{self.images} images; network-output SQNR with every layer quantized: " \
                  f"{_db(self.quantized_sqnr)} dB"
        if self.fp32_top1 is not None:
            summary = (f"{self.images} images; top-1 FP32 {100 * self.fp32_top1:.2f}%, every layer quantized "
                       f"{100 * self.quantized_top1:.2f}% (drop {100 * (self.fp32_top1 - self.quantized_top1):.2f}"
                       f" points, network-output SQNR {_db(self.quantized_sqnr)} dB)")
        lines = [summary, "",
                 "| rank | layer | op | weights | weight quantizer | input quantizer | drop, weights only | "
                 "drop, input only | gain if float | SQNR layer (dB) | SQNR layer in net (dB) | "
                 "SQNR output, weights only (dB) | SQNR output, input only (dB) |",
                 "|---:|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for rank, row in enumerate(self.ranked(), 1):
            lines.append(f"| {rank} | `{row.layer}` | {row.op} | {row.weights:,} | {row.weight_quantizer} | "
                         f"{row.input_quantizer or 'float'} | {_points(row.drop_weights)} | "
                         f"{_points(row.drop_input)} | {_points(row.gain_float)} | {_db(row.sqnr_layer)} | "
                         f"{_db(row.sqnr_layer_in_net)} | {_db(row.sqnr_output_weights)} | "
                         f"{_db(row.sqnr_output_input)} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """Every figure; infinite SQNRs (no error) as null."""
        data = {"config": None if self.config is None else _config_json(self.config), "images": self.images,
                "fp32_top1": self.fp32_top1, "quantized_top1": self.quantized_top1,
                "quantized_sqnr": _finite(self.quantized_sqnr), "seconds": self.seconds,
                "ranking": [r.layer for r in self.ranked()],
                "layers": [{k: _finite(v) for k, v in dataclasses.asdict(r).items()} for r in self.rows]}
        return json.dumps(data, indent=2) + "\n"

    def figures(self) -> dict[str, bytes]:
        """file name -> PNG: per-layer drops (with labels) and per-layer SQNR."""
        names = [r.layer for r in self.rows]
        found = {}
        if self.fp32_top1 is not None:
            found["sensitivity.png"] = plots.layer_bars(
                names, {"weights only quantized": [r.drop_weights for r in self.rows],
                        "input only quantized": [r.drop_input for r in self.rows],
                        "every layer but this one quantized: gain": [r.gain_float for r in self.rows]},
                "top-1 points (drop from FP32; gain over the fully quantized net)",
                f"Per-layer sensitivity ({self.images} images; FP32 {100 * self.fp32_top1:.2f}%, "
                f"all quantized {100 * self.quantized_top1:.2f}%)")
        found["sqnr.png"] = plots.layer_bars(
            names, {"layer output, this layer alone quantized": [r.sqnr_layer for r in self.rows],
                    "layer output, every layer quantized": [r.sqnr_layer_in_net for r in self.rows],
                    "network output, weights only": [r.sqnr_output_weights for r in self.rows],
                    "network output, input only": [r.sqnr_output_input for r in self.rows]},
            "SQNR against float (dB, higher is better)", f"Per-layer SQNR ({self.images} images)")
        return found

    def plot(self, folder) -> list[Path]:
        """Write figures() as PNG files into `folder` (made when written); returns their paths."""
        return list(write_files_atomic({Path(folder) / name: png for name, png in self.figures().items()}))


Quantize = Callable[..., QuantizedNet]


def sensitivity(model, config: QuantConfig, data, labels=None, input_shape=None, *, quantize: Quantize,
                calib_data=None, calibration: Calibration = Calibration(), sweeps=SWEEPS, batch_size: int = 128,
                ctx=None, progress: bool = False) -> Sensitivity:
    """Quantize `model` (whatever `quantize` accepts: block, graph or files) as `config` says
    with `quantize` (passes.quantize), calibrate offline inputs on `calib_data` (default: `data`)
    and measure every quantized layer's sensitivity on `data` (N images) against `labels`."""
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, not {type(config).__name__}")
    if config.fake_bn:
        raise ConfigError("QuantConfig.fake_bn is a training form: analyse the model without it")
    images, labels = check_images(data, labels)
    net = quantize(model, config, input_shape=input_shape, ctx=ctx)
    if net.input_specs and not config.online:
        calibration.run(net, images if calib_data is None else calib_data, progress)
    return sensitivity_of(net, images, labels, sweeps, batch_size, progress, config)


def sensitivity_of(net: QuantizedNet, data, labels=None, sweeps=SWEEPS, batch_size: int = 128,
                   progress: bool = False, config: QuantConfig | None = None) -> Sensitivity:
    """The sweeps of `sweeps` (weights, inputs, all_but, sqnr) over `net` as it is (its specs,
    thresholds and online/offline mode) on `data`, top-1 against `labels` when given."""
    unknown = sorted(set(sweeps) - set(SWEEPS))
    if unknown:
        raise ConfigError(f"sweeps: unknown {unknown[0]!r}; known: {', '.join(SWEEPS)}")
    start = time.perf_counter()
    images, labels = check_images(data, labels)
    variants = Variants(net, images, batch_size)
    weights, inputs = variants.weight_specs, variants.input_specs
    every_weight, every_input = list(weights.values()), list(inputs.values())
    reference = variants.logits()
    quantized = variants.logits(every_weight, every_input)

    def measure(run_weights=(), run_inputs=()):
        logits = variants.logits(run_weights, run_inputs)
        return _top1(logits, labels), sqnr_db(*_signal_noise(reference, logits))

    fp32 = _top1(reference, labels)
    found = {layer: {} for layer in variants.layers}
    bar = tqdm(total=len(variants.layers) * len(set(sweeps) - {"sqnr"}), desc="sensitivity", leave=False,
               disable=not progress)
    for sweep in ("weights", "inputs", "all_but"):
        if sweep not in sweeps:
            continue
        for layer in variants.layers:
            if sweep == "weights" and layer in weights:
                found[layer]["weights"] = measure([weights[layer]])
            elif sweep == "inputs" and layer in inputs:
                found[layer]["inputs"] = measure(run_inputs=[inputs[layer]])
            elif sweep == "all_but":
                found[layer]["all_but"] = measure([s for s in every_weight if s.layer != layer],
                                                  [s for s in every_input if s.layer != layer])
            bar.update(1)
    bar.close()
    own = variants.own_sqnr() if "sqnr" in sweeps else {}
    in_net = variants.output_sqnr(every_weight, every_input) if "sqnr" in sweeps else {}
    quantized_top1 = _top1(quantized, labels)
    rows = tuple(_row(variants, layer, found[layer], fp32, quantized_top1, own, in_net)
                 for layer in variants.layers)
    return Sensitivity(config, len(images), fp32, quantized_top1, sqnr_db(*_signal_noise(reference, quantized)),
                       rows, time.perf_counter() - start)


def _row(variants, layer, found, fp32, quantized_top1, own, in_net) -> LayerSensitivity:
    weight, data = variants.weight_specs.get(layer), variants.input_specs.get(layer)

    def drop(key):
        return None if fp32 is None or key not in found else 100 * (fp32 - found[key][0])

    gain = None if quantized_top1 is None or "all_but" not in found else 100 * (found["all_but"][0] - quantized_top1)
    return LayerSensitivity(
        layer, variants.graph.op(layer), int(np.prod(weight.shape)) if weight else 0,
        f"int{weight.bits} per {weight.granularity}" if weight else "float",
        f"{'int' if data.signed else 'uint'}{data.bits}" if data else "",
        drop("weights"), drop("inputs"), gain, own.get(layer), in_net.get(layer),
        found.get("weights", (None, None))[1], found.get("inputs", (None, None))[1])


def _top1(logits: np.ndarray, labels) -> float | None:
    return None if labels is None else float(np.mean(logits.argmax(axis=1) == labels))


def _signal_noise(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    reference = reference.astype(np.float64)
    return float(np.sum(reference ** 2)), float(np.sum((logits - reference) ** 2))


def _finite(value):
    return None if isinstance(value, float) and math.isinf(value) else value


def _points(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _db(value) -> str:
    if value is None:
        return ""
    return "∞" if math.isinf(value) and value > 0 else f"{value:.1f}"


def _config_json(config: QuantConfig) -> dict:
    fields = dataclasses.asdict(config)
    fields["layer_overrides"] = config.overrides_json()
    return fields
