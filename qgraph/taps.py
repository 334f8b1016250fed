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
from .graph import Graph, NodeBuilder, TensorRef
from .quantizer import quantizable_layers
from .signs import is_non_negative
from .tags import TAP_TAG

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
            graph.add_output(_reduction(graph, tensor, key, kind))
        if key in histograms:
            for ref in _histogram(graph, tensor, key, histograms[key]):
                graph.add_output(ref)
        tapped.append(key)
    return tapped


def tensor_key(tensor: TensorRef) -> str:
    return f"{tensor.node}:{tensor.index}"


def observed_tensors(graph: Graph, layers=None) -> dict[str, TensorRef]:
    """key -> tensor for the data input of each layer, in topological order, deduplicated."""
    if layers is None:
        layers = quantizable_layers(graph)
    tensors = {}
    for layer in layers:
        tensor = graph.inputs(layer)[0]
        tensors.setdefault(tensor_key(tensor), tensor)
    return tensors


def _builder(graph: Graph, tensor: TensorRef, key: str, kind: str) -> NodeBuilder:
    """Adds the nodes of one tap, named `<tensor>_tap_<kind>_<suffix>`, tagged "<key>|<kind>"."""
    return graph.builder(f"{tensor.node}_tap_{kind}", {TAP_TAG: f"{key}|{kind}"})


def _is_image_batch(graph: Graph, tensor: TensorRef) -> bool:
    """True when a 2-D convolution or pooling reads `tensor`, so it is NCHW."""
    return any(slot == 0 and graph.op(reader) in ("Convolution", "Deconvolution", "Pooling")
               and len(A.get_tuple(graph.attrs(reader), "kernel", (), reader)) == 2
               for reader, slot in graph.consumers(tensor))


def _global(node: NodeBuilder, tensor: TensorRef, pool_type: str, image_batch: bool) -> TensorRef:
    """max or sum of every element of `tensor`, shape (1,), via global pooling: straight on an
    NCHW tensor (`image_batch`: it keeps oneDNN's blocked layout, which a Reshape would first
    convert), otherwise over a (N, 1, 1, -1) view."""
    view = tensor if image_batch else node("Reshape", "view", [tensor], shape="(0, 1, 1, -1)")
    pooled = node("Pooling", "pool", [view], kernel="(1, 1)", global_pool="True", pool_type=pool_type)
    return node(pool_type if pool_type == "max" else "sum", "all", [pooled])


def _reduction(graph: Graph, tensor: TensorRef, key: str, kind: str) -> TensorRef:
    node = _builder(graph, tensor, key, kind)
    image_batch = _is_image_batch(graph, tensor)
    if kind == "max":
        return _global(node, tensor, "max", image_batch)
    if is_non_negative(graph, tensor):
        return node("_zeros", "const", [], shape="(1,)")
    largest_negated = _global(_builder(graph, tensor, key, "negmax"),
                              _builder(graph, tensor, key, "neg")("negative", "x", [tensor]), "max", image_batch)
    return node("negative", "value", [largest_negated])


def tap_kind(graph: Graph, ref: TensorRef) -> str:
    """"<tensor>|<kind>" of a tap output."""
    return graph.attrs(ref.node)[TAP_TAG]


def _histogram(graph: Graph, tensor: TensorRef, key: str, tap: HistogramTap) -> list[TensorRef]:
    """Counts, edges (MXNet's histogram must write them) and, for relu/abs sources, the number of
    exact zeros. BlockGrad on both histogram outputs: _histogram has no gradient, and a
    SymbolBlock builds its backward graph up front."""
    source, taps = tensor, []
    if tap.source in ("relu", "abs") and not is_non_negative(graph, tensor):
        source = _builder(graph, tensor, key, tap.source)(tap.source, "x", [tensor])
    if tap.source in ("relu", "abs") and tap.count_zeros:
        is_zero = _builder(graph, tensor, key, "is_zero")("_equal_scalar", "x", [source], scalar="0.0")
        taps.append(_global(_builder(graph, tensor, key, "zeros"), is_zero, "sum", _is_image_batch(graph, tensor)))
    counted = _builder(graph, tensor, key, "histogram")("_histogram", "x", [source], bin_cnt=tap.bins,
                                                        range=f"({tap.low!r}, {tap.high!r})")
    counts = _builder(graph, tensor, key, "hist")("BlockGrad", "counts", [TensorRef(counted.node, 0)])
    edges = _builder(graph, tensor, key, "hist_edges")("BlockGrad", "edges", [TensorRef(counted.node, 1)])
    return [counts, edges] + taps
