"""Mixed precision: the per-layer bit widths (or float) that keep top-1 within `max_drop` points of
FP32 on held-out data while spending the fewest weight bits (after Intel Neural Compressor's
accuracy-driven fallback).

A layer's level is one of `candidates` (say 4, 8, None = float), applied to its weights and its
input alike. The search runs on held-out images the caller provides (a part of the training
split that calibration did not use; never the test split):

1. Every layer at each level alike; the top level must meet the target, else ConfigError.
2. Each layer alone at the lowest level, every other one at the top: its drop, per weight
   element, orders the layers (the most costly per bit first).
3. Starting from every layer at the lowest level, layers move up one level in that order
   (round after round); a bisection over the number of moves finds the first state that meets
   the target.
4. The moves are undone one at a time, last first, wherever the target still holds.
5. The chosen mix is built with the pass pipeline, calibrated and evaluated as a user would; while
   it misses the target, the first move of step 3's order that still raises a layer is taken.

The result is `config` at the lowest level with an override for every layer elsewhere (float
overrides of `config` stay; its other overrides give way to the search).

Steps 1-4 run on one qgraph.analysis.variants.Variants whose thresholds were calibrated once
per bit width; step 5 is the check that those stand-ins were fair.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..calibrate import Calibration
from ..config import LayerOverride, QuantConfig
from ..errors import ConfigError
from ..evaluate import predict
from ..graph import Graph
from ..quantizer import QUANTIZABLE_OPS, weight_param
from ..runtime import QuantizedNet
from .variants import Variants, check_images

FLOAT_BITS = 32


@dataclass(frozen=True)
class SearchStep:
    """One configuration the search evaluated: what changed, its weight bits and held-out top-1."""

    action: str
    weight_bits: int
    top1: float
    kept: bool = True


@dataclass(frozen=True)
class PrecisionSearch:
    """The chosen mix (`config`, `levels`: layer -> bits or None) with its held-out top-1 (built
    and calibrated as a user would), FP32's, every uniform level's, and every step taken."""

    config: QuantConfig
    levels: tuple             # ((layer, bits or None), ...) in network order
    weights: tuple            # ((layer, weight elements), ...) of every Convolution/Deconvolution/FullyConnected
    max_drop: float
    images: int
    fp32_top1: float
    top1: float
    uniform: tuple            # ((bits or None, top-1), ...)
    steps: tuple
    seconds: float = 0.0

    @property
    def drop(self) -> float:
        return 100 * (self.fp32_top1 - self.top1)

    @property
    def weight_bits(self) -> int:
        return _size(dict(self.weights), dict(self.levels))

    @property
    def int8_weight_bits(self) -> int:
        """The same model with every layer the search covered at 8 bits."""
        return self.weight_bits_at(8)

    def weight_bits_at(self, bits) -> int:
        """Weight bits with every layer the search covered at `bits` (None: float)."""
        return _size(dict(self.weights), {layer: bits for layer, _ in self.levels})

    def share_at(self, bits) -> float:
        """Fraction of all weight elements at `bits` (None: float, layers left out included)."""
        weights, levels = dict(self.weights), dict(self.levels)
        return sum(n for layer, n in weights.items() if levels.get(layer) == bits) / max(sum(weights.values()), 1)

    def to_markdown(self) -> str:
        counts = {bits: sum(1 for _, b in self.levels if b == bits) for bits in dict.fromkeys(b for _, b in self.levels)}
        lines = [f"Held-out images: {self.images}; target: at most {self.max_drop:g} points below FP32 "
                 f"({100 * self.fp32_top1:.2f}%).", "",
                 f"- chosen mix: {100 * self.top1:.2f}% (drop {self.drop:.2f} points), built and calibrated",
                 f"- weight size: {self.weight_bits:,} bits against {self.int8_weight_bits:,} at int8 "
                 f"({self.weight_bits / self.int8_weight_bits:.3f}x)",
                 "- layers: " + ", ".join(f"{n} at {_name(b)}" for b, n in counts.items()),
                 "- weight elements: " + ", ".join(f"{100 * self.share_at(b):.1f}% at {_name(b)}" for b in
                                                  dict.fromkeys([b for _, b in self.levels] + [None])
                                                  if self.share_at(b) > 0),
                 "- every layer alike: " + ", ".join(f"{_name(b)} {100 * t:.2f}%" for b, t in self.uniform), "",
                 "| layer | weights | level |", "|---|---:|---|"]
        weights = dict(self.weights)
        lines += [f"| `{layer}` | {weights[layer]:,} | {_name(bits)} |" for layer, bits in self.levels]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({
            "layer_overrides": self.config.overrides_json(), "levels": dict(self.levels),
            "weights": dict(self.weights), "max_drop": self.max_drop, "images": self.images,
            "fp32_top1": self.fp32_top1, "top1": self.top1, "drop": self.drop, "weight_bits": self.weight_bits,
            "int8_weight_bits": self.int8_weight_bits, "uniform": [list(u) for u in self.uniform],
            "steps": [dataclasses.asdict(s) for s in self.steps], "seconds": self.seconds}, indent=2) + "\n"


Quantize = Callable[..., QuantizedNet]


def search_precision(model, config: QuantConfig, calib_data, val_data, val_labels, max_drop: float = 1.0,
                     candidates=(4, 8, None), input_shape=None, *, quantize: Quantize,
                     calibration: Calibration = Calibration(), batch_size: int = 128, ctx=None,
                     progress: bool = False) -> QuantConfig:
    """The QuantConfig (`config` with per-layer overrides) that keeps top-1 on `val_data` within
    `max_drop` points of FP32 with the fewest weight bits; run_precision_search also returns
    the figures."""
    return run_precision_search(model, config, calib_data, val_data, val_labels, max_drop, candidates,
                                input_shape, quantize=quantize, calibration=calibration, batch_size=batch_size,
                                ctx=ctx, progress=progress).config


def run_precision_search(model, config: QuantConfig, calib_data, val_data, val_labels, max_drop: float = 1.0,
                         candidates=(4, 8, None), input_shape=None, *, quantize: Quantize,
                         calibration: Calibration = Calibration(), batch_size: int = 128, ctx=None,
                         progress: bool = False) -> PrecisionSearch:
    """The search of this module's docstring; returns the chosen mix with its figures. `model`
    is whatever `quantize` (passes.quantize) accepts; offline inputs are calibrated with
    `calibration` on `calib_data`."""
    start = time.perf_counter()
    levels = _check(config, max_drop, candidates)
    images, labels = check_images(val_data, val_labels, "val_data", "val_labels")
    nets = {}
    for bits in (b for b in levels if b is not None):
        nets[bits] = quantize(model, _uniform(config, bits), input_shape=input_shape, ctx=ctx)
        if nets[bits].input_specs and not config.online:
            calibration.run(nets[bits], calib_data, progress)
    lowest = nets[levels[0]]
    variants = Variants(lowest, images, batch_size)
    search = _Search(variants, nets, levels, labels, max_drop, progress)
    search.run()
    chosen = search.verify(lambda state: _build(model, config, state, levels, quantize, calibration, calib_data,
                                                input_shape, ctx, progress), images, batch_size)
    return PrecisionSearch(_mixed_config(config, chosen, levels), tuple(chosen.items()),
                           tuple(_weights(variants.graph).items()), max_drop, len(images), search.fp32,
                           search.verified_top1, tuple(search.uniform.items()), tuple(search.steps),
                           time.perf_counter() - start)


def weight_bits(graph: Graph, levels) -> int:
    """Bits of every Convolution/Deconvolution/FullyConnected weight of `graph` with the layers in
    `levels` (layer -> bits, None = float) at those widths and every other layer in float."""
    return _size(_weights(graph), dict(levels))


class _Search:
    def __init__(self, variants: Variants, nets: dict, levels: tuple, labels, max_drop: float, progress: bool):
        self.variants, self.levels, self.labels, self.max_drop = variants, levels, labels, max_drop
        self.layers = variants.layers
        self.weights = _weights(variants.graph)
        self.specs = {bits: ({s.layer: s for s in net.weight_specs}, {s.layer: s for s in net.input_specs},
                             net.thresholds() if net.input_specs and not net.mode.online else None)
                      for bits, net in nets.items()}
        self.steps: list[SearchStep] = []
        self.uniform: dict = {}
        self.moves: list = []
        self.progress = progress
        self.fp32 = self.top1(dict.fromkeys(self.layers))

    def top1(self, state: dict, action: str | None = None) -> float:
        """Held-out top-1 of `state` (layer -> bits or None); recorded as a step under `action`."""
        weights, inputs, thresholds = [], [], {}
        for layer, bits in state.items():
            if bits is None:
                continue
            weight_specs, input_specs, found = self.specs[bits]
            if layer in weight_specs:
                weights.append(weight_specs[layer])
            if layer in input_specs:
                inputs.append(input_specs[layer])
                if found is not None:
                    thresholds[layer] = found[layer]
        logits = self.variants.logits(weights, inputs, thresholds if not self.variants.online else None)
        top1 = float(np.mean(logits.argmax(axis=1) == self.labels))
        if action is not None:
            self.steps.append(SearchStep(action, _size(self.weights, state), top1, self.meets(top1)))
        return top1

    def meets(self, top1: float) -> bool:
        return 100 * (self.fp32 - top1) <= self.max_drop + 1e-9

    def run(self) -> None:
        for bits in self.levels:
            state = dict.fromkeys(self.layers, bits)
            self.uniform[bits] = self.fp32 if bits is None else self.top1(state, f"every layer at {_name(bits)}")
        top = self.levels[-1]
        if not self.meets(self.uniform[top]):
            where = "in float" if top is None else f"at {_name(top)}"
            raise ConfigError(f"max_drop={self.max_drop:g}: cannot be met even with every layer {where} "
                              f"(drop {100 * (self.fp32 - self.uniform[top]):.2f} points on "
                              f"{self.variants.count} held-out images)")
        lowest = self.levels[0]
        cost = {}
        bar = tqdm(self.layers, desc="search: layers alone", leave=False, disable=not self.progress)
        for layer in bar:
            state = dict.fromkeys(self.layers, top)
            state[layer] = lowest
            drop = 100 * (self.fp32 - self.top1(state, f"only {layer} at {_name(lowest)}"))
            cost[layer] = drop / max(self.weights.get(layer, 1), 1)
        order = sorted(self.layers, key=lambda layer: -cost[layer])
        self.moves = [(layer, self.levels[step]) for step in range(1, len(self.levels)) for layer in order]
        self.state = dict.fromkeys(self.layers, lowest)
        if self.meets(self.uniform[lowest]):
            self.taken = 0
            return
        low, high = 0, len(self.moves)  # state after `high` moves (every layer at the top) meets the target
        while high - low > 1:
            middle = (low + high) // 2
            if self.meets(self.top1(self._after(middle), f"first {middle} moves up")):
                high = middle
            else:
                low = middle
        self.taken = high
        self.state = self._after(high)
        self._undo()

    def _after(self, count: int) -> dict:
        state = dict.fromkeys(self.layers, self.levels[0])
        for layer, bits in self.moves[:count]:
            state[layer] = bits
        return state

    def _undo(self) -> None:
        """Take moves back, last first, wherever the target still holds."""
        for layer, bits in reversed(self.moves[:self.taken]):
            if self.state[layer] != bits:
                continue
            lower = self.levels[self.levels.index(bits) - 1]
            trial = dict(self.state, **{layer: lower})
            if self.meets(self.top1(trial, f"{layer} back to {_name(lower)}")):
                self.state = trial

    def verify(self, build: Callable[[dict], QuantizedNet], images: np.ndarray, batch_size: int) -> dict:
        """Build the chosen state as a user would; until that meets the target, take the first
        move (in the search's order) that raises a layer, and build again."""
        state = dict(self.state)
        while True:
            self.verified_top1 = float(np.mean(predict(build(state), images, batch_size) == self.labels))
            self.steps.append(SearchStep("chosen mix, built and calibrated", _size(self.weights, state),
                                         self.verified_top1, self.meets(self.verified_top1)))
            raising = [(layer, bits) for layer, bits in self.moves
                       if self.levels.index(bits) > self.levels.index(state[layer])]
            if self.meets(self.verified_top1) or not raising:
                return state
            layer, bits = raising[0]
            state[layer] = bits


def _check(config: QuantConfig, max_drop, candidates) -> tuple:
    """The candidates as levels, cheapest first (ints ascending, then None)."""
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, not {type(config).__name__}")
    if config.fake_bn:
        raise ConfigError("QuantConfig.fake_bn is a training form: search without it")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not np.isfinite(max_drop):
        raise ConfigError(f"max_drop={max_drop!r}: must be a number of top-1 points")
    bits = [c for c in candidates if c is not None]
    if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16 for b in bits) or \
            len(set(candidates)) != len(tuple(candidates)):
        raise ConfigError(f"candidates={tuple(candidates)!r}: must be distinct bit widths in 2..16, and None for float")
    return tuple(sorted(bits)) + ((None,) if None in candidates else ())


def _uniform(config: QuantConfig, bits: int) -> QuantConfig:
    """`config` with every layer at `bits`; its float overrides stay, the rest give way to the search."""
    floats = tuple((pattern, entry) for pattern, entry in config.layer_overrides if entry.float)
    return config.replace(weight_bits=bits, input_bits=bits, layer_overrides=floats)


def _mixed_config(config: QuantConfig, state: dict, levels: tuple) -> QuantConfig:
    """`config` (at the lowest level) with an override for every layer elsewhere."""
    base = _uniform(config, levels[0])
    overrides = [(layer, LayerOverride(float=True) if bits is None else LayerOverride(weight_bits=bits, input_bits=bits))
                 for layer, bits in state.items() if bits != levels[0]]
    return base.replace(layer_overrides=base.layer_overrides + tuple(overrides))


def _build(model, config, state, levels, quantize, calibration, calib_data, input_shape, ctx, progress):
    net = quantize(model, _mixed_config(config, state, levels), input_shape=input_shape, ctx=ctx)
    if net.input_specs and not config.online:
        calibration.run(net, calib_data, progress)
    return net


def _weights(graph: Graph) -> dict:
    """layer -> weight elements of every Convolution/Deconvolution/FullyConnected."""
    found = {}
    for layer in graph.nodes(QUANTIZABLE_OPS):
        weight = graph.params.get(weight_param(graph, layer))
        if weight is not None:
            found[layer] = int(weight.size)
    return found


def _size(weights: dict, levels: dict) -> int:
    return sum(n * (levels.get(layer) or FLOAT_BITS) for layer, n in weights.items())


def _name(bits) -> str:
    return "float" if bits is None else f"{bits} bits"
