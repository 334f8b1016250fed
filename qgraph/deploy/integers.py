"""The integers behind the simulation's quantizers, in numpy, computed with the float32
arithmetic of the simulation's own operators (qgraph.quantizer), so that an exporter writes
the codes and steps the simulation stands for: weight codes and steps per output channel,
input steps, and the integer biases of QuantConfig.quantize_bias.

Each function mirrors one quantizer of DESIGN.md's contract; tests check them against the
simulation's values, bit for bit.
"""
from __future__ import annotations

import numpy as np

from ..errors import GraphError
from ..quantizer import MIN_SCALE, FakeQuantSpec, float32_at_most, signed_levels

F32 = np.float32


def round_ties(values: np.ndarray, rounding: str) -> np.ndarray:
    """Round to integers: 'half_even' (np.rint) or 'half_away' (MXNet's round)."""
    values = np.asarray(values, np.float64)
    if rounding == "half_even":
        return np.rint(values)
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def weight_codes(weight: np.ndarray, spec: FakeQuantSpec, channels: int | None = None,
                 offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(codes as int8/int16/int32, step of each output channel, float32) of a weight quantizer,
    for weights grouped by their first axis (per layer, group or channel of a Convolution or
    FullyConnected): s = max(max|W_g| / L, 1e-30), codes = clip(round(W / s), -L, L), or with
    learned rounding decisions R (AdaRound, `offsets` in W's shape) clip(floor(W / s) + R, -L, L)."""
    if tuple(spec.axes) != (1,) or len(spec.reshape) != 2:
        raise GraphError(f"'{spec.layer}': weights grouped as {spec.reshape} have no per-output-channel steps")
    w = np.asarray(weight, F32)
    groups = spec.reshape[0]
    grouped = w.reshape(groups, -1)
    steps = np.maximum(np.abs(grouped).max(axis=1) / F32(spec.levels), F32(MIN_SCALE)).astype(F32)
    scaled = (grouped / steps[:, None]).astype(F32)
    if offsets is not None:
        if np.shape(offsets) != w.shape:
            raise GraphError(f"'{spec.layer}': rounding decisions of shape {np.shape(offsets)} for a weight of {w.shape}")
        rounded = np.floor(scaled) + np.asarray(offsets, F32).reshape(groups, -1)
    else:
        rounded = round_ties(scaled, spec.rounding)
    codes = np.clip(rounded, -spec.levels, spec.levels)
    channels = channels or w.shape[0]
    dtype = np.int8 if spec.bits <= 8 else np.int16 if spec.bits <= 16 else np.int32
    return codes.astype(dtype).reshape(w.shape), np.repeat(steps, channels // groups).astype(F32)


def input_step(threshold: float, spec: FakeQuantSpec) -> np.float32:
    """The step of an input quantizer: float32(T) / float32(L)."""
    return F32(threshold) / F32(spec.levels)


def bias_codes(bias: np.ndarray, weight_steps: np.ndarray, step: float, rounding: str,
               bits: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(int32 codes, their float32 steps) of a bias quantized at s_b = s_x * s_w per output
    channel (QuantConfig.quantize_bias): clip(round(b / s_b)) with the float32 clip limit."""
    s_b = np.maximum((np.asarray(weight_steps, F32) * F32(step)).astype(F32), F32(MIN_SCALE)).astype(F32)
    limit = F32(float32_at_most(signed_levels(bits)))
    values = np.clip((np.asarray(bias, F32) / s_b).astype(F32), -limit, limit)
    return round_ties(values, rounding).astype(np.int64).astype(np.int32), s_b
