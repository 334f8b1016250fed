"""BatchNorm folding: which layer -> BatchNorm pairs fold into one layer, and the arithmetic.

With s = gamma / sqrt(running_var + eps) (gamma = 1 when fix_gamma), a layer followed by an
inference-mode BatchNorm equals the layer with weight W * s per output channel and bias
(b - running_mean) * s + beta. passes/fold_bn.py applies it; passes/fake_bn.py builds the same
scale into the graph for QAT, and a fake-BN layer's weight is then already W * s (see
`fake_bn_fold`), which fold_bn takes as it is. For cross-layer equalization's bias absorption,
fold_bn can record what the BatchNorm said about its output, mean beta and standard deviation
|gamma| per channel (`output_statistics`), on the layer as BN_STATS_TAG.
"""
from __future__ import annotations

import json
import mmap
from concurrent.futures import Future
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from . import attrs as A
from . import background, native
from .graph import Graph, TensorRef
from .errors import GraphError
from .tags import BN_STATS_TAG, FAKE_BN_TAG

FOLDABLE_OPS = ("Convolution", "Deconvolution", "FullyConnected")
NO_BIAS_DEFAULT = {"Convolution": False, "Deconvolution": True, "FullyConnected": False}


def channel_axis(graph: Graph, layer: str) -> int | None:
    """The axis of a Convolution/Deconvolution/FullyConnected output that holds its channels."""
    attrs = graph.attrs(layer)
    if graph.op(layer) == "FullyConnected":
        return 1 if A.get_bool(attrs, "flatten", True, layer) else -1
    layout = attrs.get("layout", "None")
    if layout in ("None", "NCW", "NCHW", "NCDHW"):
        return 1
    return -1 if layout.endswith("C") else None


def fake_bn_fold(graph: Graph, layer: str, bn: str) -> TensorRef | None:
    """When `layer`'s weight is fake_bn's unfold of `bn` (conv(x, Q(W*s)/s)), the tensor it
    unfolds: the folded weight W*s (or Q(W*s)) that folding `bn` gives back. Else None."""
    weight = graph.inputs(layer)[1].node
    if graph.op(weight) == "broadcast_div" and graph.attrs(weight).get(FAKE_BN_TAG) == bn:
        return graph.inputs(weight)[0]
    return None


def bn_fold_blocker(graph: Graph, layer: str, bn: str) -> str | None:
    """None when BatchNorm `bn`, reading `layer`'s output, can be folded into `layer`'s weight
    and bias; else the reason it cannot."""
    users = graph.consumers(layer)
    if len(users) > 1 or graph.is_graph_output(layer):
        others = sorted({c for c, _ in users if c != bn}) or ["a graph output"]
        return f"output of {layer} is also read by {others}"
    for index in (1, 2):
        if graph.consumers(TensorRef(bn, index)) or graph.is_graph_output(TensorRef(bn, index)):
            return f"{bn} output {index} (batch mean/var) is used"
    non_params = [r.node for r in graph.inputs(bn)[1:] if not graph.is_param(r.node)]
    if non_params:
        return f"BatchNorm statistics {non_params} are not stored parameters"
    weight = graph.inputs(layer)[1].node
    if not graph.is_param(weight) and fake_bn_fold(graph, layer, bn) is None:
        return f"weight '{weight}' of {layer} is computed, not a stored parameter"
    bn_axis = A.get_int(graph.attrs(bn), "axis", 1, bn)
    layer_axis = channel_axis(graph, layer)
    if layer_axis is None or bn_axis != layer_axis:
        return f"BatchNorm axis {bn_axis} is not the channel axis of {layer}"
    return None


def bn_scale_shift(graph: Graph, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """(s, beta - running_mean * s) of an inference-mode BatchNorm, in float64."""
    gamma, beta, mean, var = (graph.params[r.node].astype(np.float64) for r in graph.inputs(bn)[1:5])
    scale = bn_scale(graph, bn, gamma, var)
    return scale, beta - mean * scale


def bn_scale(graph: Graph, bn: str, gamma: np.ndarray, running_var: np.ndarray) -> np.ndarray:
    """s = gamma / sqrt(running_var + eps) of BatchNorm `bn` for these values of its parameters
    (gamma = 1 when fix_gamma), in float64."""
    attrs = graph.attrs(bn)
    gamma = np.asarray(gamma, np.float64)
    if A.get_bool(attrs, "fix_gamma", True, bn):
        gamma = np.ones_like(gamma)
    return gamma / np.sqrt(np.asarray(running_var, np.float64) + A.get_float(attrs, "eps", 1e-3, bn))


def scaled_weight(op: str, weight: np.ndarray, scale: np.ndarray, num_group: int,
                  out: np.ndarray | None = None) -> np.ndarray:
    """`weight` times `scale` per output channel, for Convolution/FullyConnected (output channels
    first) and Deconvolution ((C_in, C_out/g, k...) per group), in the weight's dtype: the scale
    (computed in float64) is rounded to that dtype and multiplied in it, as the runtimes fold
    (ncnn's fuse_convolution_batchnorm, oneDNN's conv+BN fusion). A float64 product of every weight
    was a third of the pass pipeline's time on ResNet-18. Written into `out` when given."""
    if op == "Deconvolution":
        shape = (num_group, weight.shape[0] // num_group, weight.shape[1], *weight.shape[2:])
        factor = scale.reshape(num_group, 1, weight.shape[1], *([1] * (weight.ndim - 2)))
    else:
        shape = weight.shape
        factor = scale.reshape(-1, *([1] * (weight.ndim - 1)))
    if out is None:
        out = np.empty(weight.shape, weight.dtype)
    np.multiply(weight.reshape(shape), factor.astype(weight.dtype), out=out.reshape(shape))
    return out


def empty_arrays(templates: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Uninitialised arrays shaped and typed like `templates`, carved from one allocation: a
    large one gets huge pages, and writing fresh memory (its page faults) is most of what folding
    ResNet-18's weights costs (14 ms with an allocation per weight, 11.6 ms in one). They share
    that memory's lifetime: it is freed when the last of them is.

    Every page is faulted in here, on the calling thread, even when a background job will write
    the arrays (folded_weights). Faulted by the background thread, ResNet-18's took up to 120 ms
    instead of 10, all of it system time for the same number of faults, in 0 to 16 of 30 runs
    of the pass pipeline on this VM; faulted here, in none of 90. Our reading: Linux hands a
    CPU the pages it freed last, and another CPU pages that this VM's host must back afresh."""
    offsets, total = [], 0
    for template in templates:
        offsets.append(total)
        total += -(-template.nbytes // 64) * 64  # each array cache-line aligned
    arena = np.empty(total, np.uint8)
    arena[::mmap.PAGESIZE] = 0
    return [arena[start:start + t.nbytes].view(t.dtype).reshape(t.shape) for start, t in zip(offsets, templates)]


class FoldedWeights(NamedTuple):
    arrays: dict[tuple[str, str], np.ndarray]  # (layer, BatchNorm) -> W * s
    job: Future | None                         # still writing the arrays of these pairs:
    pending: frozenset                         # read them only once it is done


def folded_weights(graph: Graph, scales: Mapping[tuple[str, str], np.ndarray]) -> FoldedWeights:
    """W * s (scaled_weight) for each (layer, BatchNorm) pair -> s whose weight is a stored
    parameter (a fake-BN layer's is not: fake_bn_fold), keyed by the pair, written into one
    allocation (empty_arrays).

    With the native library (qgraph.native.host), the float32 weights of Convolution and
    FullyConnected layers (a scale per row) are multiplied by one call on the background
    thread (qgraph.background): the caller marks those arrays pending on the graph, and the
    passes after fold_bn run while they are written (ResNet-18's fold_bn step: 15-16 -> 8-9
    ms). The rest are computed here with numpy: the same bits."""
    layers = [((layer, bn), graph.op(layer), graph.params[graph.inputs(layer)[1].node], scale,
               A.get_int(graph.attrs(layer), "num_group", 1, layer))
              for (layer, bn), scale in scales.items() if fake_bn_fold(graph, layer, bn) is None]
    outputs = empty_arrays([weight for _, _, weight, _, _ in layers])
    host = native.host()
    deferred, pending = [], set()
    for (pair, op, weight, scale, groups), out in zip(layers, outputs):
        if (host is not None and op != "Deconvolution" and weight.dtype == np.float32 and weight.ndim
                and weight.flags.c_contiguous):
            deferred.append((weight, out, scale.astype(np.float32)))
            pending.add(pair)
        else:
            scaled_weight(op, weight, scale, groups, out)
    job = background.submit(host.scale_rows(*zip(*deferred))) if deferred else None
    return FoldedWeights({layer[0]: out for layer, out in zip(layers, outputs)}, job, frozenset(pending))


def output_statistics(graph: Graph, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """(beta, |gamma|) of a BatchNorm, float64 (gamma = 1 when fix_gamma): the per-channel mean and
    standard deviation BatchNorm gives its output, as DFQ's bias absorption reads them."""
    gamma, beta = (graph.params[r.node].astype(np.float64) for r in graph.inputs(bn)[1:3])
    if A.get_bool(graph.attrs(bn), "fix_gamma", True, bn):
        gamma = np.ones_like(gamma)
    return beta, np.abs(gamma)


def format_statistics(mean: np.ndarray, std: np.ndarray) -> str:
    """The BN_STATS_TAG value: {"mean": [...], "std": [...]} with 9 significant digits."""
    return json.dumps({"mean": [float(f"{v:.9g}") for v in mean], "std": [float(f"{v:.9g}") for v in std]},
                      separators=(",", ":"))


def recorded_statistics(graph: Graph, layer: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) of a layer's output as recorded by fold_bn (BN_STATS_TAG), or None."""
    text = graph.attrs(layer).get(BN_STATS_TAG)
    if not text:
        return None
    try:
        record = json.loads(text)
        mean, std = np.asarray(record["mean"], np.float64), np.asarray(record["std"], np.float64)
    except (ValueError, KeyError, TypeError):
        raise GraphError(f"'{layer}': attribute {BN_STATS_TAG} is not a BatchNorm statistics record") from None
    if mean.shape != std.shape or mean.ndim != 1:
        raise GraphError(f"'{layer}': attribute {BN_STATS_TAG} holds mean and std of different lengths")
    return mean, std
