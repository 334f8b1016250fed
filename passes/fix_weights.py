"""fix_weights: layer(x, Q(W))  =>  layer(x, C) with C = Q(W) computed once by MXNet and stored as
the parameter `<layer>_weight_fixed`: every weight fake-quant subgraph becomes a constant that
holds integers times scales, the form a deployment tool stores; so does an integer bias
(quantize_bias) whose input step is a stored threshold, as `<layer>_bias_fixed`. Input
quantizers stay. The values are those the simulation computes (the same operators evaluate
them), including a fake-BN layer's Q(W * s) once fold_bn has folded its BatchNorm.
Winograd-domain weights are refused: their deployable form is the transformed kernel, not a
3x3 weight. Running it twice changes nothing.
"""
from __future__ import annotations

import networkx as nx

from qgraph.errors import ConfigError
from qgraph.graph import Graph, TensorRef
from qgraph.io import evaluate
from qgraph.pass_manager import PassContext
from qgraph.quantizer import FakeQuantSpec
from qgraph.tags import SPEC_TAG, WINOGRAD_PRODUCT_TAG


class FixWeights:
    name = "fix_weights"
    requires = ()

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        exits = _find_weight_quantizers(graph)
        for exit_node, spec in exits:
            if spec.winograd or graph.attrs(spec.layer).get(WINOGRAD_PRODUCT_TAG):
                raise ConfigError(f"{spec.layer}: fixing Winograd-domain weights is not supported")
        values = evaluate(graph, [TensorRef(n) for n, _ in exits]) if exits else []
        for (exit_node, spec), value in zip(exits, values):
            fixed = graph.add_variable(f"{spec.layer}_{spec.kind}_fixed", value.astype(value.dtype))
            graph.replace_all_uses(TensorRef(exit_node), TensorRef(fixed))
            ctx.report.changed(self.name, spec.layer, f"{spec.kind} fixed to its int{spec.bits} values ({fixed})")
        return graph.cleanup()


def _find_weight_quantizers(graph: Graph) -> list[tuple[str, FakeQuantSpec]]:
    """Weight quantizers, and bias quantizers that read no graph input (an offline input step)."""
    found = []
    for node in graph.nodes():
        text = graph.attrs(node).get(SPEC_TAG)
        if text:
            spec = FakeQuantSpec.from_json(text)
            if spec.kind == "weight" or (spec.kind == "bias" and not _reads_inputs(graph, node)):
                found.append((node, spec))
    return found


def _reads_inputs(graph: Graph, node: str) -> bool:
    return any(name in graph.input_names for name in nx.ancestors(graph.nx, node))
