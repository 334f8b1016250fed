"""insert_fake_quant: layer(x, W)  =>  layer(Qx(x), Qw(W)) for every Convolution (grouped and
depthwise included), Deconvolution and FullyConnected not kept in float by `exclude`.

Weights are quantized per layer, per group (num_group slices) or per output channel
(for FullyConnected both mean per output unit); inputs signed or unsigned ('auto':
unsigned only where the producer is provably non-negative), with an online (batch)
threshold or an offline one stored as the parameter `<layer>_data_threshold`
(initialised to 0 until calibration). config.layer_overrides give a layer its own bits,
granularity or signedness ("float" entries are the `exclude` pass's). With quantize_bias, a
layer's bias becomes an int32 value at the input step times the weight step. Inserting into
a graph that already has fake-quant nodes is refused.
"""
from __future__ import annotations

import numpy as np

from qgraph.config import QuantConfig
from qgraph.errors import GraphError
from qgraph.graph import Graph
from qgraph.pass_manager import PassContext
from qgraph.quantizer import (QUANTIZABLE_OPS, FakeQuantSpec, add_bias_fake_quant, add_input_fake_quant,
                              add_weight_fake_quant, input_step, spec_feeding, weight_spec)
from qgraph.signs import is_non_negative
from qgraph.tags import EXCLUDE_TAG, FQ_TAG, WINOGRAD_TAG


class InsertFakeQuant:
    name = "insert_fake_quant"
    requires = ()

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        config = ctx.config or QuantConfig()
        already = [n for n in graph.nx if FQ_TAG in graph.attrs(n)]
        if already:
            raise GraphError(f"the graph already has fake-quant nodes (e.g. '{already[0]}'); "
                             "insert them into the float graph only once")
        non_negative: dict = {}
        layers = graph.nodes(QUANTIZABLE_OPS)
        overrides = config.overrides_for(layers)
        for layer in layers:
            own = overrides[layer].apply(config) if layer in overrides else config
            reason = _skip_reason(graph, layer) or ("layer_overrides: float" if overrides.get(layer) and
                                                    overrides[layer].float else None)
            if reason:
                ctx.report.skipped(self.name, layer, reason)
                continue
            described = [_insert_weight(graph, layer, own)]
            if config.quantize_input:
                described.append(_insert_input(graph, layer, own, non_negative))
                if config.quantize_bias:
                    described += _insert_bias(graph, layer)
            ctx.report.changed(self.name, layer, "; ".join(described))
        return graph


def _skip_reason(graph: Graph, layer: str) -> str | None:
    attrs = graph.attrs(layer)
    if attrs.get(EXCLUDE_TAG):
        return f"excluded ({attrs[EXCLUDE_TAG]})"
    if attrs.get(WINOGRAD_TAG):
        return f"float transform of {attrs[WINOGRAD_TAG]}'s Winograd kernel"
    return None


def _insert_weight(graph: Graph, layer: str, config: QuantConfig) -> str:
    add_weight_fake_quant(graph, weight_spec(graph, layer, config.weight_bits, config.quant_type, config.rounding,
                                             bias_bits=32 if config.quantize_bias else 0))
    return f"weight int{config.weight_bits} per {config.quant_type}"


def _insert_input(graph: Graph, layer: str, config: QuantConfig, memo: dict) -> str:
    source = graph.inputs(layer)[0]
    if config.input_signed == "auto":
        signed = not is_non_negative(graph, source, memo)
    else:
        signed = bool(config.input_signed)
    threshold = ""
    if not config.online:
        threshold = graph.add_variable(f"{layer}_data_threshold", np.zeros(1, np.float32),
                                       attrs={FQ_TAG: f"{layer}_data_fq"})
    spec = FakeQuantSpec("input", layer, 0, config.input_bits, signed=signed, online=config.online,
                         stat=config.online_stat, threshold=threshold, rounding=config.rounding,
                         learned=config.learn_thresholds)
    add_input_fake_quant(graph, spec)
    kind = "int" if signed else "uint"
    how = "online" if config.online else ("offline, learned (LSQ)" if config.learn_thresholds else "offline (calibrate)")
    return f"input {kind}{config.input_bits} {how}"


def _insert_bias(graph: Graph, layer: str) -> list[str]:
    """The layer's bias at its input step times its weight step, if its weight spec asks (quantize_bias)."""
    weight = spec_feeding(graph, layer, 1)
    if weight is not None and add_bias_fake_quant(graph, weight, input_step(spec_feeding(graph, layer, 0))):
        return [f"bias int{weight.bias_bits} at the input step x the weight step"]
    return []
