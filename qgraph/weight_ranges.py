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
clipped to t / |s|, with the s of the statistics QAT starts from. Those are the same for every
worker and context of a run, a resumed one included, where each one's running statistics drift
apart until they are averaged; with BatchNorm not frozen, the grid then moves with s / s_0.
A group whose range is 0 (all-zero weights, or gamma = 0) is left unbounded.
"""
from __future__ import annotations

from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import autograd

from .deploy.integers import round_ties
from .errors import ConfigError
from .folding import bn_scale, fake_bn_fold
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
    ranges: np.ndarray     # t per group, as W * s_0 grouped by spec.reshape is reduced over spec.axes
    bound: np.ndarray      # t / |s_0| for every element of W (float32; inf where unbounded)


class WeightRanges:
    """Every quantized weight of a QuantizedNet clipped to a range per scale group: `choose(net)`
    picks the ranges of least squared error and clips; `apply(net)` projects the weights back
    into them, after each optimizer step."""

    def __init__(self, clips: list[_Clip]):
        self.clips = clips
        self.moved = 0  # values the first clip moved
        self._bounds: dict = {}  # (weight, context) -> the bound as an NDArray there

    @classmethod
    def choose(cls, net) -> "WeightRanges":
        """The ranges of least squared error (mse_ranges) of every weight spec of `net`, from its
        current weights (and BatchNorm statistics); clips the weights into them."""
        values = net.parameter_values()
        clips, moved = [], 0
        for spec in net.weight_specs:
            if spec.winograd:
                raise ConfigError(f"weight ranges: '{spec.layer}' quantizes its weight in the Winograd domain, "
                                  "where clipping W does not set the step; use --weight-range max")
            if spec.offsets:
                raise ConfigError(f"weight ranges: '{spec.layer}' has learned rounding (AdaRound); "
                                  "clipping would change the weights it was learned for")
            weight, bn = _weight_source(net.float_graph, spec)
            w = values[weight]
            scale = _bn_scale(net.float_graph, bn, values) if bn else np.ones(w.shape[0])
            per_channel = np.abs(scale).reshape(-1, *([1] * (w.ndim - 1)))
            folded = (w.astype(np.float64) * per_channel).reshape(spec.reshape)
            ranges = mse_ranges(folded, spec.levels, spec.axes, spec.rounding)
            limit = np.broadcast_to(np.where(ranges > 0, ranges, np.inf), folded.shape).reshape(w.shape)
            with np.errstate(divide="ignore", invalid="ignore"):
                bound = np.where(per_channel > 0, limit / per_channel, np.inf).astype(np.float32)
            moved += int((np.abs(w) > bound).sum())
            clips.append(_Clip(spec, weight, ranges, bound))
        ranges = cls(clips)
        ranges.apply(net)
        ranges.moved = moved
        return ranges

    def apply(self, net) -> None:
        """Clip every weight into its range, on each context, without leaving the device."""
        params = net.collect_params()
        with autograd.pause():
            for clip in self.clips:
                for data in params[clip.weight].list_data():
                    key = (clip.weight, data.context)
                    if key not in self._bounds:
                        bound = mx.nd.array(clip.bound, ctx=data.context, dtype=data.dtype)
                        self._bounds[key] = (-bound, bound)
                    lower, upper = self._bounds[key]
                    mx.nd.broadcast_minimum(mx.nd.broadcast_maximum(data, lower), upper, out=data)

    def ranges(self) -> dict[str, np.ndarray]:
        """layer -> its ranges, one per scale group."""
        return {clip.spec.layer: clip.ranges.reshape(-1) for clip in self.clips}


def _weight_source(graph, spec: FakeQuantSpec) -> tuple[str, str | None]:
    """(the parameter a weight spec quantizes, the fake-BN BatchNorm folding it or None)."""
    source = graph.inputs(spec.layer)[spec.slot].node
    bn = graph.attrs(source).get(FAKE_BN_TAG)
    folded = fake_bn_fold(graph, spec.layer, bn) if bn else None
    if folded is not None:  # conv(x, (W * s) / s): W is the fold's first input
        source = graph.inputs(folded.node)[0].node
    else:
        bn = None
    if graph.op(source) != "null":
        raise ConfigError(f"weight ranges: the weight of '{spec.layer}' is computed by '{source}', "
                          "not a stored parameter")
    return source, bn


def _bn_scale(graph, bn: str, values) -> np.ndarray:
    """The fold's s of BatchNorm `bn` for the parameter values in `values` (name -> array)."""
    gamma, _, _, variance = (r.node for r in graph.inputs(bn)[1:5])
    return bn_scale(graph, bn, values[gamma], values[variance])
