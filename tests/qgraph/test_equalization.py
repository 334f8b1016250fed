"""Cross-layer equalization arithmetic (qgraph.equalization) against independent numpy: the ranges
DFQ/AIMET define, scales that make them equal, the function of the chain kept, bias absorption."""
import mxnet as mx
import numpy as np
import pytest

from qgraph import equalization as eq

RNG = np.random.default_rng(0)


def _conv(x, w, b, groups=1, pad=0):
    out = mx.nd.Convolution(mx.nd.array(x), mx.nd.array(w), mx.nd.array(b), kernel=w.shape[2:], num_filter=w.shape[0],
                            num_group=groups, pad=(pad, pad))
    return out.asnumpy().astype(np.float64)


def _relu(x):
    return np.maximum(x, 0)


def test_ranges_are_per_channel_max_abs():
    w = RNG.normal(size=(4, 3, 3, 3))
    assert np.array_equal(eq.output_ranges(w), [np.abs(w[o]).max() for o in range(4)])
    assert np.array_equal(eq.input_ranges(w, 1), [np.abs(w[:, i]).max() for i in range(3)])
    depthwise = RNG.normal(size=(5, 1, 3, 3))
    assert np.array_equal(eq.input_ranges(depthwise, 5), eq.output_ranges(depthwise))
    assert eq.is_depthwise((5, 1, 3, 3), 5) and not eq.is_depthwise((6, 1, 3, 3), 3)


def test_pair_scales_make_both_ranges_their_geometric_mean():
    r1, r2 = np.array([4.0, 0.5, 2.0, 0.0]), np.array([1.0, 2.0, 2.0, 3.0])
    s = eq.pair_scales(r1, r2)
    assert np.allclose((r1 / s)[:3], np.sqrt(r1 * r2)[:3]) and np.allclose((r2 * s)[:3], np.sqrt(r1 * r2)[:3])
    assert s[3] == 1.0  # a dead channel is left alone


def test_triplet_scales_make_three_ranges_their_cube_root():
    r0, r1, r2 = RNG.uniform(0.1, 5, 6), RNG.uniform(0.1, 50, 6), RNG.uniform(0.1, 5, 6)
    s01, s12 = eq.triplet_scales(r0, r1, r2)
    target = np.cbrt(r0 * r1 * r2)
    for got in (r0 / s01, r1 * s01 / s12, r2 * s12):
        assert np.allclose(got, target)
    zero = eq.triplet_scales(np.array([0.0]), np.array([1.0]), np.array([2.0]))
    assert zero == (1.0, 1.0)


def test_scaling_through_relu_keeps_the_function():
    x = RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)
    w1, b1 = RNG.normal(size=(4, 3, 3, 3)), RNG.normal(size=4)
    w2, b2 = RNG.normal(size=(5, 4, 3, 3)), RNG.normal(size=5)
    before = _conv(_relu(_conv(x, w1, b1, pad=1)), w2, b2, pad=1)
    s = eq.pair_scales(eq.output_ranges(w1), eq.input_ranges(w2, 1))
    w1s, b1s = eq.scale_outputs(w1, b1, s)
    w2s = eq.scale_inputs(w2, 1, s)
    after = _conv(_relu(_conv(x, w1s, b1s, pad=1)), w2s, b2, pad=1)
    assert np.abs(after - before).max() < 1e-4 * np.abs(before).max()
    assert np.allclose(eq.output_ranges(w1s), eq.input_ranges(w2s, 1))


def test_depthwise_input_scaling_is_per_channel():
    w = RNG.normal(size=(4, 1, 3, 3))
    s = np.array([1.0, 2.0, 0.5, 3.0])
    assert np.allclose(eq.scale_inputs(w, 4, s), w * s[:, None, None, None])


def test_absorbable_is_three_sigmas_below_the_mean():
    assert np.array_equal(eq.absorbable(np.array([5.0, 1.0, -2.0]), np.array([1.0, -1.0, 0.1])), [2.0, 0.0, 0.0])


@pytest.mark.parametrize("groups", [1, 4])
def test_input_shift_is_the_layer_applied_to_a_constant(groups):
    w = RNG.normal(size=(4, 4 // groups, 3, 3))
    shift = RNG.uniform(0, 2, 4)
    constant = np.broadcast_to(shift[None, :, None, None], (1, 4, 5, 5)).astype(np.float32)
    expected = _conv(constant, w, np.zeros(4), groups=groups)[0, :, 0, 0]  # no padding: every position alike
    assert np.allclose(eq.input_shift(w, groups, shift), expected, atol=1e-5)
    dense = RNG.normal(size=(3, 4))
    assert np.allclose(eq.input_shift(dense, 1, shift), dense @ shift)
