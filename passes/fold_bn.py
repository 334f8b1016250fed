"""fold_bn: Convolution|Deconvolution|FullyConnected -> BatchNorm  =>  the layer with folded weight and bias.

With s = gamma / sqrt(running_var + eps) (gamma = 1 when fix_gamma), the layer's
weight becomes W * s per output channel and its bias (b - running_mean) * s + beta,
computed in float64 and stored in the weight's dtype. Inference statistics only:
this is the deploy-time fold, not QAT's fake BatchNorm.
"""
from __future__ import annotations

import numpy as np

from qgraph import attrs as A
from qgraph.analysis import bn_fold_blocker
from qgraph.graph import Graph, TensorRef
from qgraph.pass_manager import PassContext

FOLDABLE_OPS = ("Convolution", "Deconvolution", "FullyConnected")
_NO_BIAS_DEFAULT = {"Convolution": False, "Deconvolution": True, "FullyConnected": False}


class FoldBN:
    name = "fold_bn"
    requires = ()

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        for layer, bn in _find_pairs(graph):
            reason = bn_fold_blocker(graph, layer, bn)
            if reason:
                ctx.report.skipped(self.name, bn, reason)
                continue
            _rewrite_pair(graph, layer, bn)
            ctx.report.changed(self.name, layer, f"folded {bn}")
        graph.cleanup()
        return graph


def _find_pairs(graph: Graph) -> list[tuple[str, str]]:
    return [(layer, bn) for layer, bn in graph.match_chain([FOLDABLE_OPS, "BatchNorm"])]


def _bn_scale_shift(graph: Graph, bn: str) -> tuple[np.ndarray, np.ndarray]:
    attrs = graph.attrs(bn)
    gamma, beta, mean, var = (graph.params[r.node].astype(np.float64) for r in graph.inputs(bn)[1:5])
    if A.get_bool(attrs, "fix_gamma", True, bn):
        gamma = np.ones_like(gamma)
    scale = gamma / np.sqrt(var + A.get_float(attrs, "eps", 1e-3, bn))
    return scale, beta - mean * scale


def _scaled_weight(op: str, weight: np.ndarray, scale: np.ndarray, num_group: int) -> np.ndarray:
    w = weight.astype(np.float64)
    if op == "Deconvolution":
        # (C_in, C_out/g, k...) with output channel = group * C_out/g + j
        grouped = w.reshape(num_group, w.shape[0] // num_group, w.shape[1], *w.shape[2:])
        factor = scale.reshape(num_group, 1, w.shape[1], *([1] * (w.ndim - 2)))
        return (grouped * factor).reshape(w.shape)
    return w * scale.reshape(-1, *([1] * (w.ndim - 1)))


def _owned_param(graph: Graph, name: str, reader: str, value: np.ndarray) -> str:
    """Store `value` as `name` if only `reader` uses it, else as a new copy for `reader`."""
    if {c for c, _ in graph.consumers(name)} == {reader}:
        graph.params[name] = value
        if "__shape__" in graph.attrs(name):
            graph.set_attr(name, "__shape__", A.format_tuple(value.shape))
        return name
    return graph.add_variable(f"{name}_folded", value, attrs={})


def _rewrite_pair(graph: Graph, layer: str, bn: str) -> None:
    op, attrs = graph.op(layer), graph.attrs(layer)
    inputs = graph.inputs(layer)
    weight_name = inputs[1].node
    weight = graph.params[weight_name]
    scale, shift = _bn_scale_shift(graph, bn)
    new_weight = _scaled_weight(op, weight, scale, A.get_int(attrs, "num_group", 1, layer))
    has_bias = not A.get_bool(attrs, "no_bias", _NO_BIAS_DEFAULT[op], layer)
    bias = graph.params[inputs[2].node].astype(np.float64) if has_bias else 0.0
    new_bias = (bias * scale + shift).astype(weight.dtype)

    new_weight_name = _owned_param(graph, weight_name, layer, new_weight.astype(weight.dtype))
    if new_weight_name != weight_name:
        graph.set_input(layer, 1, new_weight_name)
    if has_bias:
        bias_name = inputs[2].node
        new_bias_name = _owned_param(graph, bias_name, layer, new_bias)
        if new_bias_name != bias_name:
            graph.set_input(layer, 2, new_bias_name)
    else:
        stem = weight_name[: -len("_weight")] if weight_name.endswith("_weight") else layer
        bias_name = graph.add_variable(f"{stem}_bias", new_bias, attrs={})
        graph.add_input(layer, bias_name)
        graph.set_attr(layer, "no_bias", "False")
    graph.replace_all_uses(TensorRef(bn, 0), TensorRef(layer, 0))
    graph.remove_node(bn)
