"""Checks MXNet itself does not make before it dereferences a graph: each operator's input and
output counts, and attributes whose bad values crash shape inference (a zero group count
divides by zero). MXNet answers such graphs with a segfault or SIGFPE, not an error, so
qgraph rejects them with a GraphError first."""
from __future__ import annotations

import ctypes
from functools import lru_cache

import mxnet as mx
from mxnet.base import _LIB, SymbolHandle, c_str, c_str_array, check_call, mx_uint

from . import attrs as A
from .errors import GraphError, mxnet_error_line

# Outputs MXNet hides from list_outputs() but that a graph may still read.
_HIDDEN_OUTPUTS = {"BatchNorm": 3, "Dropout": 2, "LRN": 2, "SyncBatchNorm": 3, "LayerNorm": 3, "GroupNorm": 3}
_POSITIVE_INTS = {
    "Convolution": ("num_filter", "num_group"), "Deconvolution": ("num_filter", "num_group"),
    "FullyConnected": ("num_hidden",), "SliceChannel": ("num_outputs",), "split": ("num_outputs",),
}
_POSITIVE_TUPLES = {
    "Convolution": ("kernel", "stride", "dilate"), "Deconvolution": ("kernel", "stride", "dilate"),
    "Pooling": ("stride",),
}


@lru_cache(maxsize=4096)
def arity(op: str, attr_items: tuple) -> tuple[int, int]:
    """(inputs, outputs) of `op` with these attributes, as MXNet composes it."""
    try:
        op_handle = ctypes.c_void_p()
        check_call(_LIB.NNGetOpHandle(c_str(op), ctypes.byref(op_handle)))
        handle = SymbolHandle()
        keys = [k for k, _ in attr_items if not k.startswith("__")]
        values = [v for k, v in attr_items if not k.startswith("__")]
        check_call(_LIB.MXSymbolCreateAtomicSymbol(op_handle, mx_uint(len(keys)), c_str_array(keys),
                                                   c_str_array(values), ctypes.byref(handle)))
        symbol = mx.sym.Symbol(handle)
        symbol._compose(name="probe")
        return len(symbol.list_inputs()), max(len(symbol.list_outputs()), _HIDDEN_OUTPUTS.get(op, 0))
    except mx.base.MXNetError as err:
        raise GraphError(f"operator {op} cannot be built with these attributes: {mxnet_error_line(err)}") from None


def check_node(name: str, op: str, attrs: dict, n_inputs: int, unknown_ok: bool = False) -> int | None:
    """Raise GraphError if MXNet would crash on this node; returns its number of outputs, or
    None when `unknown_ok` and MXNet cannot build the op alone (a fused op with a subgraph)."""
    for key in _POSITIVE_INTS.get(op, ()):
        if key in attrs and A.get_int(attrs, key, 1, name) < 1:
            raise GraphError(f"node '{name}' ({op}): {key}={attrs[key]} must be at least 1")
    for key in _POSITIVE_TUPLES.get(op, ()):
        if key in attrs and any(v < 1 for v in A.get_tuple(attrs, key, (), name)):
            raise GraphError(f"node '{name}' ({op}): {key}={attrs[key]} must be at least 1 everywhere")
    try:
        expected_inputs, outputs = arity(op, tuple(sorted(attrs.items())))
    except GraphError as err:
        if unknown_ok:
            return None
        raise GraphError(f"node '{name}': {err}") from None
    if n_inputs != expected_inputs:
        raise GraphError(f"node '{name}' ({op}) has {n_inputs} inputs; MXNet needs {expected_inputs}")
    return outputs
