"""Calibration taps: in-graph statistics of a layer's input tensor, added as extra graph outputs.

Taps are computed inside the graph so calibration never copies whole activations
to numpy: per-batch reductions ('max', 'min' -> shape (1,)) and, when a range is
given, a histogram (MXNet's `_histogram`) of x, relu(x) or |x| over that fixed range
plus, for relu/|x|, the count of exact zeros ('zeros'), so a caller can leave them
out of the first bin. Full reductions go through global pooling, straight on NCHW
tensors and over a (N, 1, 1, -1) view otherwise: MXNet's plain `max` reduction is about
8x slower on the CPU. Values outside a histogram's range make `_histogram` about 3x
slower, so ranges cover every value. For a tensor proven non-negative (qgraph.analysis)
the 'min' tap is the constant 0 and relu/|x| are skipped. A tensor read by several
layers is tapped once. Every tap node carries `__qgraph_tap__` = "<tensor>|<kind>",
which is how a caller maps outputs back; taps are appended to `graph.outputs` after
the model's own outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import attrs as A
from .analysis import is_non_negative
from .graph import Graph, TensorRef
from .quantizer import EXCLUDE_TAG, QUANTIZABLE_OPS

TAP_TAG = "__qgraph_tap__"
REDUCTIONS = ("max", "min")


@dataclass(frozen=True)
class HistogramTap:
    """A histogram of `source(x)` ('x', 'relu' or 'abs') in `bins` bins over (low, high), with
    the count of exact zeros when `count_zeros` (relu/abs sources)."""

    source: str
    bins: int
    low: float
    high: float
    count_zeros: bool = True


def add_taps(graph: Graph, layers=None, reductions=REDUCTIONS, histograms=None) -> list[str]:
    """Tap the data input of `layers` (default: every quantizable layer not excluded) with
    `reductions` and, for the tensor keys in `histograms`, a histogram. Returns the keys tapped."""
    histograms = histograms or {}
    tapped = []
    for key, tensor in observed_tensors(graph, layers).items():
        for kind in reductions:
            graph.outputs.append(_reduction(graph, tensor, key, kind))
        if key in histograms:
            graph.outputs.extend(_histogram(graph, tensor, key, histograms[key]))
        tapped.append(key)
    return tapped


def tensor_key(tensor: TensorRef) -> str:
    return f"{tensor.node}:{tensor.index}"


def observed_tensors(graph: Graph, layers=None) -> dict[str, TensorRef]:
    """key -> tensor for the data input of each layer, in topological order, deduplicated."""
    if layers is None:
        layers = [n for n in graph.nodes(QUANTIZABLE_OPS) if EXCLUDE_TAG not in graph.attrs(n)]
    tensors = {}
    for layer in layers:
        tensor = graph.inputs(layer)[0]
        tensors.setdefault(tensor_key(tensor), tensor)
    return tensors


def _tag(key: str, kind: str) -> dict:
    return {TAP_TAG: f"{key}|{kind}"}


def _is_image_batch(graph: Graph, tensor: TensorRef) -> bool:
    """True when a 2-D convolution or pooling reads `tensor`, so it is NCHW."""
    return any(slot == 0 and graph.op(reader) in ("Convolution", "Deconvolution", "Pooling")
               and len(A.get_tuple(graph.attrs(reader), "kernel", (), reader)) == 2
               for reader, slot in graph.consumers(tensor))


def _global(graph: Graph, tensor: TensorRef, stem: str, pool_type: str, tag: dict, image_batch: bool) -> TensorRef:
    """max or sum of every element of `tensor`, shape (1,), via global pooling: straight on an
    NCHW tensor (`image_batch`: it keeps oneDNN's blocked layout, which a Reshape would first
    convert), otherwise over a (N, 1, 1, -1) view."""
    view = tensor
    if not image_batch:
        view = TensorRef(graph.add_node("Reshape", f"{stem}_view", [tensor], {"shape": "(0, 1, 1, -1)", **tag}))
    pooled = graph.add_node("Pooling", f"{stem}_pool", [view],
                            {"kernel": "(1, 1)", "global_pool": "True", "pool_type": pool_type, **tag})
    return TensorRef(graph.add_node(pool_type if pool_type == "max" else "sum", stem, [pooled], tag))


def _reduction(graph: Graph, tensor: TensorRef, key: str, kind: str) -> TensorRef:
    stem = f"{tensor.node}_tap_{kind}"
    image_batch = _is_image_batch(graph, tensor)
    if kind == "max":
        return _global(graph, tensor, stem, "max", _tag(key, kind), image_batch)
    if is_non_negative(graph, tensor):
        return TensorRef(graph.add_node("_zeros", stem, [], {"shape": "(1,)", **_tag(key, kind)}))
    negated = TensorRef(graph.add_node("negative", f"{stem}_neg", [tensor], _tag(key, "neg")))
    largest_negated = _global(graph, negated, f"{stem}_negmax", "max", _tag(key, "negmax"), image_batch)
    return TensorRef(graph.add_node("negative", stem, [largest_negated], _tag(key, kind)))


def tap_kind(graph: Graph, ref: TensorRef) -> str:
    """"<tensor>|<kind>" of a tap output."""
    return graph.attrs(ref.node)[TAP_TAG]


def _histogram(graph: Graph, tensor: TensorRef, key: str, tap: HistogramTap) -> list[TensorRef]:
    """Counts, edges (MXNet's histogram must write them) and, for relu/abs sources, the number of
    exact zeros. BlockGrad on both histogram outputs: _histogram has no gradient, and a
    SymbolBlock builds its backward graph up front."""
    stem = f"{tensor.node}_tap_hist"
    source, taps = tensor, []
    if tap.source in ("relu", "abs") and not is_non_negative(graph, tensor):
        source = TensorRef(graph.add_node(tap.source, f"{stem}_{tap.source}", [tensor], _tag(key, tap.source)))
    if tap.source in ("relu", "abs") and tap.count_zeros:
        is_zero = TensorRef(graph.add_node("_equal_scalar", f"{stem}_is_zero", [source],
                                           {"scalar": "0.0", **_tag(key, "is_zero")}))
        taps.append(_global(graph, is_zero, f"{stem}_zeros", "sum", _tag(key, "zeros"), _is_image_batch(graph, tensor)))
    node = graph.add_node("_histogram", stem, [source],
                          {"bin_cnt": tap.bins, "range": f"({tap.low!r}, {tap.high!r})", **_tag(key, "histogram")})
    counts = graph.add_node("BlockGrad", f"{stem}_counts", [TensorRef(node, 0)], _tag(key, "hist"))
    edges = graph.add_node("BlockGrad", f"{stem}_edges", [TensorRef(node, 1)], _tag(key, "hist_edges"))
    return [TensorRef(counts), TensorRef(edges)] + taps
