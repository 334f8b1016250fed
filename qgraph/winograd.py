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

The graph helpers add stock MXNet operators through a qgraph.graph.NodeBuilder (any callable
`node(op_name, suffix, inputs, **attrs) -> TensorRef`), so each caller tags its nodes its own
way; `build_kernel` replaces a 3x3 stride-1 convolution by the whole float Winograd kernel.
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from . import attrs as A
from .errors import ConfigError
from .graph import Graph, NodeBuilder, TensorRef
from .tags import EXCLUDE_TAG, WINOGRAD_PRODUCT_TAG, WINOGRAD_TAG

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


class Kernel(NamedTuple):
    """A convolution rewritten as its Winograd kernel: `padded` reads the layer's input (where
    its input quantizer goes), `product` is the grouped 1x1 convolution V . U over the
    transformed tiles (whose data input is V and whose weight is U), `dims` = (n, c_out,
    groups, c_in per group)."""

    padded: str
    product: str
    dims: tuple


def build_kernel(graph: Graph, layer: str, tile: str) -> Kernel:
    """conv(x, W, b)  =>  the float Winograd kernel of `tile` in stock operators, nodes named
    `<layer>_wino_<suffix>` and tagged WINOGRAD_TAG = layer (`product`: WINOGRAD_PRODUCT_TAG).
    x is padded and cut into n x n tiles that two grouped convolutions transform, V = B^T d B;
    the weights are transformed, U = G W G^T; the element-wise products summed over input
    channels are one grouped 1x1 convolution (`product`, one group per tile position and
    convolution group); a 1x1 convolution applies A^T . A to every tile, whose m x m outputs are
    laid out spatially; the bias is added and the result cropped to the convolution's output.
    Differs from the direct convolution by float rounding only; trains (every operator has a
    backward pass oneDNN can build)."""
    attrs = graph.attrs(layer)
    x, weight, *bias = graph.inputs(layer)
    if not graph.is_param(weight.node):
        raise ConfigError(f"{layer}: the Winograd kernel needs a stored weight, '{weight.node}' is computed")
    w_shape = graph.params[weight.node].shape
    # the weight no longer feeds a Convolution, from which MXNet used to infer its shape
    graph.set_attr(weight.node, "__shape__", A.format_tuple(w_shape))
    groups = A.get_int(attrs, "num_group", 1, layer)
    c_out, c_in_g = w_shape[0], w_shape[1]
    c_in = c_in_g * groups
    m, n = output_size(tile), input_size(tile)
    _, BT, AT = matrices(tile)
    pad_h, pad_w = (tuple(A.get_tuple(attrs, "pad", (0, 0), layer)) or (0, 0))
    node = graph.builder(f"{layer}_wino", {WINOGRAD_TAG: layer})
    # the product is a layer in its own right, quantized like any other: not a float transform
    product_node = graph.builder(f"{layer}_wino", {WINOGRAD_PRODUCT_TAG: layer})

    def kernel(suffix: str, value: np.ndarray, copies: int) -> TensorRef:
        """A constant convolution kernel, `value` tiled `copies` times along the first axis."""
        return node("tile", suffix, [constant(node, f"{suffix}_const", value)], reps=(copies,) + (1,) * (value.ndim - 1))

    # input tiles: m - 1 extra rows and columns at the bottom and right give ceil(out / m) whole tiles
    padded = node("Pad", "pad", [x], mode="constant", constant_value=0.0,
                  pad_width=(0, 0, 0, 0, pad_h, pad_h + m - 1, pad_w, pad_w + m - 1))
    rows = node("Convolution", "in_rows", [padded, kernel("bt_rows", BT.reshape(n, 1, n, 1), c_in)],
                kernel=(n, 1), stride=(m, 1), num_filter=c_in * n, num_group=c_in, no_bias=True)
    tiles = node("Convolution", "in_tiles", [rows, kernel("bt_cols", BT.reshape(n, 1, 1, n), c_in * n)],
                 kernel=(1, n), stride=(1, m), num_filter=c_in * n * n, num_group=c_in * n, no_bias=True)
    v = _regroup(node, tiles, c_in, n * n, "tiles_by_position")            # channels (a, b, c)
    # a fresh plain copy: without it oneDNN cannot build the product's backward pass at 16+ channels
    # per group ("could not create a primitive descriptor for a reorder primitive"); _copy is not enough
    v = node("transpose", "tiles_plain", [v], axes=(0, 1, 2, 3))

    transformed = transform_weight(node, weight, tile)                     # (c_out * c_in_g, n, n)
    by_position = node("transpose", "u_swap", [node("Reshape", "u_split", [transformed],
                                                    shape=(c_out, c_in_g, n * n))], axes=(2, 0, 1))
    u = node("Reshape", "u", [by_position], shape=(n * n * c_out, c_in_g, 1, 1))   # filters (a, b, o)
    product = product_node("Convolution", "product", [v, u], kernel=(1, 1), num_filter=n * n * c_out,
                   num_group=n * n * groups, no_bias=True)

    # A^T M A for every tile and output channel: a plain 1x1 convolution over the n*n transformed
    # positions of each (image, output channel), its m*m outputs per tile then laid out spatially,
    # then the bias. (A grouped stride-m Deconvolution, or a grouped 1x1 convolution, computes
    # the same, but oneDNN cannot build their backward passes here: "could not create a
    # primitive descriptor for a reorder primitive".)
    pairs = constant(node, "at_pairs", np.einsum("pa,qb->pqab", AT, AT).reshape(m * m, n * n, 1, 1))
    by_channel = _regroup(node, product, n * n, c_out, "products_by_channel")               # (N, o*ab, th, tw)
    per_image_channel = node("Reshape", "out_positions", [by_channel], shape=(0, -4, c_out, n * n, -2))
    per_image_channel = node("Reshape", "out_batch", [per_image_channel], shape=(-3, -2))   # (N*o, ab, th, tw)
    per_pixel = node("Convolution", "out_pixels", [per_image_channel, pairs], kernel=(1, 1), num_filter=m * m,
                     no_bias=True)                                                           # (N*o, pq, th, tw)
    split = node("Reshape", "out_split", [per_pixel], shape=(-4, -1, c_out, -4, m, m, -2))   # (N, o, p, q, th, tw)
    interleaved = node("transpose", "out_interleave", [split], axes=(0, 1, 4, 2, 5, 3))     # (N, o, th, p, tw, q)
    out_tiles = node("Reshape", "out_tiles", [interleaved], shape=(0, 0, -3, -3))            # (N, o, th*m, tw*m)
    if bias:
        per_channel = node("Reshape", "bias_per_channel", bias, shape=(1, c_out, 1, 1))
        out_tiles = node("broadcast_add", "out_biased", [out_tiles, per_channel])
    # the direct convolution's output size from a one-channel slice of the padded input
    reference = node("slice_axis", "ref_c", [padded], axis=1, begin=0, end=1)
    reference = node("slice_axis", "ref_h", [reference], axis=2, begin=0, end=-(m + 1))
    reference = node("slice_axis", "ref_w", [reference], axis=3, begin=0, end=-(m + 1))
    output = node("slice_like", "out", [out_tiles, reference], axes=(2, 3))
    graph.replace_node(layer, output.node)
    return Kernel(padded.node, product.node, (n, c_out, groups, c_in_g))


def _regroup(node: NodeBuilder, x: TensorRef, outer: int, inner: int, suffix: str) -> TensorRef:
    """NCHW channels ordered (outer, inner) -> ordered (inner, outer). H and W are merged for
    the transpose: a 4-D transpose runs about twice as fast as a 5-D one here."""
    split = node("Reshape", f"{suffix}_split", [x], shape=(0, -4, outer, inner, -3))
    swapped = node("transpose", f"{suffix}_swap", [split], axes=(0, 2, 1, 3))
    return node("reshape_like", suffix, [swapped, x])


def unsuitable(graph: Graph, layer: str) -> str | None:
    """Why a Winograd F(m, 3) kernel cannot run `layer`, or None: it must be a 2-D NCHW
    Convolution with a 3x3 kernel, stride 1 and no dilation, not kept in float, and not
    already part of a Winograd kernel."""
    op, attrs = graph.op(layer), graph.attrs(layer)
    if attrs.get(WINOGRAD_TAG) or attrs.get(WINOGRAD_PRODUCT_TAG):
        return "part of a Winograd kernel already"
    if op != "Convolution":
        return f"{op} is not a Convolution"
    kernel = A.get_tuple(attrs, "kernel", (), layer)
    if len(kernel) != 2:
        return f"{len(kernel)}-D convolution; Winograd applies to 2-D 3x3 kernels"
    if tuple(kernel) != (3, 3):
        return f"kernel {tuple(kernel)} is not 3x3"
    stride = A.get_tuple(attrs, "stride", (1, 1), layer) or (1, 1)
    if tuple(stride) != (1, 1):
        return f"stride {tuple(stride)} is not 1"
    dilate = A.get_tuple(attrs, "dilate", (1, 1), layer) or (1, 1)
    if tuple(dilate) != (1, 1):
        return f"dilation {tuple(dilate)} is not 1"
    if attrs.get("layout", "None") not in ("None", "NCHW"):
        return f"layout {attrs['layout']} is not NCHW"
    if attrs.get(EXCLUDE_TAG):
        return f"excluded ({attrs[EXCLUDE_TAG]})"
    return None
