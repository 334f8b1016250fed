"""Fake-quant subgraphs made of stock MXNet operators, added to a Graph, and their removal.

Arithmetic (DESIGN.md, "Quantizer arithmetic"):
  weights, signed, b bits, per scale group g:  s = max|W_g| / (2^(b-1)-1),
      Q(W) = clip(round(W / s), -(2^(b-1)-1), 2^(b-1)-1) * s
  inputs, threshold T:  unsigned s = T / (2^b-1), clip to [0, T];
      signed s = T / (2^(b-1)-1), clip to [-T, T];  Q(x) = round(clip(x) / s) * s
MXNet's `round` rounds half away from zero. A zero scale is raised to 1e-30, so an
all-zero group or input quantizes to exactly zero instead of NaN.

Training form ("ste"): out = BlockGrad(Q) + (c - BlockGrad(c)) with c the clipped
input (or W), which is exactly Q in the forward pass and has gradient 1 inside the
clip range and 0 outside (straight-through estimator). The evaluation form is Q alone.

Every node of a fake-quant subgraph carries the hidden attribute `__qgraph_fq__`
(= its id); the exit node also carries the spec (`__qgraph_spec__`, JSON). MXNet keeps
`__*__` attributes through save and load, so an exported graph can be taken apart again
with `strip_fake_quant`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass

import numpy as np

from . import winograd
from .analysis import is_non_negative
from .attrs import get_tuple
from .errors import GraphError
from .graph import Graph, TensorRef

FQ_TAG = "__qgraph_fq__"
SPEC_TAG = "__qgraph_spec__"
EXCLUDE_TAG = "__qgraph_exclude__"
FAKE_BN_TAG = "__qgraph_fake_bn__"  # nodes of passes/fake_bn.py; value: the BatchNorm folded
QUANTIZABLE_OPS = ("Convolution", "Deconvolution", "FullyConnected")
MIN_SCALE = 1e-30


def signed_levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def unsigned_levels(bits: int) -> int:
    return 2 ** bits - 1


@dataclass(frozen=True)
class FakeQuantSpec:
    """What one fake-quant subgraph computes. `layer` is the node whose input it feeds,
    `slot` that input's slot. Weights: `reshape` groups W as (G, -1) (or finer for
    Deconvolution channels) and `axes` are reduced for each scale. Inputs: `online`
    thresholds come from the batch (`stat` 'max' or 'mean_max'), otherwise from the
    parameter `threshold`. A weight spec with `winograd` set (F23/F43/F63) quantizes the
    3x3 kernels in that tile's Winograd domain, U = G g G^T, grouped by `reshape` as W would
    be, and projects Q(U) back with G's pseudo-inverse (qgraph.winograd)."""

    kind: str              # "weight" or "input"
    layer: str
    slot: int
    bits: int
    signed: bool = True
    granularity: str = "layer"
    reshape: tuple = (1, -1)
    axes: tuple = (1,)
    shape: tuple = ()      # the weight's shape
    online: bool = True
    stat: str = "max"
    threshold: str = ""
    winograd: str = ""

    @property
    def id(self) -> str:
        return f"{self.layer}_{'weight' if self.kind == 'weight' else 'data'}_fq"

    @property
    def levels(self) -> int:
        return signed_levels(self.bits) if self.signed else unsigned_levels(self.bits)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FakeQuantSpec":
        fields = json.loads(text)
        for key in ("reshape", "axes", "shape"):
            fields[key] = tuple(fields[key])
        return cls(**fields)


class _Builder:
    """Adds tagged nodes for one fake-quant subgraph."""

    def __init__(self, graph: Graph, spec: FakeQuantSpec):
        self.graph, self.spec = graph, spec

    def op(self, op: str, suffix: str, inputs, **attrs) -> TensorRef:
        attrs = {k: str(v) for k, v in attrs.items()}
        attrs[FQ_TAG] = self.spec.id
        return TensorRef(self.graph.add_node(op, f"{self.spec.id}_{suffix}", inputs, attrs))

    def scale(self, magnitude: TensorRef) -> TensorRef:
        step = self.op("_div_scalar", "step", [magnitude], scalar=float(self.spec.levels))
        return self.op("_maximum_scalar", "scale", [step], scalar=MIN_SCALE)

    def finish(self, clipped: TensorRef, quantized: TensorRef, ste: bool) -> TensorRef:
        if not ste:
            return quantized
        frozen = self.op("BlockGrad", "frozen", [quantized])
        passthrough = self.op("elemwise_sub", "passthrough", [clipped, self.op("BlockGrad", "clipped_frozen", [clipped])])
        return self.op("elemwise_add", "ste", [frozen, passthrough])


def _tag_exit(graph: Graph, exit_ref: TensorRef, spec: FakeQuantSpec) -> str:
    graph.set_attr(exit_ref.node, SPEC_TAG, spec.to_json())
    return exit_ref.node


def add_weight_fake_quant(graph: Graph, spec: FakeQuantSpec, ste: bool = True) -> str:
    """layer[slot] <- W   becomes   layer[slot] <- Q(W). Returns the exit node."""
    build = _Builder(graph, spec)
    target, slot = _weight_slot(graph, spec)
    weight = graph.inputs(target)[slot]
    if not spec.shape:
        if not graph.is_param(weight.node):
            raise GraphError(f"{spec.id}: spec.shape is empty and '{weight.node}' has no stored value to size it")
        spec = dataclasses.replace(spec, shape=tuple(graph.params[weight.node].shape))
        build.spec = spec
    levels = spec.levels
    # _copy first: oneDNN grouped convolutions re-lay the shared weight in place, and
    # Reshape cannot read that layout ("could not create a primitive descriptor for a reorder")
    private = build.op("_copy", "copy", [weight])
    source = winograd.transform_weight(build.op, private, spec.winograd) if spec.winograd else private
    grouped = build.op("Reshape", "grouped", [source], shape=spec.reshape)
    magnitude = build.op("max", "absmax", [build.op("abs", "abs", [grouped])], axis=spec.axes, keepdims=True)
    scale = build.scale(magnitude)
    integers = build.op("clip", "int", [build.op("round", "round", [build.op("broadcast_div", "div", [grouped, scale])])],
                        a_min=float(-levels), a_max=float(levels))
    dequantized = build.op("broadcast_mul", "mul", [integers, scale])
    if spec.winograd:
        dequantized = winograd.project_weight(build.op, dequantized, spec.winograd)
    # Reshape to the stored shape: reshape_like fails MXNet's partial shape inference here
    quantized = build.op("Reshape", "dequant", [dequantized], shape=spec.shape)
    exit_ref = build.finish(weight, quantized, ste)
    graph.set_input(target, slot, exit_ref)
    return _tag_exit(graph, exit_ref, spec)


def _weight_slot(graph: Graph, spec: FakeQuantSpec) -> tuple[str, int]:
    """Where a weight quantizer reads: the layer's weight slot, or, for a fake-BN layer
    (passes/fake_bn.py), the folded weight W * s before it is unfolded."""
    ref = graph.inputs(spec.layer)[spec.slot]
    if spec.kind == "weight" and graph.attrs(ref.node).get(FAKE_BN_TAG) and graph.op(ref.node) == "broadcast_div":
        return ref.node, 0
    return spec.layer, spec.slot


def weight_param(graph: Graph, layer: str) -> str:
    """The stored weight of a layer, looking through a fake-BN fold."""
    ref = graph.inputs(layer)[1]
    while graph.attrs(ref.node).get(FAKE_BN_TAG):
        ref = graph.inputs(ref.node)[0]
    return ref.node


def online_threshold(build: _Builder, x: TensorRef) -> TensorRef:
    """The batch statistic an online input quantizer uses as its threshold, shape (1,)."""
    spec = build.spec
    source = build.op("abs", "abs", [x]) if spec.signed else x
    graph = build.graph
    if graph.op(spec.layer) in ("Convolution", "Deconvolution") and \
            len(get_tuple(graph.attrs(spec.layer), "kernel", (), spec.layer)) == 2:
        # NCHW: global max pooling first, about 8x faster than a full `max` on oneDNN tensors
        source = build.op("Pooling", "spatial_max", [source], kernel=(1, 1), global_pool=True, pool_type="max")
    if spec.stat == "mean_max":
        stat = build.op("mean", "batch_stat", [build.op("max", "sample_max", [source], axis=(0,), exclude=True)])
    else:
        stat = build.op("max", "batch_stat", [source])
    return build.op("BlockGrad", "threshold", [build.op("_maximum_scalar", "nonneg", [stat], scalar=0.0)])


def add_input_fake_quant(graph: Graph, spec: FakeQuantSpec, ste: bool = True,
                         threshold_value: float | None = None) -> tuple[str, TensorRef | None]:
    """layer[slot] <- x   becomes   layer[slot] <- Q(x). Returns (exit node, the online
    threshold tensor or None when the threshold is the parameter `spec.threshold`).
    With `threshold_value` (offline only) the threshold is baked into scalar operators:
    same values, but no broadcast operators, whose backward reduces over the whole
    activation and dominates a QAT step; such a graph cannot be re-calibrated."""
    build = _Builder(graph, spec)
    x = graph.inputs(spec.layer)[spec.slot]
    if threshold_value is not None and not spec.online:
        return _add_baked_input_fake_quant(build, x, threshold_value, ste), None
    if spec.online:
        threshold = online_threshold(build, x)
    else:
        if spec.threshold not in graph.params:
            raise GraphError(f"{spec.id}: threshold parameter '{spec.threshold}' has no value")
        threshold = TensorRef(spec.threshold)
    scale = build.scale(threshold)
    step = TensorRef(f"{spec.id}_step")  # T / L before the MIN_SCALE floor: T = 0 gives exact zeros
    integers = _integers(build, build.op("broadcast_div", "div", [x, scale]), x, ste)
    quantized = build.op("broadcast_mul", "dequant", [integers, step])
    graph.set_input(spec.layer, spec.slot, quantized)
    return _tag_exit(graph, quantized, spec), (threshold if spec.online else None)


# Adding then subtracting 1.5 * 2^23 rounds a float32 |v| < 2^22 to an integer (ties to even),
# and both scalar additions have gradient 1: a straight-through round in two cheap passes,
# where `_contrib_round_ste` costs about ten
_ROUNDING_MAGIC = 12582912.0


def _add_baked_input_fake_quant(build: _Builder, x: TensorRef, threshold: float, ste: bool) -> str:
    spec = build.spec
    step = np.float32(threshold) / np.float32(spec.levels)  # the graph form's float32 arithmetic
    scale = float(np.maximum(step, np.float32(MIN_SCALE)))
    integers = _integers(build, build.op("_div_scalar", "div", [x], scalar=scale), x, ste)
    quantized = build.op("_mul_scalar", "dequant", [integers], scalar=float(step))
    build.graph.set_input(spec.layer, spec.slot, quantized)
    return _tag_exit(build.graph, quantized, spec)


def _integers(build: _Builder, scaled: TensorRef, x: TensorRef, ste: bool) -> TensorRef:
    """round(clip(x / s, lo, L)): equal to the contract's round(clip(x, lo*s, T) / s), in fewer
    passes over the activation, which is what a QAT step spends its quantization time on."""
    spec = build.spec
    value = scaled
    if spec.signed or not is_non_negative(build.graph, x):  # after a ReLU the lower clip is a no-op
        value = build.op("_maximum_scalar", "lower", [value], scalar=float(-spec.levels if spec.signed else 0))
    value = build.op("_minimum_scalar", "clip", [value], scalar=float(spec.levels))  # `clip` is 4x slower
    if not ste:
        return build.op("round", "round", [value])
    # training form: ties round to even here, half away from zero in the evaluation form
    shifted = build.op("_plus_scalar", "shift", [value], scalar=_ROUNDING_MAGIC)
    return build.op("_minus_scalar", "round", [shifted], scalar=_ROUNDING_MAGIC)


def fake_quant_specs(graph: Graph) -> list[FakeQuantSpec]:
    """The spec of every fake-quant subgraph in the graph, in topological order."""
    return [FakeQuantSpec.from_json(graph.attrs(n)[SPEC_TAG]) for n in graph.nodes() if SPEC_TAG in graph.attrs(n)]


def strip_fake_quant(graph: Graph, kinds=("weight", "input"), layers=None) -> Graph:
    """Remove the fake-quant subgraphs of the given kinds (and, if given, only those feeding
    the nodes in `layers`), wiring each layer back to the
    tensor the subgraph quantized. Threshold parameters left unused are dropped with the
    rest of the dead nodes: read them from `graph.params` first if they are needed."""
    for exit_node in [n for n in graph.nodes() if SPEC_TAG in graph.attrs(n)]:
        spec = FakeQuantSpec.from_json(graph.attrs(exit_node)[SPEC_TAG])
        if spec.kind not in kinds or (layers is not None and spec.layer not in layers):
            continue
        members = {n for n in graph.nx if graph.attrs(n).get(FQ_TAG) == spec.id}
        sources = {ref for n in members for ref in graph.inputs(n)
                   if ref.node not in members and ref.node != spec.threshold}
        if len(sources) != 1:
            raise GraphError(f"fake-quant subgraph '{spec.id}' reads {sorted(sources)}; expected one tensor")
        graph.replace_all_uses(TensorRef(exit_node), sources.pop())
    graph.cleanup()
    return graph
