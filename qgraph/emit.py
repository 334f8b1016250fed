"""Emission: a pure function from (float graph, fake-quant specs, Mode) to the Graph that computes
one form of the simulation. QuantizedNet caches one SymbolBlock per emitted form; tests and
tools can build and inspect any form without a block.

The float graph is the model with every fake-quant subgraph removed and a parameter
`spec.threshold` for each quantized input. The Mode says which quantizers are on, whether
input thresholds come from each batch (online) or from those parameters, and whether the
emission is the training form (straight-through gradients) or the shorter evaluation form.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

from .graph import Graph, TensorRef
from .quantizer import FakeQuantSpec, add_input_fake_quant, add_weight_fake_quant
from .tags import FQ_TAG


@dataclass(frozen=True)
class Mode:
    """Which form of the simulation to compute.

    weights / inputs: those quantizers on. online: input thresholds from each batch (its
    maximum) rather than the stored parameters. training: the straight-through form a
    gradient can flow through (else the evaluation form). bn_frozen: BatchNorm uses its
    running statistics in training too (QAT's BN freeze). sign_probe: also output each
    unsigned input's batch minimum, to warn when unsigned quantization clips negatives.
    """

    weights: bool = True
    inputs: bool = True
    online: bool = False
    training: bool = False
    bn_frozen: bool = False
    sign_probe: bool = False

    def replace(self, **changes) -> "Mode":
        return dataclasses.replace(self, **changes)


class Emission(NamedTuple):
    """An emitted graph. Its outputs are the model's `model_outputs` outputs, then (online
    inputs) the batch threshold of each layer in `stat_layers`, then (sign probe) the batch
    minimum of each layer in `probe_layers`."""

    graph: Graph
    model_outputs: int
    stat_layers: tuple
    probe_layers: tuple


def emit(float_graph: Graph, weight_specs: Sequence[FakeQuantSpec], input_specs: Sequence[FakeQuantSpec],
         mode: Mode, thresholds: Mapping[str, float] | None = None) -> Emission:
    """The float graph with the fake-quant subgraphs `mode` asks for. Offline inputs read
    their threshold parameters, or, given `thresholds` (layer -> value), use those values as
    constants, which a forward pass computes with fewer operators."""
    graph = float_graph.copy()
    model_outputs = len(graph.outputs)
    for bn in graph.nodes("BatchNorm") if mode.bn_frozen else ():
        graph.set_attr(bn, "use_global_stats", True)
    for spec in weight_specs if mode.weights else ():
        add_weight_fake_quant(graph, spec, ste=mode.training)
    stats, minima, stat_layers, probe_layers = [], [], [], []
    for spec in input_specs if mode.inputs else ():
        spec = dataclasses.replace(spec, online=mode.online)
        if mode.sign_probe and mode.online and not spec.signed:
            data = graph.inputs(spec.layer)[0]
            minima.append(TensorRef(graph.add_node("min", f"{spec.id}_probe_min", [data], {FQ_TAG: spec.id})))
            probe_layers.append(spec.layer)
        value = None if mode.online or thresholds is None else thresholds[spec.layer]
        _, stat = add_input_fake_quant(graph, spec, ste=mode.training, threshold_value=value)
        if mode.online:
            stats.append(stat)
            stat_layers.append(spec.layer)
    for ref in stats + minima:
        graph.add_output(ref)
    return Emission(graph.cleanup(), model_outputs, tuple(stat_layers), tuple(probe_layers))
