"""Threshold search from calibration statistics: vectorised numpy over every candidate at once.

Histograms arrive already accumulated (see passes/insert_observers.py and
qgraph/calibrate.py); each function returns one threshold T >= 0.

- kl: the seed's method. `hist` holds |x| (or x for unsigned inputs) in `bins` equal
  bins over (0, max], exact zeros left out. Candidate i keeps bins [0, i) with the
  outliers added to the last one (P), merges them into `levels` (2^b unsigned,
  2^(b-1) signed) groups, expands back by linear interpolation (Q) and minimises
  KL(P || Q); T = (i + 0.5) * max / bins.
- entropy: MXNet's variant (contrib/quantization.py, calibrate_entropy): a symmetric
  histogram of x over (-max|x|, max|x|) with an odd bin count (8001), candidates
  growing from the centre, 255 quantized bins (511 for unsigned data), eps smoothing.
- percentile: the smallest bin edge below which `percentile` % of the mass lies.
- mse: the candidate edge minimising the expected squared quantization error, with
  rounding error s^2/12 inside the range and (x - T)^2 for clipped values.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

_SMOOTH_EPS = 1e-4


@lru_cache(maxsize=4)
def _kl_layout(bins: int, levels: int):
    """Index arrays for every (candidate i, kept bin k < i) pair, flattened candidate by
    candidate; they depend only on (bins, levels), so every layer reuses them."""
    candidates = np.arange(levels, bins, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(candidates)[:-1]])
    i = np.repeat(candidates, candidates)
    k = np.arange(len(i), dtype=np.int64) - np.repeat(starts, candidates)
    # bin k goes to level floor(k L / i); level j spans bins [ceil(j i / L), ceil((j+1) i / L))
    numerator = k * levels
    floor = numerator // i
    fraction = (numerator - floor * i) / i
    ceil = np.minimum(floor + (fraction > 0), levels - 1)

    def level_start(j):
        return (j * i + levels - 1) // levels

    bounds = tuple(b.astype(np.int32) for b in (level_start(floor), level_start(floor + 1),
                                                level_start(ceil), level_start(ceil + 1)))
    return candidates, starts, k.astype(np.int32), fraction, bounds, starts + candidates - 1


def kl_threshold(hist: np.ndarray, max_value: float, levels: int) -> float:
    """The seed's KL search; `hist` covers (0, max_value] in len(hist) bins."""
    hist = np.asarray(hist, dtype=np.float64)
    bins = len(hist)
    total = hist.sum()
    if max_value <= 0 or total == 0:
        return 0.0
    if levels >= bins:
        return float(max_value)
    candidates, starts, k, fraction, bounds, last = _kl_layout(bins, levels)
    cumulative = np.concatenate([[0.0], np.cumsum(hist)])
    # P = hist / total on bins k < i-1, and the tail folded into bin i-1. On k < i-1, Q is
    # non-zero exactly where P is (bin k's own level holds it), so the P-only sums
    # (sum P log P, sum P) come from prefix sums; only sum P log Q needs every pair.
    with np.errstate(divide="ignore", invalid="ignore"):
        h_log_h = np.concatenate([[0.0], np.cumsum(np.where(hist > 0, hist * np.log(np.where(hist > 0, hist, 1)), 0))])
    body = candidates - 1
    last_p = (hist[body] + total - cumulative[candidates]) / total

    low = cumulative[bounds[1]] - cumulative[bounds[0]]
    high = cumulative[bounds[3]] - cumulative[bounds[2]]
    expanded = (high - low) * fraction + low
    weight = hist[k] / total
    weight[last] = last_p
    expanded[weight == 0] = 0.0
    norm = np.add.reduceat(expanded, starts)
    used = expanded > 0
    log_q = np.log(np.where(used, expanded, 1.0))
    p_log_q = np.add.reduceat(np.where(used, weight, 0.0) * log_q, starts)

    last_used = used[last]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_p = (h_log_h[body] - cumulative[body] * np.log(total)) / total
        p_log_p = p_log_p + np.where(last_used, last_p * np.log(np.where(last_p > 0, last_p, 1.0)), 0.0)
        p_used = cumulative[body] / total + np.where(last_used, last_p, 0.0)
        divergence = p_log_p - p_log_q + p_used * np.log(norm)
    divergence = np.where(norm > 0, divergence, np.inf)
    best = candidates[int(np.argmin(divergence))]
    return float((best + 0.5) * (max_value / bins))


def _smooth(distribution: np.ndarray, is_zero: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """MXNet's SmoothDistribution, row-wise over the `inside` part: zeros become eps and
    the non-zero entries give the same mass back. Outside entries are 0."""
    zeros = is_zero.sum(axis=1, keepdims=True)
    nonzeros = inside.sum(axis=1, keepdims=True) - zeros
    eps1 = (_SMOOTH_EPS * zeros / np.maximum(nonzeros, 1)).astype(distribution.dtype)
    smoothed = np.where(is_zero, np.float32(_SMOOTH_EPS), distribution - eps1)
    return np.where(inside, smoothed, 0).astype(distribution.dtype)


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, num_quantized_bins: int = 255,
                      unsigned: bool = False, block: int = 256) -> float:
    """MXNet's entropy calibration on a symmetric histogram with an odd number of bins.
    Candidates are processed `block` at a time to bound memory (8001 bins x 3874 candidates)."""
    hist = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    num_bins = len(hist)
    if num_bins % 2 != 1:
        raise ValueError(f"entropy calibration needs an odd number of bins, got {num_bins}")
    if hist.sum() == 0:
        return 0.0
    if unsigned:
        num_quantized_bins = num_quantized_bins * 2 + 1
    zero_bin = num_bins // 2
    half_q = num_quantized_bins // 2
    candidates = np.arange(half_q, zero_bin + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(hist)])
    divergence = np.concatenate([_entropy_block(hist, cumulative, candidates[s:s + block], zero_bin,
                                                num_quantized_bins) for s in range(0, len(candidates), block)])
    best = candidates[int(np.argmin(divergence))]
    return float(edges[zero_bin + best + 1])


def _entropy_block(hist, cumulative, candidates, zero_bin, num_quantized_bins):
    """Divergences of a block of candidates, following MXNet's CalibrateComputeCPU (float32,
    including its details: the first sliced bin is counted in P only, and Q's per-level
    norm counts the non-zero sliced bins)."""
    n, width = len(candidates), 2 * int(candidates.max()) + 1
    starts = zero_bin - candidates
    lengths = 2 * candidates + 1
    column = np.arange(width)
    inside = column[None, :] < lengths[:, None]
    index = np.minimum(starts[:, None] + column[None, :], len(hist) - 1)
    sliced = np.where(inside, hist[index], 0.0)
    sliced[:, 0] = 0.0

    rows = np.arange(n)
    reference = sliced.copy()
    reference[:, 0] = cumulative[starts + 1]
    reference[rows, lengths - 1] += cumulative[-1] - cumulative[starts + lengths]
    p_nonzero = (reference != 0) & inside

    merged_width = lengths // num_quantized_bins
    group = np.minimum(column[None, :] // np.maximum(merged_width[:, None], 1), num_quantized_bins - 1)
    group = np.where(inside, group, num_quantized_bins)             # padding goes to a spare level
    flat = (rows[:, None] * (num_quantized_bins + 1) + group).ravel()
    size = n * (num_quantized_bins + 1)
    quantized = np.bincount(flat, weights=sliced.ravel(), minlength=size).reshape(n, -1)
    norm = np.bincount(flat, weights=(sliced != 0).ravel().astype(np.float64), minlength=size).reshape(n, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_level = np.where(norm > 0, quantized / norm, 0.0)
    candidate = np.where(p_nonzero, np.take_along_axis(per_level, group, axis=1), 0.0)

    p = _smooth(reference.astype(np.float32), ~p_nonzero & inside, inside)
    q = _smooth(candidate.astype(np.float32), (candidate == 0) & inside, inside)
    q_ok = ((candidate != 0) & inside).any(axis=1)
    p_norm = p / p.sum(axis=1, keepdims=True)
    q_norm = q / q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(inside, p_norm * np.log(np.where(inside, p_norm / q_norm, 1.0)), 0.0)
    return np.where(q_ok, terms.sum(axis=1, dtype=np.float64), np.inf)


def percentile_threshold(hist: np.ndarray, max_value: float, percentile: float = 99.99) -> float:
    """Upper edge of the first bin where the cumulative mass reaches `percentile` %."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if max_value <= 0 or total == 0:
        return 0.0
    index = int(np.searchsorted(np.cumsum(hist), total * percentile / 100.0))
    return float(min(index + 1, len(hist)) * max_value / len(hist))


def mse_threshold(hist: np.ndarray, max_value: float, levels: int) -> float:
    """Candidate bin edge T minimising sum_k h_k err_k(T) over bin centres c_k:
    (T / levels)^2 / 12 for c_k <= T (rounding), (c_k - T)^2 beyond it (clipping)."""
    hist = np.asarray(hist, dtype=np.float64)
    bins = len(hist)
    if max_value <= 0 or hist.sum() == 0:
        return 0.0
    width = max_value / bins
    centres = (np.arange(bins) + 0.5) * width
    thresholds = np.arange(1, bins + 1) * width
    clipped = np.maximum(centres[None, :] - thresholds[:, None], 0.0) ** 2
    rounding = ((thresholds / levels) ** 2 / 12.0)[:, None]
    error = np.where(centres[None, :] <= thresholds[:, None], rounding, clipped)
    return float(thresholds[int(np.argmin(error @ hist))])
