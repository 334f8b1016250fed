"""qgraph.winograd: the Cook-Toom matrices against the seed's G and direct 3x3 correlation, and the
graph pieces (constants, G g G^T, the pseudo-inverse projection) against numpy."""
from __future__ import annotations

import qgraph
import mxnet as mx
import numpy as np
import pytest

from qgraph import Graph, winograd
from qgraph.graph import TensorRef
from qgraph.errors import ConfigError

TILES = ("F23", "F43", "F63")

# hey-yahei/Quantization.MXNet, quantize/convert/wino_matrix.py, typed in as the reference
SEED_G = {
    "F23": [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    "F43": [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
    "F63": [[1, 0, 0], [-2 / 9, -2 / 9, -2 / 9], [-2 / 9, 2 / 9, -2 / 9], [1 / 90, 1 / 45, 2 / 45],
            [1 / 90, -1 / 45, 2 / 45], [32 / 45, 16 / 45, 8 / 45], [32 / 45, -16 / 45, 8 / 45], [0, 0, 1]],
}


def correlate3x3(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Direct 'valid' 3x3 correlation of one tile (what Convolution computes), float64."""
    out = d.shape[0] - 2
    return np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(out)] for i in range(out)])


@pytest.mark.parametrize("tile", TILES)
def test_weight_transform_is_the_seeds(tile):
    G, _, _ = winograd.matrices(tile)
    np.testing.assert_allclose(G, np.array(SEED_G[tile]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("tile, m", [("F23", 2), ("F43", 4), ("F63", 6)])
def test_shapes(tile, m):
    G, BT, AT = winograd.matrices(tile)
    n = m + 2
    assert (winograd.output_size(tile), winograd.input_size(tile)) == (m, n)
    assert G.shape == (n, 3) and BT.shape == (n, n) and AT.shape == (m, n)
    assert G.dtype == BT.dtype == AT.dtype == np.float64


@pytest.mark.parametrize("tile", TILES)
def test_winograd_equals_direct_correlation(tile):
    G, BT, AT = winograd.matrices(tile)
    n = G.shape[0]
    rng = np.random.default_rng(11)
    for _ in range(50):
        g = rng.standard_normal((3, 3))
        d = rng.standard_normal((n, n)) * rng.uniform(0.1, 10)
        winograd_out = AT @ ((G @ g @ G.T) * (BT @ d @ BT.T)) @ AT.T
        direct = correlate3x3(d, g)
        assert np.abs(winograd_out - direct).max() <= 1e-5 * max(1.0, np.abs(direct).max())


@pytest.mark.parametrize("tile", TILES)
def test_a_wrong_matrix_breaks_the_identity(tile):
    """The identity test can fail: one perturbed entry of B^T is caught."""
    G, BT, AT = winograd.matrices(tile)
    BT = BT.copy()
    BT[1, 2] += 0.01
    rng = np.random.default_rng(0)
    g, d = rng.standard_normal((3, 3)), rng.standard_normal((G.shape[0],) * 2)
    assert np.abs(AT @ ((G @ g @ G.T) * (BT @ d @ BT.T)) @ AT.T - correlate3x3(d, g)).max() > 1e-5


@pytest.mark.parametrize("tile", TILES)
def test_pseudo_inverse_recovers_the_kernel(tile):
    G = winograd.matrices(tile)[0]
    pinv = winograd.pseudo_inverse(tile)
    assert pinv.shape == (3, G.shape[0])
    np.testing.assert_allclose(pinv @ G, np.eye(3), atol=1e-12)
    g = np.random.default_rng(1).standard_normal((3, 3))
    np.testing.assert_allclose(pinv @ (G @ g @ G.T) @ pinv.T, g, atol=1e-12)


def test_unknown_tile_is_a_config_error():
    with pytest.raises(ConfigError, match="F33"):
        winograd.matrices("F33")


class _Ops:
    """An `op` callable over a fresh Graph, as the quantizer's builder passes it."""

    def __init__(self):
        self.graph = Graph()
        self.graph.add_variable("data")
        self.graph.input_names = ["data"]

    def __call__(self, op, suffix, inputs, **attrs):
        return self.graph.add_node(op, suffix, inputs, {k: str(v) for k, v in attrs.items()})


def _evaluate(ops: _Ops, out, x: np.ndarray) -> np.ndarray:
    ops.graph.set_outputs([TensorRef(out)])
    return qgraph.to_block(ops.graph)(mx.nd.array(x)).asnumpy()


def test_constant_is_exact_in_float32_with_one_node_per_distinct_value():
    ops = _Ops()
    value = winograd.matrices("F63")[1]
    ref = winograd.constant(ops, "bt", value)
    distinct = len(set(value.ravel().tolist()))
    assert len(ops.graph.nodes("_full")) == distinct < value.size
    got = _evaluate(ops, ops(  # a graph needs its input used: add 0 * sum(data)
        "broadcast_add", "plus", [ref, ops("_mul_scalar", "zero", [ops("sum", "s", ["data"])], scalar=0.0)]),
        np.ones((1,), np.float32))
    np.testing.assert_array_equal(got, value.astype(np.float32))


@pytest.mark.parametrize("tile", TILES)
def test_transform_and_projection_match_numpy(tile):
    rng = np.random.default_rng(5)
    W = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    G = winograd.matrices(tile)[0]
    n = G.shape[0]
    ops = _Ops()
    U = winograd.transform_weight(ops, "data", tile)
    got_u = _evaluate(ops, U, W)
    expected_u = np.einsum("jk,oikl,ml->oijm", G, W.astype(np.float64), G).reshape(-1, n, n)
    np.testing.assert_allclose(got_u, expected_u, rtol=1e-5, atol=1e-6)

    ops = _Ops()
    back = winograd.project_weight(ops, winograd.transform_weight(ops, "data", tile), tile)
    np.testing.assert_allclose(_evaluate(ops, back, W), W.reshape(-1, 3, 3), rtol=1e-4, atol=1e-5)
