"""fold_bn: Convolution|Deconvolution|FullyConnected -> BatchNorm  =>  the layer with folded weight and bias.

With s = gamma / sqrt(running_var + eps) (gamma = 1 when fix_gamma), the layer's weight
becomes W * s per output channel (s rounded to the weight's dtype and multiplied in it, as the
runtimes fold) and its bias (b - running_mean) * s + beta, computed in float64 and stored in the
weight's dtype (qgraph.folding). Inference statistics only: this
is the deploy-time fold, not QAT's fake BatchNorm. A fake-BN layer (passes/fake_bn.py),
whose weight is already folded and then unfolded, conv(x, F / s) with F = W * s (or
Q(W * s)), gets F back as its weight, unchanged. Folding twice is a no-op. With
config.equalize, each folded layer also records the BatchNorm's output mean and standard deviation
(qgraph.folding.output_statistics) for equalize's bias absorption.
"""
from __future__ import annotations

from qgraph import attrs as A
from qgraph.folding import (FOLDABLE_OPS, NO_BIAS_DEFAULT, bn_fold_blocker, bn_scale_shift, fake_bn_fold,
                            folded_weights, format_statistics, output_statistics)
from qgraph.graph import Graph, TensorRef
from qgraph.pass_manager import PassContext
from qgraph.tags import BN_STATS_TAG


class FoldBN:
    name = "fold_bn"
    requires = ()

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        pairs = []
        for layer, bn in _find_pairs(graph):
            reason = bn_fold_blocker(graph, layer, bn)
            if reason:
                ctx.report.skipped(self.name, bn, reason)
            else:
                pairs.append((layer, bn))
        scales = {pair: bn_scale_shift(graph, pair[1]) for pair in pairs}
        folded = folded_weights(graph, {pair: scale for pair, (scale, _) in scales.items()})
        written = []  # parameters now holding arrays the background job is still writing
        try:
            for layer, bn in pairs:
                if getattr(ctx.config, "equalize", False):
                    graph.set_attr(layer, BN_STATS_TAG, format_statistics(*output_statistics(graph, bn)))
                name = _rewrite_pair(graph, layer, bn, scales[layer, bn], folded.arrays.get((layer, bn)))
                if (layer, bn) in folded.pending:
                    written.append(name)
                ctx.report.changed(self.name, layer, f"folded {bn}")
            graph.cleanup()
        finally:  # even when a rewrite fails: what the graph holds must not be read unwritten
            if folded.job is not None:
                graph.mark_pending([name for name in written if graph.is_param(name)], folded.job)
        return graph


def _find_pairs(graph: Graph) -> list[tuple[str, str]]:
    return [(layer, bn) for layer, bn in graph.match_chain([FOLDABLE_OPS, "BatchNorm"])]


def _owned_param(graph: Graph, name: str, reader: str, value) -> str:
    """Store `value` as `name` if only `reader` uses it, else as a new copy for `reader`."""
    if {c for c, _ in graph.consumers(name)} == {reader}:
        return graph.set_param(name, value)
    return graph.add_variable(f"{name}_folded", value, attrs={})


def _rewrite_pair(graph: Graph, layer: str, bn: str, scale_shift, new_weight) -> str | None:
    """Fold `bn` (its bn_scale_shift) into `layer`; `new_weight` is the folded stored weight
    (None for a fake-BN layer). Returns the parameter now holding `new_weight`."""
    op, attrs = graph.op(layer), graph.attrs(layer)
    inputs = graph.inputs(layer)
    scale, shift = scale_shift
    folded = fake_bn_fold(graph, layer, bn)
    new_weight_name = None
    if folded is not None:
        graph.set_input(layer, 1, folded)
        dtype = graph.params[graph.inputs(bn)[1].node].dtype
    else:
        weight_name = inputs[1].node
        dtype = new_weight.dtype
        new_weight_name = _owned_param(graph, weight_name, layer, new_weight)
        if new_weight_name != weight_name:
            graph.set_input(layer, 1, new_weight_name)
    has_bias = not A.get_bool(attrs, "no_bias", NO_BIAS_DEFAULT[op], layer)
    bias = graph.params[inputs[2].node].astype("float64") if has_bias else 0.0
    new_bias = (bias * scale + shift).astype(dtype)
    if has_bias:
        bias_name = inputs[2].node
        new_bias_name = _owned_param(graph, bias_name, layer, new_bias)
        if new_bias_name != bias_name:
            graph.set_input(layer, 2, new_bias_name)
    else:
        weight_name = inputs[1].node
        stem = weight_name[: -len("_weight")] if weight_name.endswith("_weight") else layer
        bias_name = graph.add_variable(f"{stem}_bias", new_bias, attrs={})
        graph.add_input(layer, bias_name)
        graph.set_attr(layer, "no_bias", "False")
    graph.replace_all_uses(TensorRef(bn, 0), TensorRef(layer, 0))
    graph.remove_node(bn)
    return new_weight_name
