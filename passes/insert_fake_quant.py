"""insert_fake_quant: layer(x, W)  =>  layer(Qx(x), Qw(W)) for every Convolution (grouped and
depthwise included), Deconvolution and FullyConnected not marked by `exclude`.

Weights are quantized per layer, per group (num_group slices) or per output channel
(for FullyConnected both mean per output unit); inputs signed or unsigned ('auto':
unsigned only where the producer is provably non-negative), with an online (batch)
threshold or an offline one stored as the parameter `<layer>_data_threshold`
(initialised to 0 until calibration). Inserting into a graph that already has
fake-quant nodes is refused.
"""
from __future__ import annotations

import numpy as np

from qgraph import attrs as A
from qgraph.analysis import is_non_negative
from qgraph.config import QuantConfig
from qgraph.errors import GraphError
from qgraph.graph import Graph
from qgraph.pass_manager import PassContext
from qgraph.quantizer import (EXCLUDE_TAG, FQ_TAG, QUANTIZABLE_OPS, FakeQuantSpec, add_input_fake_quant,
                              add_weight_fake_quant, weight_param)


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
        for layer in graph.nodes(QUANTIZABLE_OPS):
            reason = graph.attrs(layer).get(EXCLUDE_TAG)
            if reason:
                ctx.report.skipped(self.name, layer, f"excluded ({reason})")
                continue
            described = [_insert_weight(graph, layer, config)]
            if config.quantize_input:
                described.append(_insert_input(graph, layer, config, non_negative))
            ctx.report.changed(self.name, layer, "; ".join(described))
        return graph


def _weight_grouping(graph: Graph, layer: str, config: QuantConfig) -> tuple[tuple, tuple]:
    """(reshape, reduced axes) that give one scale per layer, group or output channel."""
    weight = weight_param(graph, layer)
    if not graph.is_param(weight):
        raise GraphError(f"weight of '{layer}' ('{weight}') is not a stored parameter; cannot size its scales")
    shape = graph.params[weight].shape
    op, groups = graph.op(layer), A.get_int(graph.attrs(layer), "num_group", 1, layer)
    if config.quant_type == "layer":
        return (1, -1), (1,)
    if op == "FullyConnected":
        return (shape[0], -1), (1,)
    if config.quant_type == "group":
        return (groups, -1), (1,)
    if op == "Deconvolution":  # (C_in, C_out/g, k...): channel j of group i is [i, :, j, :]
        return (groups, shape[0] // groups, shape[1], -1), (1, 3)
    return (shape[0], -1), (1,)


def _insert_weight(graph: Graph, layer: str, config: QuantConfig) -> str:
    reshape, axes = _weight_grouping(graph, layer, config)
    spec = FakeQuantSpec("weight", layer, 1, config.weight_bits, signed=True, granularity=config.quant_type,
                         reshape=reshape, axes=axes, shape=tuple(graph.params[weight_param(graph, layer)].shape))
    add_weight_fake_quant(graph, spec)
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
                         stat=config.online_stat, threshold=threshold)
    add_input_fake_quant(graph, spec)
    kind = "int" if signed else "uint"
    return f"input {kind}{config.input_bits} {'online' if config.online else 'offline (calibrate)'}"
