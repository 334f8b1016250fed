"""Cross-layer equalization arithmetic (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"; AIMET's DlEqualization): per-channel weight ranges, the scales
that equalize a pair or a triplet of layers, applying them, and bias absorption. numpy, float64.

A channel's range is max |w| over the weights that produce it (output side) or read it (input
side), as AIMET measures it.

- Pair L1 -> act -> L2 (act positively homogeneous: act(x / s) = act(x) / s for s > 0): output
  channel i of L1 (weights and bias) is divided by s_i and input channel i of L2 multiplied by s_i,
  s_i = sqrt(r1_i / r2_i), so both ranges become sqrt(r1_i r2_i).
- Triplet L0 -> dw -> L2 with a depthwise convolution in the middle: with c = cbrt(r0 r1 r2),
  s01 = r0 / c and s12 = c / r2; L0's output channel i is divided by s01_i, the depthwise channel i
  multiplied by s01_i / s12_i (its bias divided by s12_i), L2's input channel i multiplied by
  s12_i: all three ranges become c.
A channel with a zero range anywhere keeps s = 1.

Bias absorption: when L1's output channel i has mean m_i and standard deviation d_i (its folded
BatchNorm's beta and |gamma|, qgraph.folding), the ReLU after it almost never sees values below
c_i = max(0, m_i - 3 d_i); c is taken from L1's bias and W2 c added to L2's bias, which leaves
the output unchanged wherever the pre-activation is at least c (and no zero padding of L2 reads
the shifted channel), and shrinks the range L2's input quantizer must cover by c.
"""
from __future__ import annotations

import numpy as np

ABSORB_STDS = 3.0


def is_depthwise(weight_shape: tuple, groups: int) -> bool:
    """A convolution with one input channel per group and one group per input channel."""
    return groups > 1 and len(weight_shape) == 4 and weight_shape[1] == 1 and weight_shape[0] == groups


def output_ranges(weight: np.ndarray) -> np.ndarray:
    """max |w| per output channel (axis 0 of OIHW or (O, I))."""
    return np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)


def input_ranges(weight: np.ndarray, groups: int) -> np.ndarray:
    """max |w| per input channel: axis 1 of a dense OIHW or (O, I) weight, axis 0 of a depthwise one."""
    if groups > 1:
        return output_ranges(weight)
    return np.abs(np.moveaxis(weight, 1, 0)).reshape(weight.shape[1], -1).max(axis=1)


def _safe(ratio: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.where(valid & np.isfinite(ratio) & (ratio > 0), ratio, 1.0)


def pair_scales(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """s with first / s == second * s == sqrt(first * second) per channel (1 where a range is 0)."""
    valid = (first > 0) & (second > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _safe(np.sqrt(first / np.where(valid, second, 1.0)), valid)


def triplet_scales(first: np.ndarray, middle: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s01, s12): first / s01 == middle * s01 / s12 == last * s12 == cbrt(first middle last)."""
    valid = (first > 0) & (middle > 0) & (last > 0)
    common = np.cbrt(first * middle * last)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _safe(first / common, valid), _safe(common / np.where(valid, last, 1.0), valid)


def scale_outputs(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray) -> tuple:
    """(weight, bias) with output channel i divided by scale_i."""
    shaped = scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return weight / shaped, (None if bias is None else bias / scale)


def scale_inputs(weight: np.ndarray, groups: int, scale: np.ndarray) -> np.ndarray:
    """weight with input channel i multiplied by scale_i (dense, or depthwise with groups > 1)."""
    if groups > 1:
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return weight * scale.reshape((1, -1) + (1,) * (weight.ndim - 2))


def absorbable(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """c = max(0, mean - 3 |std|): the part of each channel a ReLU after it almost never clips."""
    return np.maximum(0.0, mean - ABSORB_STDS * np.abs(std))


def input_shift(weight: np.ndarray, groups: int, shift: np.ndarray) -> np.ndarray:
    """What adding `shift` to every value of input channel i adds to each output channel: W c."""
    if groups > 1:
        return weight.reshape(weight.shape[0], -1).sum(axis=1) * shift
    return np.moveaxis(weight, 1, -1).reshape(weight.shape[0], -1, weight.shape[1]).sum(axis=1) @ shift
