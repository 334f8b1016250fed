"""quantize_winograd_weights (QuantConfig.winograd_mode 'weight', the seed's Winograd mode):

    conv(x, Q(W))  =>  conv(x, G^+ Q(G W G^T) G^+^T)

for every fake-quantized 3x3 stride-1 Convolution: the 3x3 kernels are transformed to the
F(2,3) / F(4,3) / F(6,3) domain (QuantConfig.winograd), quantized there with the layer's
weight spec (bits, per layer/group/output channel), projected back with G's pseudo-inverse
(constants) and convolved directly; the input keeps its quantizer. Runs after
insert_fake_quant; other layers are skipped with the reason in the report; running it twice
changes nothing.
"""
from __future__ import annotations

import dataclasses

from qgraph.config import QuantConfig
from qgraph.errors import ConfigError
from qgraph.graph import Graph
from qgraph.pass_manager import PassContext
from qgraph.quantizer import QUANTIZABLE_OPS, add_weight_fake_quant, strip_fake_quant, winograd_candidate


class QuantizeWinogradWeights:
    name = "quantize_winograd_weights"
    requires = ("insert_fake_quant",)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        config = ctx.config or QuantConfig()
        if config.winograd == "none":
            raise ConfigError("quantize_winograd_weights needs QuantConfig.winograd set to F23, F43 or F63")
        for layer in graph.nodes(QUANTIZABLE_OPS):
            spec, reason = winograd_candidate(graph, layer)
            if reason:
                ctx.report.skipped(self.name, layer, reason)
                continue
            strip_fake_quant(graph, kinds=("weight",), layers={layer})
            add_weight_fake_quant(graph, dataclasses.replace(spec, winograd=config.winograd))
            ctx.report.changed(self.name, layer, f"weight quantized in the {config.winograd} domain, "
                                                 "projected back with G's pseudo-inverse")
        return graph

