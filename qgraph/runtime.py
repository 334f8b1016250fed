"""QuantizedNet: the block users hold to evaluate, calibrate and train a fake-quantized graph.

It keeps the float graph and the fake-quant specs taken from a rewritten graph, one
ParameterDict shared by every form of the simulation (weights, BatchNorm statistics and
input thresholds), and the current Mode. A forward pass runs the SymbolBlock of the current
form, emitted once by qgraph.emit and then reused; switching modes never copies or
re-binds parameters. With quantization disabled the emission is the float graph itself,
so outputs equal the float model's bit for bit. Input thresholds live in one place, the
ThresholdStore, which also keeps the EMA that online calibration uses. Post-training recovery
(qgraph.recovery) changes the net only through set_layer_bias and set_weight_rounding, which
add parameters to the float graph when needed and drop the emitted forms.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Mapping

import mxnet as mx
import numpy as np
from mxnet import autograd

from . import calibrate as calibration
from . import native, recovery
from .emit import Emission, Mode, emit, fixed_weight_outputs
from .errors import ConfigError, GraphError
from .graph import Graph
from .io import evaluate, load, save, to_block
from .quantizer import LEARNED_FLOOR, QUANTIZABLE_OPS, fake_quant_specs, stripped_copy
from .tags import FQ_TAG

log = logging.getLogger(__name__)


class ThresholdStore:
    """The offline input thresholds of a QuantizedNet: one float32 Parameter of shape (1,) per
    quantized input, named `spec.threshold`, plus whether each was ever set (an online
    calibration's EMA starts from its first batch, not from the stored value)."""

    def __init__(self, params: mx.gluon.ParameterDict, specs, already_set: bool):
        self.params = params
        self.names = {s.layer: s.threshold for s in specs}
        self._set = {s.layer: already_set for s in specs}
        self.learned = [s.threshold for s in specs if s.learned]

    def floor_learned(self) -> None:
        """Raise every learned threshold a step took below LEARNED_FLOOR to it, in place, as
        torch.ao's learnable fake-quantize clamps its scale: every form then reads a positive
        threshold, and the training form's gradient reaches it again (below the floor its
        maximum passes none, and an LSQ step that overshoots zero would leave it there)."""
        with autograd.pause():
            for name in self.learned:
                for data in self.params[name].list_data():  # every context's copy
                    mx.nd._internal._maximum_scalar(data, scalar=LEARNED_FLOOR, out=data)

    def values(self) -> dict[str, float]:
        """layer -> threshold."""
        if not self.names:
            return {}
        self.floor_learned()
        data = mx.nd.concat(*[self.params[n].data() for n in self.names.values()], dim=0).asnumpy()
        return dict(zip(self.names, (float(v) for v in data)))

    def set(self, thresholds: Mapping[str, float]) -> None:
        for layer, value in thresholds.items():
            if layer not in self.names:
                raise ConfigError(f"'{layer}' has no quantized input; layers with one: {sorted(self.names)[:5]}...")
            if not np.isfinite(float(value)) or float(value) < 0:
                raise ConfigError(f"threshold {value!r} for '{layer}' must be a finite number >= 0")
            self.params[self.names[layer]].set_data(mx.nd.array([float(value)]))
            self._set[layer] = True

    def update_ema(self, batch: Mapping[str, mx.nd.NDArray], momentum: float) -> None:
        """T <- momentum * T + (1 - momentum) * batch T; a threshold never set takes the batch T."""
        for layer, stat in batch.items():
            param = self.params[self.names[layer]]
            if self._set[layer]:
                param.set_data(param.data(stat.context) * momentum + stat.reshape((1,)) * (1 - momentum))
            else:
                param.set_data(stat.reshape((1,)).copy())
                self._set[layer] = True

    def reset(self) -> None:
        """Forget every threshold: the next EMA update starts from its batch."""
        self._set = dict.fromkeys(self._set, False)

    def unset(self) -> list[str]:
        return [layer for layer, done in self._set.items() if not done]


class FixedWeights:
    """The quantized weights of the evaluation form, computed by the simulation's own weight
    operators (qgraph.emit.fixed_weight_outputs) and kept as constants until a parameter they
    depend on changes. A change is noticed by a fingerprint (a fixed random projection of every
    parameter those weights read) taken at every evaluation forward: one fused operator
    (qgraph.native) reading the parameters, else a product with stored probes and a sum each.
    The executor that computes them is bound to the parameters' own arrays for each computation
    and then dropped, so its intermediate arrays go back to MXNet's pool for the activations."""

    def __init__(self, float_graph: Graph, weight_specs, shared: mx.gluon.ParameterDict):
        self.names = {s.id: f"{s.layer}_weight_quantized" for s in weight_specs}
        self.params = mx.gluon.ParameterDict("")
        self._shared = shared
        self._specs = list(weight_specs)
        self._float_graph = float_graph
        self._symbol = None
        self._fingerprint = None
        self._fingerprinter = None  # an executor bound to the parameters' arrays
        self._probes: dict = {}

    def _build(self, ctx) -> None:
        self._symbol = fixed_weight_outputs(self._float_graph, self._specs).to_symbol()
        self._inputs = self._symbol.list_arguments()
        if not native.available():
            rng = np.random.RandomState(0)
            self._probes = {name: mx.nd.array(rng.uniform(0.5, 1.5, self._shared[name].data(ctx).shape), ctx=ctx)
                            for name in self._inputs}
        for spec in self._specs:
            param = self.params.get(self.names[spec.id], shape=spec.shape, dtype="float32", grad_req="null")
            param.initialize(mx.init.Zero(), ctx=next(iter(self._shared.values())).list_ctx())

    def refresh(self) -> None:
        """Recompute the quantized weights if any parameter they read has changed."""
        ctx = next(iter(self._shared.values())).list_ctx()[0]
        if self._symbol is None:
            self._build(ctx)
        current = {name: self._shared[name].data(ctx) for name in self._inputs}
        fingerprint = self._fingerprint_of(current, ctx)
        if self._fingerprint is not None and np.array_equal(fingerprint, self._fingerprint):
            return
        # bound to the parameters' own arrays, which it only reads (no copy of every weight)
        executor = self._symbol.bind(ctx, args=current, grad_req="null")
        for spec, out in zip(self._specs, executor.forward(is_train=False)):
            self.params[self.names[spec.id]].set_data(out)
        mx.nd.waitall()  # the outputs are copied before the executor's memory is released
        del executor
        self._fingerprint = fingerprint

    def _fingerprint_of(self, current: dict, ctx) -> np.ndarray:
        if not self._inputs:
            return np.zeros(0)
        if self._probes:  # no fused operators (a BLAS dot would cost 5 MB of buffers at its first use)
            sums = [mx.nd.sum(current[n] * self._probes[n]).reshape((1,)) for n in self._inputs]
            return mx.nd.concat(*sums, dim=0).asnumpy()
        executor = self._fingerprinter
        if executor is None or any(current[n].handle.value != executor.arg_dict[n].handle.value for n in self._inputs):
            symbol = native.symbol(native.FINGERPRINT_OP, self._inputs, num_args=len(self._inputs))
            executor = self._fingerprinter = symbol.bind(ctx, args=current, grad_req="null")
        return executor.forward(is_train=False)[0].asnumpy()


def add_threshold_params(graph: Graph, input_specs, values: Mapping[str, np.ndarray]) -> Graph:
    """Add the parameter `spec.threshold` of every input spec, valued values[name] (0 if absent)."""
    for spec in input_specs:
        value = np.asarray(values.get(spec.threshold, np.zeros(1, np.float32)), np.float32).reshape(1)
        graph.add_variable(spec.threshold, value, attrs={FQ_TAG: spec.id})
    return graph


def add_rounding_params(graph: Graph, weight_specs, values: Mapping[str, np.ndarray]) -> Graph:
    """Add the parameter `spec.offsets` (learned rounding decisions) of every weight spec that has one."""
    for spec in weight_specs:
        if spec.offsets:
            if spec.offsets not in values:
                raise GraphError(f"{spec.id}: rounding parameter '{spec.offsets}' has no value")
            graph.add_variable(spec.offsets, np.asarray(values[spec.offsets], np.float32), attrs={FQ_TAG: spec.id})
    return graph


def _float_graph(graph: Graph, input_specs, weight_specs) -> Graph:
    """The graph without fake-quant subgraphs, with a threshold parameter for every input spec
    and the rounding parameter of every weight spec with learned rounding."""
    stored = {s.threshold: graph.params[s.threshold] for s in input_specs if s.threshold in graph.params}
    offsets = {s.offsets: graph.params[s.offsets] for s in weight_specs if s.offsets in graph.params}
    stripped = add_threshold_params(stripped_copy(graph), input_specs, stored)
    return add_rounding_params(stripped, weight_specs, offsets)


def _shared_params(graph: Graph, fixed: set, ctx) -> mx.gluon.ParameterDict:
    """A ParameterDict holding the graph's parameters; aux states and `fixed` get no gradient."""
    params = mx.gluon.ParameterDict("")
    aux = graph.aux_names()
    for name, value in graph.params.items():
        grad_req = "null" if name in aux or name in fixed else "write"
        param = params.get(name, shape=value.shape, dtype=value.dtype, grad_req=grad_req)
        param.initialize(_Value(value), ctx=ctx)
    return params


class _Value(mx.init.Initializer):
    """Initialises a parameter with a given numpy value, written straight into its array (a
    temporary NDArray per parameter would stay in MXNet's memory pool)."""

    def __init__(self, value: np.ndarray):
        super().__init__()
        self._value = value

    def _init_weight(self, _, arr):
        arr[:] = self._value


class QuantizedNet(mx.gluon.SymbolBlock):
    """A SymbolBlock over a fake-quantized graph. Create with `QuantizedNet(graph)` (a graph
    that went through insert_fake_quant), `passes.quantize(...)` or `QuantizedNet.load(prefix)`.

    `mode` (a qgraph.emit.Mode) is the form a forward pass computes; enable_quantize(),
    disable_quantize(), quantize_input() and freeze_bn() change it. Under autograd.record()
    the training form (straight-through gradients) runs."""

    def __init__(self, graph: Graph, ctx=None):
        specs = fake_quant_specs(graph)
        input_specs = [dataclasses.replace(s, threshold=s.threshold or f"{s.layer}_data_threshold")
                       for s in specs if s.kind == "input"]
        weight_specs = [s for s in specs if s.kind == "weight"]
        float_graph = _float_graph(graph, input_specs, weight_specs)
        ctx = ctx or mx.cpu()
        shared = _shared_params(float_graph, {s.threshold for s in input_specs if not s.learned}
                                | {s.offsets for s in weight_specs if s.offsets}, ctx)
        with warnings.catch_warnings():  # "cannot decide type": the inputs are typed at the first forward
            warnings.simplefilter("ignore")
            super().__init__(graph.to_symbol(), [mx.sym.var(n) for n in graph.input_names], params=shared)
        self.ctx = ctx
        self.float_graph = float_graph
        self.input_specs = input_specs
        self.weight_specs = weight_specs
        online = any(s.online for s in input_specs)
        self.mode = Mode(weights=bool(self.weight_specs), inputs=bool(input_specs), online=online)
        self.report = None
        self._shared = shared
        self._thresholds = ThresholdStore(shared, input_specs, already_set=not online)
        self._batch_stats: dict = {}
        self._signs_checked = False
        self._reset_forms()

    def _reset_forms(self) -> None:
        """Forget every emitted form and the fixed weights: the float graph or the specs changed."""
        self._blocks = {}
        self._fixed = FixedWeights(self.float_graph, self.weight_specs, self._shared)
        self._eval_params = mx.gluon.ParameterDict("")
        self._eval_params.update(self._shared)

    def collect_params(self, select=None):
        """Every parameter of every mode: float weights, BN statistics, input thresholds."""
        return self._shared if select is None else super().collect_params(select)

    # ------------------------------------------------------------------ forward
    def _block(self, mode: Mode, baked: tuple | None, shape: tuple):
        """The SymbolBlock of `mode` (thresholds `baked` as constants when given) for inputs of
        `shape` (the batch axis aside), built once. The evaluation form reads fixed quantized
        weights, quantizes inputs on oneDNN's reorders and runs with static memory."""
        key = (mode, baked, shape)
        if key not in self._blocks:
            if baked is not None:  # thresholds changed since this mode's last baked emission
                for stale in [k for k in self._blocks if k[0] == mode and k[2] == shape]:
                    del self._blocks[stale]
            evaluation = not mode.training
            fixed = evaluation and mode.weights and self.weight_specs
            emission = emit(self.float_graph, self.weight_specs, self.input_specs, mode,
                            dict(zip(self._thresholds.names, baked)) if baked else None,
                            input_shapes={self.float_graph.input_names[0]: (1,) + shape},
                            fixed_weights=self._fixed.names if fixed else None)
            if fixed:
                self._fixed.refresh()
                self._eval_params.update(self._fixed.params)
            block = to_block(emission.graph, params=self._eval_params if fixed else self._shared)
            if evaluation:
                block.hybridize(static_alloc=True, static_shape=True)
            self._blocks[key] = (block, emission)
        return self._blocks[key]

    def cached_forms(self) -> list[tuple[Mode, tuple | None]]:
        """The (mode, baked thresholds) of every form built so far, in build order."""
        return [key[:2] for key in self._blocks]

    def emission(self, mode: Mode | None = None, thresholds: Mapping[str, float] | None = None) -> Emission:
        """The emitted graph of `mode` (default: the current mode, evaluation form)."""
        return emit(self.float_graph, self.weight_specs, self.input_specs, mode or self.mode, thresholds)

    def forward(self, x, *args):
        mode = self.mode.replace(weights=self.mode.weights and bool(self.weight_specs),
                                 inputs=self.mode.inputs and bool(self.input_specs),
                                 training=autograd.is_recording())
        mode = mode.replace(online=mode.inputs and mode.online)
        if mode.online and not mode.sign_probe:
            mode = mode.replace(sign_probe=self._wants_sign_probe)
        # offline thresholds as constants: a forward reads them once (a few dozen scalars), and a
        # changed value (calibrate, set_thresholds, a Trainer) selects a new emission; thresholds
        # being learned stay parameters in training
        learning = mode.training and any(s.learned for s in self.input_specs)
        if learning:
            self._thresholds.floor_learned()
        baked = tuple(self._thresholds.values().values()) if mode.inputs and not mode.online and not learning else None
        block, emission = self._block(mode, baked, tuple(x.shape[1:]))
        if mode.weights and not mode.training:
            self._fixed.refresh()
        outputs = block(x, *args)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        n_model, n_stats = emission.model_outputs, len(emission.stat_layers)
        self._batch_stats = dict(zip(emission.stat_layers, outputs[n_model:n_model + n_stats]))
        if emission.probe_layers:
            self._warn_negative_unsigned(emission.probe_layers, outputs[n_model + n_stats:])
        return outputs[0] if n_model == 1 else outputs[:n_model]

    @property
    def _wants_sign_probe(self) -> bool:
        return not self._signs_checked and any(not s.signed for s in self.input_specs)

    def _warn_negative_unsigned(self, layers, minima) -> None:
        negative = [layer for layer, m in zip(layers, minima) if float(m.asnumpy().min()) < 0]
        if negative:
            log.warning("unsigned input quantization clips negative values to 0 at %d layer(s): %s; "
                        "consider input_signed='auto' or True", len(negative), ", ".join(negative))
        self._signs_checked = True

    # ------------------------------------------------------------------ modes
    def enable_quantize(self) -> None:
        self.mode = self.mode.replace(weights=True, inputs=True)

    def disable_quantize(self) -> None:
        self.mode = self.mode.replace(weights=False, inputs=False)

    def freeze_bn(self, frozen: bool = True) -> None:
        """QAT: normalise with the running statistics in training too and stop updating them
        (Jacob et al.'s BN freeze); the weights then see the same fold as in inference."""
        self.mode = self.mode.replace(bn_frozen=frozen)

    def quantize_input(self, enable: bool = True, online: bool = True) -> None:
        """Switch input quantization on or off, with batch (online) or stored (offline) thresholds."""
        if enable and not online:
            unset = self._thresholds.unset()
            if unset:
                raise ConfigError(f"offline input quantization needs thresholds; {len(unset)} were never set "
                                  f"(e.g. for '{unset[0]}'): calibrate, or run update_ema() during online passes first")
        self.mode = self.mode.replace(inputs=enable, online=online)

    # ------------------------------------------------------------------ thresholds
    def update_ema(self, momentum: float = 0.9) -> None:
        """Fold the last online batch's thresholds into the stored ones:
        T <- momentum * T + (1 - momentum) * batch T (the first update takes the batch T)."""
        if not self._batch_stats:
            raise ConfigError("update_ema() needs an online forward pass first (quantize_input(online=True))")
        self._thresholds.update_ema(self._batch_stats, momentum)

    def reset_thresholds(self) -> None:
        """Forget stored thresholds: the next update_ema() starts from its batch."""
        self._thresholds.reset()

    def set_thresholds(self, thresholds: Mapping[str, float]) -> None:
        """Store thresholds given by layer name (as `thresholds()` returns them)."""
        self._thresholds.set(thresholds)

    def thresholds(self) -> dict[str, float]:
        """Every input threshold, by the name of the layer whose input it quantizes."""
        return self._thresholds.values()

    def calibrate(self, data, mode: str = "naive", calib_epoch: int = 3, num_batches=None, **options) -> dict:
        """Set every input threshold from calibration data and switch inputs to offline;
        see qgraph.calibrate.calibrate. Returns layer -> {threshold, method, bits, signed}."""
        return calibration.calibrate(self, data, mode=mode, calib_epoch=calib_epoch, num_batches=num_batches,
                                     **options)

    # ------------------------------------------------------------------ post-training recovery
    def correct_bias(self, data, batch_size: int = 128, progress: bool = True) -> dict:
        """Empirical bias correction, layer by layer; see qgraph.recovery.bias_correction.
        Returns layer -> the correction added to its bias."""
        return recovery.correct_bias(self, data, batch_size=batch_size, progress=progress)

    def adaround(self, data, iterations: int = recovery.ITERATIONS, **options) -> dict:
        """Learned rounding of every quantized weight, layer by layer; see qgraph.recovery.adaround.
        Returns layer -> {loss_nearest, loss, flipped}."""
        return recovery.adaround(self, data, iterations=iterations, **options)

    def layer_bias(self, layer: str) -> np.ndarray | None:
        """The current bias of a layer (None when it has none)."""
        inputs = self.float_graph.inputs(self._layer(layer))
        return self._shared[inputs[2].node].data().asnumpy() if len(inputs) > 2 else None

    def set_layer_bias(self, layer: str, value) -> str:
        """Set a layer's bias, giving it a bias parameter (`<layer>_bias`) if it has none; every form
        of the simulation, the export and the deployable graph read it. Returns the parameter's name."""
        graph = self.float_graph
        value = np.asarray(value, np.float32)
        inputs = graph.inputs(self._layer(layer))
        channels = self._shared[inputs[1].node].shape[0] if graph.op(layer) != "Deconvolution" else None
        if value.ndim != 1 or (channels is not None and value.shape[0] != channels) or not np.isfinite(value).all():
            raise ConfigError(f"bias for '{layer}' must be {channels or 'one per output channel:'} finite values, "
                              f"got shape {value.shape}")
        if len(inputs) > 2:
            self._shared[inputs[2].node].set_data(mx.nd.array(value))
            return inputs[2].node
        name = graph.add_variable(f"{layer}_bias", value)
        graph.add_input(layer, name)
        graph.set_attr(layer, "no_bias", "False")
        self._add_param(name, value, "write")
        self._reset_forms()
        return name

    def set_weight_rounding(self, layer: str, offsets) -> str:
        """Round `layer`'s weight as stored decisions instead of to nearest: Q(W) = clip(floor(W / s)
        + R, -L, L) * s with R (`offsets`, 0 or 1 per weight) kept as the parameter
        `<layer>_weight_rounding`, which every form, the export, fixed_graph and the ncnn writer use."""
        index = next((i for i, s in enumerate(self.weight_specs) if s.layer == layer), None)
        if index is None:
            raise ConfigError(f"'{layer}' has no quantized weight; layers with one: "
                              f"{[s.layer for s in self.weight_specs][:5]}")
        spec = self.weight_specs[index]
        offsets = np.asarray(offsets, np.float32)
        if offsets.shape != tuple(spec.shape) or not np.isin(offsets, (0.0, 1.0)).all():
            raise ConfigError(f"rounding offsets for '{layer}' must be 0 or 1 in the weight's shape {spec.shape}, "
                              f"got shape {offsets.shape}")
        if spec.winograd:
            raise ConfigError(f"'{layer}': learned rounding of Winograd-domain weights is not supported")
        if spec.offsets:
            self._shared[spec.offsets].set_data(mx.nd.array(offsets))
            return spec.offsets
        name = self.float_graph.add_variable(f"{layer}_weight_rounding", offsets, attrs={FQ_TAG: spec.id})
        self._add_param(name, offsets, "null")
        self.weight_specs[index] = dataclasses.replace(spec, offsets=name)
        self._reset_forms()
        return name

    def quantized_weights(self) -> dict[str, np.ndarray]:
        """layer -> its quantized weight Q(W) (integers times scales), as the simulation computes it."""
        graph = fixed_weight_outputs(self.current_float_graph(), self.weight_specs)
        return {spec.layer: value for spec, value in zip(self.weight_specs, evaluate(graph, graph.outputs))}

    def _layer(self, layer: str) -> str:
        if layer not in self.float_graph or self.float_graph.op(layer) not in QUANTIZABLE_OPS:
            raise ConfigError(f"'{layer}' is not a Convolution, Deconvolution or FullyConnected layer of the net")
        return layer

    def _add_param(self, name: str, value: np.ndarray, grad_req: str) -> None:
        param = self._shared.get(name, shape=value.shape, dtype="float32", grad_req=grad_req)
        param.initialize(mx.init.Zero(), ctx=self.ctx)
        param.set_data(mx.nd.array(value))

    # ------------------------------------------------------------------ graphs and files
    def parameter_values(self) -> dict[str, np.ndarray]:
        """Every parameter's current value (after training or calibration), as numpy."""
        self._thresholds.floor_learned()  # what exporters, fixed_graph and checkpoints of the net read
        return {name: param.data().asnumpy() for name, param in self._shared.items()}

    def current_float_graph(self) -> Graph:
        """The float graph (threshold parameters included) holding the current parameter values."""
        graph = self.float_graph.copy()
        values = self.parameter_values()
        return graph.set_params({n: values[n] for n in graph.params})

    def current_graph(self, training: bool = True) -> Graph:
        """The graph of the current mode with the current parameter values and no extra outputs:
        the training form (re-trainable, re-calibratable) unless `training` is False; stock MXNet
        operators only, so that it can be saved and loaded anywhere."""
        mode = self.mode.replace(online=self.mode.inputs and self.mode.online, training=training, sign_probe=False)
        emission = emit(self.current_float_graph(), self.weight_specs, self.input_specs, mode, fused=False)
        graph = emission.graph
        return graph.set_outputs(graph.outputs[:emission.model_outputs]).cleanup()

    def export(self, prefix) -> tuple:
        """Save the current mode as PREFIX-symbol.json + PREFIX-0000.params (stock MXNet ops;
        `SymbolBlock.imports` loads it, `QuantizedNet.load` brings it back as a QuantizedNet).
        The deployable form (BN folded, weights fixed) is passes.fixed_graph(net)."""
        return save(self.current_graph(), prefix)

    @classmethod
    def load(cls, prefix, ctx=None, input_names=("data",)) -> "QuantizedNet":
        return cls(load(prefix, input_names=input_names), ctx=ctx)
