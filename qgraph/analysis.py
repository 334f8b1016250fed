"""Graph analyses shared by passes, calibration and the runtime: which tensors are provably
non-negative, and which layer -> BatchNorm pairs can be folded into one layer."""
from __future__ import annotations

import numpy as np

from . import attrs as A
from .graph import Graph, TensorRef

# Ops whose output is non-negative whatever their input.
_ALWAYS_NON_NEGATIVE = {"relu", "sigmoid", "softmax", "abs", "square", "sqrt", "exp"}
_NON_NEGATIVE_ACTIVATIONS = {"relu", "sigmoid", "softrelu"}
# Ops whose output is non-negative when every data input is.
_PRESERVE_SIGN = {"Pooling", "Flatten", "flatten", "Reshape", "reshape", "transpose", "Dropout", "expand_dims",
                  "squeeze", "SliceChannel", "split", "slice", "slice_axis", "Crop", "identity", "_copy",
                  "Concat", "concat", "elemwise_add", "_Plus", "_plus", "broadcast_add", "elemwise_mul",
                  "broadcast_mul", "UpSampling", "max", "mean", "sum", "BlockGrad", "_maximum", "broadcast_maximum",
                  "add_n", "ElementWiseSum"}


def is_non_negative(graph: Graph, tensor: TensorRef, memo: dict | None = None) -> bool:
    """True when the producer of `tensor` guarantees values >= 0 (ReLU, sigmoid, clip at 0,
    and pooling, reshaping, concatenation or sums of such tensors). `memo` caches answers."""
    memo = {} if memo is None else memo
    if tensor.node in memo:
        return memo[tensor.node]
    node, op, attrs = tensor.node, graph.op(tensor.node), graph.attrs(tensor.node)
    if op == "null":
        result = node in graph.params and bool(np.all(graph.params[node] >= 0))
    elif op in _ALWAYS_NON_NEGATIVE:
        result = True
    elif op == "Activation":
        result = attrs.get("act_type") in _NON_NEGATIVE_ACTIVATIONS
    elif op == "LeakyReLU":
        result = attrs.get("act_type", "leaky") == "leaky" and A.get_float(attrs, "slope", 0.25, node) == 0.0
    elif op == "clip":
        result = A.get_float(attrs, "a_min", -1.0, node) >= 0
    elif op in ("_mul_scalar", "_div_scalar", "_plus_scalar", "_maximum_scalar"):
        scalar_ok = A.get_float(attrs, "scalar", -1.0, node) >= 0
        result = (scalar_ok and is_non_negative(graph, graph.inputs(node)[0], memo)) or (
            op == "_maximum_scalar" and scalar_ok)
    elif op in _PRESERVE_SIGN:
        result = all(is_non_negative(graph, ref, memo) for ref in graph.inputs(node))
    else:
        result = False
    memo[tensor.node] = result
    return result


def channel_axis(graph: Graph, layer: str) -> int | None:
    """The axis of a Convolution/Deconvolution/FullyConnected output that holds its channels."""
    attrs = graph.attrs(layer)
    if graph.op(layer) == "FullyConnected":
        return 1 if A.get_bool(attrs, "flatten", True, layer) else -1
    layout = attrs.get("layout", "None")
    if layout in ("None", "NCW", "NCHW", "NCDHW"):
        return 1
    return -1 if layout.endswith("C") else None


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
    if not graph.is_param(weight):
        return f"weight '{weight}' of {layer} is computed, not a stored parameter"
    bn_axis = A.get_int(graph.attrs(bn), "axis", 1, bn)
    layer_axis = channel_axis(graph, layer)
    if layer_axis is None or bn_axis != layer_axis:
        return f"BatchNorm axis {bn_axis} is not the channel axis of {layer}"
    return None
