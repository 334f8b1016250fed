"""Threshold search against independent references: the seed's loop-based KL, MXNet's own
calibrate_entropy operator, numpy percentiles and a brute-force quantization MSE."""
import mxnet as mx
import numpy as np
import pytest

from qgraph import observers


def seed_kl_best_bins(hist, levels, bins):
    """The seed's kl_calibrate (hey-yahei/Quantization.MXNet), written as its plain loop."""
    best, best_divergence = levels, np.inf
    for i in range(levels, bins):
        reference = hist[:i].astype(np.float64).copy()
        reference[i - 1] += hist[i:].sum()
        reference /= reference.sum()
        candidate = np.zeros(levels)
        for j, level in enumerate((np.arange(i) * levels / i).astype(np.int32)):
            candidate[level] += hist[j]
        position = np.arange(i) * levels / i
        low_index = position.astype(np.int32)
        high_index = np.ceil(position).clip(0, levels - 1).astype(np.int32)
        expanded = (candidate[high_index] - candidate[low_index]) * (position - low_index) + candidate[low_index]
        expanded *= reference != 0
        expanded /= expanded.sum()
        keep = expanded != 0
        divergence = np.sum(reference[keep] * np.log(reference[keep] / expanded[keep]))
        if divergence < best_divergence:
            best, best_divergence = i, divergence
    return best


def _activations(kind, seed, n=60000):
    rng = np.random.RandomState(seed)
    if kind == "relu_normal":
        return np.maximum(rng.normal(size=n), 0)
    if kind == "laplace":
        return rng.laplace(size=n)
    if kind == "heavy_tail":
        return rng.standard_t(3, size=n)
    return np.maximum(rng.normal(size=n) * 2 + 0.5, 0)


@pytest.mark.parametrize("levels", [256, 128, 16, 8])
@pytest.mark.parametrize("kind", ["relu_normal", "heavy_tail"])
def test_kl_matches_the_seeds_loop(kind, levels):
    values = np.abs(_activations(kind, 0, 20000))
    values = values[values > 0]
    top = values.max()
    hist, _ = np.histogram(values, bins=512, range=(0, top))
    hist[3] += 500  # a spike, as constant activations make
    expected = (seed_kl_best_bins(hist, levels, 512) + 0.5) * top / 512
    assert observers.kl_threshold(hist, top, levels) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["relu_normal", "laplace", "heavy_tail", "shifted_relu"])
def test_entropy_within_one_percent_of_mxnet(kind):
    values = _activations(kind, 1, n=200000).astype(np.float32)
    top = float(np.abs(values).max())
    hist, edges = np.histogram(values, bins=8001, range=(-top, top))
    unsigned = values.min() >= 0
    reference, _ = mx.nd.contrib.calibrate_entropy(hist=mx.nd.array(hist), hist_edges=mx.nd.array(edges),
                                                   num_quantized_bins=511 if unsigned else 255)
    ours = observers.entropy_threshold(hist, edges, unsigned=unsigned)
    assert ours == pytest.approx(float(reference.asscalar()), rel=0.01)


def test_percentile_is_the_first_bin_edge_holding_the_mass():
    values = np.abs(_activations("heavy_tail", 2))
    top = values.max()
    hist, _ = np.histogram(values, bins=2048, range=(0, top))
    for percentile in (50.0, 99.0, 99.99):
        ours, width = observers.percentile_threshold(hist, top, percentile), top / 2048
        # the first bin edge with at least `percentile` % of the values at or below it
        assert np.mean(values <= ours + 1e-12) >= percentile / 100
        assert np.mean(values <= ours - width - 1e-12) < percentile / 100


def test_mse_minimises_the_simulated_quantization_error():
    values = np.abs(_activations("heavy_tail", 3, 20000))
    top = values.max()
    hist, _ = np.histogram(values, bins=256, range=(0, top))
    levels = 15
    ours = observers.mse_threshold(hist, top, levels)

    def real_error(threshold):
        step = threshold / levels
        return np.mean((values - np.round(np.clip(values, 0, threshold) / step) * step) ** 2)

    brute = min((real_error(t), t) for t in np.linspace(top / 256, top, 256))
    assert real_error(ours) <= brute[0] * 1.25


@pytest.mark.parametrize("search", [
    lambda h, e, t: observers.kl_threshold(h, t, 128),
    lambda h, e, t: observers.percentile_threshold(h, t),
    lambda h, e, t: observers.mse_threshold(h, t, 127),
])
def test_empty_histogram_gives_zero_not_nan(search):
    hist = np.zeros(2048)
    assert search(hist, None, 0.0) == 0.0
    assert search(hist, None, 1.0) == 0.0
