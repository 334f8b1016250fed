"""Sign analysis: which tensors of a graph are provably non-negative (decides unsigned inputs
for input_signed='auto', and lets quantizers and calibration taps skip a lower clip)."""
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
