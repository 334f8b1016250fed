"""The quantization report of one model and QuantConfig: `analyze()` measures (sensitivity on
held-out training images, input histograms with every calibration method's threshold, weight
ranges before and after BatchNorm folding, the mixed-precision search, and the test-split top-1
of FP32, the config and the chosen mix); `Analysis.write(folder)` writes index.md, the JSON
figures, the chosen mix as a --layer-config file and the PNG plots, all at once.

The search sees only held-out training images; the test split is evaluated once per
configuration at the end, to say whether the held-out target still holds there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..calibrate import Calibration
from ..config import QuantConfig
from ..data import EvalSet, dataset_info, spread
from ..evaluate import Accuracy, accuracy
from ..graph import Graph
from ..io import to_block, write_files_atomic
from ..runtime import QuantizedNet
from . import plots
from .ranges import channel_ranges, input_histograms, threshold_survey
from .search import PrecisionSearch, run_precision_search, weight_bits
from .sweeps import SWEEPS, Sensitivity, sensitivity_of

Quantize = Callable[..., QuantizedNet]


@dataclass
class Analysis:
    """Everything the report shows; `test` maps 'fp32', 'config' and 'mixed' to test-split accuracy."""

    name: str
    config: QuantConfig
    calibration: str
    sensitivity: Sensitivity
    histograms: list
    weight_ranges: list
    search: PrecisionSearch | None = None
    test: dict = field(default_factory=dict)
    bits: dict = field(default_factory=dict)      # 'fp32' / 'config' / 'mixed' -> weight bits

    def target_holds_on_test(self) -> bool | None:
        if self.search is None or "mixed" not in self.test:
            return None
        return 100 * (self.test["fp32"].top1 - self.test["mixed"].top1) <= self.search.max_drop + 1e-9

    def figures(self) -> dict[str, bytes]:
        """file name -> PNG."""
        found = dict(self.sensitivity.figures())
        for i, page in enumerate(plots.input_histograms(self.histograms), 1):
            found[f"inputs_{i}.png"] = page
        ranges = self.weight_ranges
        found["weight_range_ratio.png"] = plots.range_ratios(
            [r["layer"] for r in ranges], [_spread(r["before"]) for r in ranges],
            [None if r["after"] is None else _spread(r["after"]) for r in ranges])
        for i, page in enumerate(plots.weight_ranges(ranges, self.config.weight_bits), 1):
            found[f"weight_ranges_{i}.png"] = page
        if self.search is not None:
            found["top1_vs_bits.png"] = plots.top1_against_bits(
                self._points(), self.search.fp32_top1 - self.search.max_drop / 100,
                f"{self.name}: top-1 against weight bits")
        return found

    def _points(self) -> list[dict]:
        search, weights = self.search, sum(n for _, n in self.search.weights)
        points = [{"bits": s.weight_bits / weights, "top1": s.top1, "kind": "step"} for s in search.steps]
        points += [{"bits": search.weight_bits_at(bits) / weights, "top1": top1, "kind": "uniform",
                    "label": "float" if bits is None else f"all {bits}-bit"} for bits, top1 in search.uniform]
        points.append({"bits": search.weight_bits / weights, "top1": search.top1, "kind": "chosen", "label": "mix"})
        for key, label in (("fp32", "FP32"), ("config", "config"), ("mixed", "mix")):
            if key in self.test:
                points.append({"bits": self.bits[key] / weights, "top1": self.test[key].top1, "kind": "test",
                               "label": f"{label} (test)"})
        return points

    def to_markdown(self, figures) -> str:
        lines = [f"# Quantization analysis: {self.name}", "",
                 f"Config: {_describe(self.config)}. Input thresholds: {self.calibration}.", ""]
        if self.test:
            lines += self._test_section()
        lines += ["## Per-layer sensitivity", "",
                  "Held-out training images (never the test split). Drops are FP32 top-1 minus the "
                  "configuration's; *gain if float* is what keeping only that layer in float wins over the fully "
                  "quantized net; *SQNR layer* quantizes the layer alone (its own error), *in net* every layer "
                  "(accumulated).", "", self.sensitivity.to_markdown(), "![sensitivity](sensitivity.png)", "",
                  "![SQNR](sqnr.png)", ""]
        if self.search is not None:
            lines += ["## Mixed precision", "", self.search.to_markdown(),
                      "As a `--layer-config` file (`layer_config.json`):", "", "```json",
                      layer_config_text(self.search.config).rstrip(), "```", "",
                      "![top-1 against bits](top1_vs_bits.png)", ""]
        lines += ["## Quantized inputs", "",
                  "Each quantized input's values on the calibration images (log counts) and the threshold each "
                  "calibration method picks (dashed: -T for signed inputs).", ""]
        lines += [f"![inputs]({name})" for name in figures if name.startswith("inputs_")] + [""]
        lines += ["## Weight ranges before and after BatchNorm folding", "",
                  "One per-layer scale must cover the largest channel: the ratio of the largest to the median "
                  "channel range shows where per-layer weights collapse once BatchNorm is folded.", "",
                  "![ratio](weight_range_ratio.png)", ""]
        lines += [f"![weight ranges]({name})" for name in figures if name.startswith("weight_ranges_")]
        return "\n".join(lines) + "\n"

    def _test_section(self) -> list[str]:
        fp32 = self.test["fp32"].top1
        lines = ["## Test split", "", "| configuration | top-1 | drop (points) | weight bits |", "|---|---:|---:|---:|"]
        names = {"fp32": "FP32", "config": "the config, every layer as set", "mixed": "the chosen mix"}
        for key, label in names.items():
            if key in self.test:
                lines.append(f"| {label} | {100 * self.test[key].top1:.2f}% | {100 * (fp32 - self.test[key].top1):.2f}"
                             f" | {self.bits[key]:,} |")
        holds = self.target_holds_on_test()
        if holds is not None:
            drop = 100 * (fp32 - self.test["mixed"].top1)
            lines += ["", f"The {self.search.max_drop:g}-point target (met on {self.search.images} held-out images with "
                          f"a drop of {self.search.drop:.2f}): the test-split drop is {drop:.2f} points, so it "
                          f"{'holds' if holds else 'does not hold'} on the test split ({self.test['fp32'].images} "
                          "images)."]
        return lines + [""]

    def write(self, folder) -> tuple[Path, ...]:
        """index.md, sensitivity.json, search.json and layer_config.json (with a search), and the
        PNGs into `folder`, all at once (the folder is made then)."""
        folder = Path(folder)
        figures = self.figures()
        files = {folder / name: png for name, png in figures.items()}
        files[folder / "sensitivity.json"] = self.sensitivity.to_json()
        if self.search is not None:
            files[folder / "search.json"] = self.search.to_json()
            files[folder / "layer_config.json"] = layer_config_text(self.search.config)
        files[folder / "index.md"] = self.to_markdown(figures)
        return write_files_atomic(files)


def analyze(graph: Graph, config: QuantConfig, calib_images, holdout: tuple, test: EvalSet | None, *,
            quantize: Quantize, calibration: Calibration | None = None, name: str = "model",
            sensitivity_images: int = 1000, max_drop: float | None = 1.0, candidates=(4, 8, None),
            sweeps=SWEEPS, batch_size: int = 128, ctx=None, progress: bool = False) -> Analysis:
    """Measure what the report shows. `holdout` is (images, labels) of training images outside
    the calibration set: sensitivity runs on `sensitivity_images` of them spread over the set, the
    search (unless `max_drop` is None) on all; `calibration` None keeps inputs online."""
    images, labels = holdout
    chosen = spread(len(labels), sensitivity_images)
    net = quantize(graph, config, ctx=ctx)
    if calibration is not None and net.input_specs:
        calibration.run(net, calib_images, progress)
    sensitivity = sensitivity_of(net, images[chosen], labels[chosen], sweeps, batch_size, progress, config)
    histograms = _histogram_panels(net, calib_images, calibration or Calibration())
    analysis = Analysis(name, config, _describe_calibration(calibration, len(calib_images)), sensitivity,
                        histograms, channel_ranges(graph))
    if max_drop is not None:
        analysis.search = run_precision_search(graph, config, calib_images, images, labels, max_drop, candidates,
                                               quantize=quantize, calibration=calibration or Calibration(),
                                               batch_size=batch_size, ctx=ctx, progress=progress)
    if test is not None:
        _evaluate_test(analysis, graph, net, quantize, calibration, calib_images, test, batch_size, ctx, progress)
    return analysis


def layer_config_text(config: QuantConfig) -> str:
    """config.layer_overrides as a --layer-config JSON object, one layer a line."""
    entries = [f"  {json.dumps(pattern)}: {json.dumps(entry)}" for pattern, entry in config.overrides_json().items()]
    return "{\n" + ",\n".join(entries) + "\n}\n" if entries else "{}\n"


def _evaluate_test(analysis, graph, net, quantize, calibration, calib_images, test, batch_size, ctx, progress):
    classes = dataset_info(test.dataset).classes

    def evaluate(block, desc) -> Accuracy:
        return accuracy(block, test.batches(batch_size), classes, batch_size, ctx, desc, progress)

    analysis.test["fp32"] = evaluate(to_block(graph, ctx), "test: fp32")
    analysis.bits["fp32"] = weight_bits(graph, {})
    analysis.test["config"] = evaluate(net, "test: config")
    analysis.bits["config"] = weight_bits(graph, {s.layer: s.bits for s in net.weight_specs})
    if analysis.search is not None:
        mixed = quantize(graph, analysis.search.config, ctx=ctx)
        if calibration is not None and mixed.input_specs:
            calibration.run(mixed, calib_images, progress)
        analysis.test["mixed"] = evaluate(mixed, "test: mixed")
        analysis.bits["mixed"] = weight_bits(graph, {s.layer: s.bits for s in mixed.weight_specs})


def _histogram_panels(net, calib_images, calibration) -> list[dict]:
    if not net.input_specs:
        return []
    histograms = input_histograms(net, calib_images, batch_size=calibration.batch_size)
    surveyed = threshold_survey(net, calib_images, calibration=calibration)
    return [{"layer": s.layer, "counts": histograms[s.layer][0], "edges": histograms[s.layer][1],
             "signed": s.signed, "bits": s.bits,
             "thresholds": {mode: found[s.layer] for mode, found in surveyed.items()}} for s in net.input_specs]


def _spread(values) -> float:
    values = np.asarray(values, np.float64)
    median = float(np.median(values))
    return float(values.max() / median) if median > 0 else float("inf")


def _describe(config: QuantConfig) -> str:
    signed = {True: "int", False: "uint", "auto": "int/uint (auto)"}[config.input_signed]
    parts = [f"int{config.weight_bits} weights per {config.quant_type}",
             f"{signed}{config.input_bits} inputs" if config.quantize_input else "float inputs",
             "BatchNorm folded" if config.merge_bn else "BatchNorm kept",
             "first convolution in float" if config.exclude_first_conv else "first convolution quantized"]
    if config.layer_overrides:
        parts.append(f"{len(config.layer_overrides)} per-layer overrides")
    return ", ".join(parts)


def _describe_calibration(calibration: Calibration | None, count: int) -> str:
    if calibration is None:
        return "online (each batch's maximum)"
    return f"calibrated offline ({calibration.mode}) on {count} training images"
