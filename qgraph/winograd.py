"""Cook-Toom transform matrices for Winograd F(2,3), F(4,3), F(6,3) and the subgraph pieces built from them.

For F(m, 3) with n = m + 2 and the n - 1 finite interpolation points a_j (plus the point at
infinity), one tile of 3x3 correlation is

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (g: 3x3 kernel, d: n x n input tile, Y: m x m)

with A^T[i, j] = a_j^i and G[j, k] = a_j^k / f_j, f_j = prod_{l != j} (a_j - a_l), while row j of
B^T holds the coefficients of prod_{l != j} (x - a_l); the point at infinity contributes the last
column of A^T, the last row of G and, in B^T, the coefficients of prod_l (x - a_l). A row of G may
be scaled if its row of B^T is divided by the same factor: the row of the point 0 is made positive,
which gives exactly the seed's G matrices (hey-yahei/Quantization.MXNet, wino_matrix.py) and
ncnn's / wincnn's. The matrices are built exactly with fractions and returned in float64.

The graph helpers add stock MXNet operators through an `op(op_name, suffix, inputs, **attrs)`
callable (qgraph.quantizer._Builder.op), so each rewrite tags its nodes its own way.
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import numpy as np

from .errors import ConfigError

TILES = ("F23", "F43", "F63")
_POINTS = {
    "F23": (0, 1, -1),
    "F43": (0, 1, -1, 2, -2),
    "F63": (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)),
}


def output_size(tile: str) -> int:
    """m: the output tile is m x m."""
    _check(tile)
    return len(_POINTS[tile]) - 1


def input_size(tile: str) -> int:
    """n = m + 2: the input tile and the transformed tiles are n x n."""
    return output_size(tile) + 2


def _check(tile: str) -> None:
    if tile not in _POINTS:
        raise ConfigError(f"unknown Winograd tile {tile!r}; expected one of {', '.join(TILES)}")


def _poly_mul(p: list, q: list) -> list:
    """Coefficients (lowest degree first) of the product of two polynomials."""
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def _monic(roots) -> list:
    poly = [Fraction(1)]
    for root in roots:
        poly = _poly_mul(poly, [-Fraction(root), Fraction(1)])
    return poly


@lru_cache(maxsize=None)
def matrices(tile: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(G, B^T, A^T) for F(m, 3) in float64: shapes (n, 3), (n, n), (m, n)."""
    _check(tile)
    points = [Fraction(p) for p in _POINTS[tile]]
    m, r = len(points) - 1, 3
    n = m + r - 1
    G = [[Fraction(0)] * r for _ in range(n)]
    BT = [[Fraction(0)] * n for _ in range(n)]
    AT = [[Fraction(0)] * n for _ in range(m)]
    for j, a in enumerate(points):
        others = points[:j] + points[j + 1:]
        f = Fraction(1)
        for b in others:
            f *= a - b
        # a row scale moves between G and B^T; the seed keeps the row of the point 0 positive
        scale = abs(f) if a == 0 else f
        G[j] = [a ** k / scale for k in range(r)]
        BT[j] = [c * scale / f for c in _monic(others)] + [Fraction(0)]
        for i in range(m):
            AT[i][j] = a ** i
    G[n - 1][r - 1] = Fraction(1)
    BT[n - 1] = _monic(points)
    AT[m - 1][n - 1] = Fraction(1)
    return tuple(np.array([[float(v) for v in row] for row in mat], dtype=np.float64) for mat in (G, BT, AT))


def pseudo_inverse(tile: str) -> np.ndarray:
    """G^+ (3 x n), so that G^+ (G g G^T) G^+^T = g: computed once, stored in the graph as constants."""
    return np.linalg.pinv(matrices(tile)[0])


def constant(op, suffix: str, value: np.ndarray):
    """`value` as a float32 tensor made of stock operators: one `_full` per distinct entry,
    concatenated and reshaped. No parameter, so nothing can train it or decay it."""
    value = np.asarray(value, dtype=np.float64)
    scalars: dict = {}
    entries = []
    for v in value.ravel().tolist():
        if v not in scalars:
            scalars[v] = op("_full", f"{suffix}_v{len(scalars)}", [], shape=(1,), value=repr(v), dtype="float32")
        entries.append(scalars[v])
    flat = op("Concat", f"{suffix}_flat", entries, dim=0, num_args=len(entries))
    return op("Reshape", suffix, [flat], shape=value.shape)


def sandwich(op, x, matrix: np.ndarray, suffix: str):
    """M x M^T for every k x k tile of x (the last two axes, k = M's columns): a (-1, p, p) tensor.
    Two steps of X -> (X M^T)^T, each a Reshape, a dot, a Reshape and a transpose."""
    p, k = matrix.shape
    m_ref = constant(op, f"{suffix}_matrix", matrix)
    for step, rows in enumerate((k, p)):  # (b, k, k) -> (b, p, k) -> (b, p, p)
        flat = op("Reshape", f"{suffix}_rows{step}", [x], shape=(-1, k))
        product = op("dot", f"{suffix}_dot{step}", [flat, m_ref], transpose_b=True)
        tiles = op("Reshape", f"{suffix}_tiles{step}", [product], shape=(-1, rows, p))
        x = op("transpose", f"{suffix}_t{step}", [tiles], axes=(0, 2, 1))
    return x


def transform_weight(op, weight, tile: str):
    """U = G g G^T for every 3x3 kernel g of `weight`: shape (-1, n, n), kernels in weight order."""
    return sandwich(op, weight, matrices(tile)[0], f"wino_{tile}_G")


def project_weight(op, transformed, tile: str):
    """g = G^+ U G^+^T for every n x n tile of `transformed`: shape (-1, 3, 3)."""
    return sandwich(op, transformed, pseudo_inverse(tile), f"wino_{tile}_pinv")
