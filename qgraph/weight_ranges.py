"""Weight ranges chosen by squared error, kept through QAT: how 2-bit weights train.

The contract's weight step is max|W_g| / L (L = 2^(b-1) - 1, DESIGN.md), so at 2 bits (L = 1)
every weight below half its group's maximum rounds to zero: 89% of cifar_resnet20_v1's 3x3
weights. Instead of a new kind of step that every form and exporter would have to learn, the
weights themselves are clipped: before QAT each group W_g is clipped to the range t_g that
minimises ||Q_t(W_g) - W_g||^2 (Q_t: the contract's quantizer with step t / L, searched over
fractions of max|W_g|), and after every training step it is projected back into that range.
max|W_g| is then t_g, so the contract's own step is t_g / L in the simulation, in `fixed_graph`
and in every exporter, which all read the stored weights. The ranges are a function of the
weights QAT starts from, so a resumed run that loads those first chooses the same ones.

With fake BatchNorm (passes/fake_bn.py) the quantized weight is the folded one, W * s with
s = gamma / sqrt(running_var + eps) per output channel, so the range applies to W * s: W is
clipped to t / |s|.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .deploy.integers import round_ties
from .errors import ConfigError
from .folding import bn_scale
from .quantizer import FakeQuantSpec
from .tags import FAKE_BN_TAG

RANGES = ("max", "mse")  # train.py --weight-range: the contract's own, or these
FRACTIONS = np.linspace(0.02, 1.0, 50)  # of max|W_g|; 1.0 keeps the contract's own range


def mse_ranges(grouped: np.ndarray, levels: int, axes: tuple, rounding: str = "half_away") -> np.ndarray:
    """Per group (the array reduced over `axes`, dimensions kept), the range t among FRACTIONS of
    max|W_g| that minimises sum (Q_t(W) - W)^2, with Q_t(W) = clip(round(W / (t/L)), -L, L) * t/L.
    The first of equal errors wins, so a group quantized exactly by its maximum keeps it."""
    values = np.asarray(grouped, np.float64)
    maximum = np.abs(values).max(axis=axes, keepdims=True)
    best_error = np.full(maximum.shape, np.inf)
    best = maximum.copy()
    for fraction in FRACTIONS[::-1]:  # from 1.0 down: ties keep the larger range
        step = np.where(maximum > 0, fraction * maximum / levels, 1.0)
        quantized = np.clip(round_ties(values / step, rounding), -levels, levels) * step
        error = ((quantized - values) ** 2).sum(axis=axes, keepdims=True)
        better = error < best_error * (1 - 1e-12)
        best_error = np.where(better, error, best_error)
        best = np.where(better, fraction * maximum, best)
    return best


@dataclass
class _Clip:
    spec: FakeQuantSpec
    weight: str            # the parameter holding W
    bn: str | None         # the fake-BN BatchNorm whose running statistics fold W, if any
    ranges: np.ndarray     # t per group, shaped as W * s grouped by spec.reshape and reduced over spec.axes


class WeightRanges:
    """Every quantized weight of a QuantizedNet clipped to a range per scale group: `choose(net)`
    picks the ranges of least squared error and clips; `apply(net)` projects the weights back
    into them, after each optimizer step."""

    def __init__(self, clips: list[_Clip]):
        self.clips = clips
        self.moved = 0  # values the first clip moved

    @classmethod
    def choose(cls, net) -> "WeightRanges":
        """The ranges of least squared error (mse_ranges) of every weight spec of `net`, from its
        current weights; clips the weights into them."""
        values = net.parameter_values()
        clips = []
        for spec in net.weight_specs:
            if spec.winograd:
                raise ConfigError(f"weight ranges: '{spec.layer}' quantizes its weight in the Winograd domain, "
                                  "where clipping W does not set the step; use --weight-range max")
            if spec.offsets:
                raise ConfigError(f"weight ranges: '{spec.layer}' has learned rounding (AdaRound); "
                                  "clipping would change the weights it was learned for")
            weight, bn = _weight_source(net.float_graph, spec)
            folded = _folded(spec, values[weight], _bn_scale(net.float_graph, bn, values) if bn else None)
            clips.append(_Clip(spec, weight, bn, mse_ranges(folded, spec.levels, spec.axes, spec.rounding)))
        ranges = cls(clips)
        ranges.moved = ranges.apply(net)
        return ranges

    def apply(self, net) -> int:
        """Clip every weight into its range (as W * s with fake BN); returns how many values moved."""
        params = net.collect_params()
        moved = 0
        for clip in self.clips:
            values = {clip.weight: params[clip.weight].data().asnumpy()}
            scale = None
            if clip.bn is not None:
                values.update(_bn_values(net.float_graph, clip.bn, params))
                scale = _bn_scale(net.float_graph, clip.bn, values)
            folded = _folded(clip.spec, values[clip.weight], scale)
            outside = np.abs(folded) > clip.ranges * (1 + 1e-6)  # not W's float32 rounding of t / s
            if not outside.any():
                continue
            moved += int(outside.sum())
            clipped = np.clip(folded, -clip.ranges, clip.ranges).reshape(values[clip.weight].shape)
            if scale is not None:  # back to W; a zero scale's channel is zero either way, keep W
                per_channel = scale.reshape(-1, *([1] * (clipped.ndim - 1)))
                clipped = np.where(per_channel != 0, clipped / np.where(per_channel != 0, per_channel, 1),
                                   values[clip.weight])
            params[clip.weight].set_data(clipped.astype(values[clip.weight].dtype))
        return moved

    def ranges(self) -> dict[str, np.ndarray]:
        """layer -> its ranges, one per scale group."""
        return {clip.spec.layer: clip.ranges.reshape(-1) for clip in self.clips}


def _weight_source(graph, spec: FakeQuantSpec) -> tuple[str, str | None]:
    """(the parameter a weight spec quantizes, the fake-BN BatchNorm folding it or None)."""
    source = graph.inputs(spec.layer)[spec.slot].node
    bn = graph.attrs(source).get(FAKE_BN_TAG)
    if bn and graph.op(source) == "broadcast_div":  # conv(x, (W * s) / s): W is the fold's first input
        source = graph.inputs(graph.inputs(source)[0].node)[0].node
    if graph.op(source) != "null":
        raise ConfigError(f"weight ranges: the weight of '{spec.layer}' is computed by '{source}', "
                          "not a stored parameter")
    return source, bn or None


def _bn_scale(graph, bn: str, values) -> np.ndarray:
    """The fold's s of BatchNorm `bn` for the parameter values in `values` (name -> array)."""
    gamma, _, _, variance = (r.node for r in graph.inputs(bn)[1:5])
    return bn_scale(graph, bn, values[gamma], values[variance])


def _bn_values(graph, bn: str, params) -> dict:
    gamma, _, _, variance = (r.node for r in graph.inputs(bn)[1:5])
    return {name: params[name].data().asnumpy() for name in (gamma, variance)}


def _folded(spec: FakeQuantSpec, weight: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The quantized weight as the spec groups it: W (or W * s per output channel, fake BN)
    reshaped by spec.reshape, in float64."""
    w = np.asarray(weight, np.float64)
    if scale is not None:
        w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    return w.reshape(spec.reshape)
