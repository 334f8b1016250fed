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
import warnings
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

from .graph import Graph, TensorRef
from .quantizer import (FakeQuantSpec, add_bias_fake_quant, add_fixed_weight, add_input_fake_quant,
                        add_weight_fake_quant, input_step)
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
         mode: Mode, thresholds: Mapping[str, float] | None = None, input_shapes: Mapping | None = None,
         fixed_weights: Mapping[str, str] | None = None, fused: bool = True) -> Emission:
    """The float graph with the fake-quant subgraphs `mode` asks for. Offline inputs read
    their threshold parameters, or, given `thresholds` (layer -> value), use those values as
    constants, which a forward pass computes with fewer operators; with `input_shapes` (the
    graph inputs' shapes) too, the evaluation form quantizes on oneDNN's reorders. Given
    `fixed_weights` (spec id -> parameter name), the evaluation form reads each quantized weight
    from that parameter instead of computing it (see fixed_weight_outputs). A weight spec with
    bias_bits quantizes its layer's bias too where both of the layer's quantizers are on. A graph
    to be saved takes `fused=False`: stock MXNet operators only (qgraph.native's are for running)."""
    graph = float_graph.copy()
    model_outputs = len(graph.outputs)
    for bn in graph.nodes("BatchNorm") if mode.bn_frozen else ():
        graph.set_attr(bn, "use_global_stats", True)
    data_shapes = _data_shapes(graph, input_specs, input_shapes) if input_shapes else {}
    for spec in weight_specs if mode.weights else ():
        if fixed_weights is not None and not mode.training:
            add_fixed_weight(graph, spec, fixed_weights[spec.id])
        else:
            add_weight_fake_quant(graph, spec, ste=mode.training, fused=fused)
    stats, minima, stat_layers, probe_layers, steps = [], [], [], [], {}
    for spec in input_specs if mode.inputs else ():
        spec = dataclasses.replace(spec, online=mode.online)
        if mode.sign_probe and mode.online and not spec.signed:
            data = graph.inputs(spec.layer)[0]
            minima.append(TensorRef(graph.add_node("min", f"{spec.id}_probe_min", [data], {FQ_TAG: spec.id})))
            probe_layers.append(spec.layer)
        value = None if mode.online or thresholds is None else thresholds[spec.layer]
        _, stat = add_input_fake_quant(graph, spec, ste=mode.training, threshold_value=value,
                                       data_shape=data_shapes.get(spec.layer), fused=fused)
        steps[spec.layer] = input_step(spec, value)
        if mode.online:
            stats.append(stat)
            stat_layers.append(spec.layer)
    for spec in weight_specs if mode.weights else ():  # integer biases: both steps are known now
        if spec.layer in steps:
            add_bias_fake_quant(graph, spec, steps[spec.layer], ste=mode.training)
    for ref in stats + minima:
        graph.add_output(ref)
    return Emission(graph.cleanup(), model_outputs, tuple(stat_layers), tuple(probe_layers))


def _data_shapes(graph: Graph, input_specs, input_shapes: Mapping) -> dict[str, tuple]:
    """layer -> shape of the data input each input spec quantizes, by MXNet's shape inference."""
    internals = graph.to_symbol().get_internals()
    with warnings.catch_warnings():  # a tensor MXNet cannot size just keeps the general form
        warnings.simplefilter("ignore")
        _, shapes, _ = internals.infer_shape_partial(**{k: tuple(v) for k, v in input_shapes.items()})
    by_output = dict(zip(internals.list_outputs(), shapes or ()))
    found = {}
    for spec in input_specs:
        ref = graph.inputs(spec.layer)[spec.slot]
        names = [ref.node] if graph.op(ref.node) == "null" else [f"{ref.node}_output{ref.index}"] + (
            [f"{ref.node}_output"] if ref.index == 0 else [])
        shape = next((by_output[n] for n in names if by_output.get(n)), None)
        if shape is not None and all(d > 0 for d in shape):
            found[spec.layer] = tuple(shape)
    return found


def fixed_weight_outputs(float_graph: Graph, weight_specs: Sequence[FakeQuantSpec]) -> Graph:
    """The graph that computes every quantized weight (outputs in `weight_specs` order) from the
    float parameters, with the same operators as the simulation: evaluated once, its values
    feed the `fixed_weights` parameters of an evaluation emission."""
    graph = float_graph.copy()
    exits = [TensorRef(add_weight_fake_quant(graph, spec, ste=False, fused=True)) for spec in weight_specs]
    return graph.set_outputs(exits).cleanup()
