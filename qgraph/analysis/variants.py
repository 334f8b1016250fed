"""Many mixed configurations of one QuantizedNet over one set of images: which layers have their
weights quantized, which their inputs, and at which spec, changes from run to run while the
parameters stay those of the net.

Every quantized layer reads its weight from a parameter of its own (`<layer>_weight_variant`)
that holds the float weight or a quantized one, computed once per spec by the simulation's own
operators (qgraph.emit.fixed_weight_outputs): switching a layer's weights is a copy into that
parameter, not a new graph. Input quantizers are part of the emitted graph, so each distinct
set of them (with their thresholds, baked as constants) is one emission (qgraph.emit.emit,
evaluation form) and one SymbolBlock, built when first asked for; the last few are kept.
Images run in batches of one shape (the last one topped up with its own images, whose rows
are then dropped), so every block binds once.

`logits` runs one configuration; `output_sqnr` compares every layer's output under a
configuration with the float net's; `own_sqnr` quantizes each layer alone, on a copy of it
that reads the float network's tensors, so one pass gives every layer's own quantization error.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Iterable, Mapping

import mxnet as mx
import numpy as np

from ..emit import Mode, emit, fixed_weight_outputs
from ..errors import ConfigError, DataError
from ..graph import Graph, TensorRef
from ..io import evaluate, to_block
from ..quantizer import FakeQuantSpec, add_fixed_weight, add_input_fake_quant
from ..runtime import QuantizedNet


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB: inf without noise, -inf without signal."""
    if noise <= 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def check_images(data, labels=None, data_field: str = "data", labels_field: str = "labels"):
    """(float32 NCHW images, int64 labels or None): DataError naming the field when the data is
    empty or not finite, or when the labels do not give one class per image."""
    images = data.asnumpy() if isinstance(data, mx.nd.NDArray) else np.asarray(data, np.float32)
    if images.ndim < 2 or not len(images):
        raise DataError(f"{data_field}: needs a batch of images (N, ...), got shape {images.shape}")
    if not np.isfinite(images).all():
        raise DataError(f"{data_field}: holds NaN or Inf values")
    if labels is None:
        return images.astype(np.float32), None
    labels = labels.asnumpy() if isinstance(labels, mx.nd.NDArray) else np.asarray(labels)
    labels = labels.reshape(-1)
    if len(labels) != len(images):
        raise DataError(f"{labels_field}: {len(labels)} labels for {len(images)} images in {data_field}")
    return images.astype(np.float32), labels.astype(np.int64)


class Variants:
    """Configurations of `net` (quantized, and calibrated when its inputs are offline) run over
    `images`. A configuration is the weight specs to apply (one per layer, any bits) and the
    input specs to apply with their thresholds (layer -> T; default the net's own)."""

    def __init__(self, net: QuantizedNet, images: np.ndarray, batch_size: int = 128, keep_blocks: int = 2):
        if not net.weight_specs and not net.input_specs:
            raise ConfigError("the net quantizes no layer: there is nothing to compare")
        self.graph = net.current_float_graph()
        for spec in net.weight_specs:
            if not self.graph.is_param(self.graph.inputs(spec.layer)[spec.slot].node):
                raise ConfigError(f"the weight of '{spec.layer}' is computed in the graph (fake_bn?): "
                                  "analyse the model without fake_bn")
        self.online = bool(net.input_specs) and net.mode.online
        self.thresholds = {} if self.online else net.thresholds()
        order = {name: i for i, name in enumerate(self.graph.nodes())}
        self.weight_specs = {s.layer: s for s in net.weight_specs}
        self.input_specs = {s.layer: s for s in net.input_specs}
        self.layers = sorted(set(self.weight_specs) | set(self.input_specs), key=order.__getitem__)
        self.count = len(images)
        self._ctx = net.ctx
        self._batches = _batches(images, batch_size, self._ctx)
        self._input_shapes = {self.graph.input_names[0]: (1,) + tuple(images.shape[1:])}
        self._slots = {s.id: f"{s.layer}_weight_variant" for s in net.weight_specs}
        self._params = mx.gluon.ParameterDict("")
        self._params.update(net.collect_params())
        self._float = {}
        for spec in net.weight_specs:
            param = self._params.get(self._slots[spec.id], shape=spec.shape, dtype="float32", grad_req="null")
            param.initialize(mx.init.Zero(), ctx=self._ctx)
            self._float[spec.layer] = mx.nd.array(self.graph.params[self.graph.inputs(spec.layer)[spec.slot].node],
                                                  ctx=self._ctx)
            param.set_data(self._float[spec.layer])
        self._holding = dict.fromkeys(self.weight_specs)  # layer -> the spec its parameter holds (None: float)
        self._quantized: dict[FakeQuantSpec, mx.nd.NDArray] = {}
        self._blocks: OrderedDict = OrderedDict()
        self._keep = keep_blocks

    # ------------------------------------------------------------------ runs
    def logits(self, weights: Iterable[FakeQuantSpec] = (), inputs: Iterable[FakeQuantSpec] = (),
               thresholds: Mapping[str, float] | None = None) -> np.ndarray:
        """The model's first output for every image with `weights` and `inputs` quantized."""
        block = self._configure(weights, inputs, thresholds, taps=())
        return np.concatenate([out[:valid].asnumpy() for out, valid in self._outputs(block, first=True)])

    def output_sqnr(self, weights: Iterable[FakeQuantSpec] = (), inputs: Iterable[FakeQuantSpec] = (),
                    thresholds: Mapping[str, float] | None = None) -> dict[str, float]:
        """layer -> SQNR (dB) of its output under the configuration against the float net's."""
        taps = tuple(self.layers)
        reference = self._block(("float", taps), lambda: self._emission((), {}, taps, weights=False))
        block = self._configure(weights, inputs, thresholds, taps)
        signal, noise = np.zeros(len(taps)), np.zeros(len(taps))
        for (outputs, valid), (expected, _) in zip(self._outputs(block), self._outputs(reference)):
            for i, (got, want) in enumerate(zip(outputs[-len(taps):], expected[-len(taps):])):
                signal[i] += _sum_squares(want, valid)
                noise[i] += _sum_squares(got - want, valid)
        return {layer: sqnr_db(s, n) for layer, s, n in zip(taps, signal, noise)}

    def own_sqnr(self, thresholds: Mapping[str, float] | None = None) -> dict[str, float]:
        """layer -> SQNR (dB) of its output with its own weights and input quantized (the net's
        specs) against the float layer, both reading the float network's tensors."""
        thresholds = self._thresholds(self.input_specs.values(), thresholds)
        self._hold(self.weight_specs.values())
        block = self._block(("own", tuple(sorted(thresholds.items()))), lambda: self._shadow_graph(thresholds))
        signal, noise = np.zeros(len(self.layers)), np.zeros(len(self.layers))
        for outputs, valid in self._outputs(block):
            noise += [float(o[:valid].asnumpy().sum(dtype=np.float64)) for o in outputs[0::2]]
            signal += [float(o[:valid].asnumpy().sum(dtype=np.float64)) for o in outputs[1::2]]
        return {layer: sqnr_db(s, n) for layer, s, n in zip(self.layers, signal, noise)}

    # ------------------------------------------------------------------ configuration
    def _configure(self, weights, inputs, thresholds, taps):
        """Load `weights` into the layers' parameters; the block that quantizes `inputs`."""
        inputs = tuple(inputs)
        self._hold(weights)
        baked = self._thresholds(inputs, thresholds)
        key = ("emission", tuple(inputs), tuple(sorted(baked.items())), taps)
        return self._block(key, lambda: self._emission(inputs, baked, taps))

    def _thresholds(self, inputs, thresholds) -> dict[str, float]:
        if self.online:
            return {}
        chosen = self.thresholds if thresholds is None else thresholds
        missing = [s.layer for s in inputs if s.layer not in chosen]
        if missing:
            raise ConfigError(f"no input threshold for '{missing[0]}'")
        return {s.layer: float(chosen[s.layer]) for s in inputs}

    def _hold(self, weights) -> None:
        """Each layer's weight parameter holds its spec's quantized weight, or the float one."""
        wanted = dict.fromkeys(self.weight_specs)
        for spec in weights:
            if spec.layer not in wanted:
                raise ConfigError(f"'{spec.layer}' has no quantized weight in this net")
            wanted[spec.layer] = spec
        self._compute([s for s in wanted.values() if s is not None and s not in self._quantized])
        for layer, spec in wanted.items():
            if self._holding[layer] != spec:
                value = self._float[layer] if spec is None else self._quantized[spec]
                self._params[self._slots[self.weight_specs[layer].id]].set_data(value)
                self._holding[layer] = spec

    def _compute(self, specs: list) -> None:
        """The quantized weight of every spec, by the simulation's operators (one spec per layer a run)."""
        while specs:
            layers, batch = set(), []
            for spec in specs:
                if spec.layer not in layers:
                    layers.add(spec.layer)
                    batch.append(spec)
            graph = fixed_weight_outputs(self.graph, batch)
            for spec, value in zip(batch, evaluate(graph, graph.outputs)):
                self._quantized[spec] = mx.nd.array(value, ctx=self._ctx)
            specs = [s for s in specs if s not in self._quantized]

    # ------------------------------------------------------------------ graphs and blocks
    def _emission(self, inputs, thresholds, taps, weights: bool = True) -> Graph:
        """The evaluation form with every layer's weight read from its parameter (when `weights`),
        `inputs` quantized, and the outputs of the `taps` layers after the model's."""
        specs = list(self.weight_specs.values()) if weights else []
        mode = Mode(weights=bool(specs), inputs=bool(inputs), online=self.online)
        emission = emit(self.graph, specs, list(inputs), mode, None if self.online else thresholds,
                        input_shapes=self._input_shapes, fixed_weights=self._slots)
        graph = emission.graph
        outputs = list(graph.outputs[:emission.model_outputs]) + [TensorRef(layer) for layer in taps]
        return graph.set_outputs(outputs).cleanup()

    def _shadow_graph(self, thresholds) -> Graph:
        """Beside every quantized layer a copy reading its quantized input and weight; outputs,
        per image, the squared difference of the two and the squared float output."""
        graph = self.graph.copy()
        sums = []
        for layer in self.layers:
            shadow = graph.add_node(graph.op(layer), f"{layer}_own", graph.inputs(layer), graph.attrs(layer))
            if layer in self.weight_specs:
                spec = self.weight_specs[layer]
                add_fixed_weight(graph, dataclasses.replace(spec, layer=shadow), self._slots[spec.id])
            if layer in self.input_specs:
                spec = dataclasses.replace(self.input_specs[layer], layer=shadow, online=self.online)
                add_input_fake_quant(graph, spec, ste=False, threshold_value=thresholds.get(layer))
            node = graph.builder(f"{layer}_own_sqnr")
            noise = node("square", "noise", [node("elemwise_sub", "diff", [TensorRef(layer), TensorRef(shadow)])])
            sums += [node("sum", "noise_sum", [noise], axis=0, exclude=True),
                     node("sum", "signal_sum", [node("square", "signal", [TensorRef(layer)])], axis=0, exclude=True)]
        return graph.set_outputs(sums).cleanup()

    def _block(self, key, build):
        """The SymbolBlock of the graph `build()` makes, kept under `key` among the last few."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        while len(self._blocks) >= self._keep:
            self._blocks.popitem(last=False)
        block = to_block(build(), params=self._params)
        block.hybridize(static_alloc=True, static_shape=True)
        self._blocks[key] = block
        return block

    def _outputs(self, block, first: bool = False):
        """(outputs, rows that are real images) of every batch; `first`: the model's first output only."""
        for batch, valid in self._batches:
            outputs = block(batch)
            outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            yield (outputs[0], valid) if first else (outputs, valid)


def _sum_squares(tensor: mx.nd.NDArray, valid: int) -> float:
    return float(mx.nd.sum(mx.nd.square(tensor[:valid])).asscalar())


def _batches(images: np.ndarray, batch_size: int, ctx) -> list:
    """(NDArray batch, real rows) pairs of one shape: a short last batch repeats its own images,
    which leaves an online threshold (the batch maximum) as it was."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be at least 1")
    size = min(batch_size, len(images))
    batches = []
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        valid = len(chunk)
        if valid < size:
            chunk = np.concatenate([chunk] * (-(-size // valid)))[:size]
        batches.append((mx.nd.array(chunk, ctx=ctx), valid))
    return batches
