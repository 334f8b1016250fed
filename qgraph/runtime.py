"""QuantizedNet: the block users hold to evaluate, calibrate and train a fake-quantized graph.

It keeps the float graph and the fake-quant specs taken from a rewritten graph, and
emits one SymbolBlock per mode (weights on/off, inputs on/off, online/offline
thresholds, training form with straight-through gradients or the shorter evaluation
form). Every emission shares one ParameterDict, so switching modes never copies or
re-binds parameters, and an emission is built once and then reused. With quantization
disabled the emission is the float graph itself, so outputs equal the float model's.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import NamedTuple

import mxnet as mx
import numpy as np

from .config import QuantConfig
from .errors import ConfigError
from .graph import Graph, TensorRef
from .quantizer import (FQ_TAG, FakeQuantSpec, add_input_fake_quant, add_weight_fake_quant, fake_quant_specs,
                        strip_fake_quant)

log = logging.getLogger(__name__)


def _threshold_name(spec: FakeQuantSpec) -> str:
    return spec.threshold or f"{spec.layer}_data_threshold"


def _make_params(graph: Graph, thresholds: set, ctx):
    """A ParameterDict holding the graph's parameters; thresholds and aux states get no gradient."""
    params = mx.gluon.ParameterDict("")
    aux = graph.aux_names()
    for name, value in graph.params.items():
        fixed = name in aux or name in thresholds
        param = params.get(name, shape=value.shape, dtype=value.dtype, grad_req="null" if fixed else "write")
        param.initialize(mx.init.Constant(0), ctx=ctx)
        param.set_data(mx.nd.array(value, dtype=value.dtype))
    return params


class EmissionKey(NamedTuple):
    """What selects an emission: the quantizers on, online or offline thresholds, the training
    (straight-through) form, the sign probe, the baked offline thresholds and the BN freeze."""

    weights: bool
    inputs: bool
    online: bool
    ste: bool
    sign_probe: bool
    baked: tuple | None
    bn_frozen: bool


class _Emission:
    """One mode's SymbolBlock, in a plain holder so Gluon does not treat the cache as an
    unregistered container of child blocks."""

    def __init__(self, block):
        self.block = block


def symbol_block(graph: Graph, params):
    """A SymbolBlock computing `graph` whose parameters come from the shared ParameterDict `params`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mx.gluon.SymbolBlock(graph.to_symbol(), [mx.sym.var(n) for n in graph.input_names], params=params)


class QuantizedNet(mx.gluon.SymbolBlock):
    """A SymbolBlock over a fake-quantized graph. Create with `QuantizedNet(graph)` (a graph
    that went through insert_fake_quant), `qgraph.quantize(...)` or `QuantizedNet.load(prefix)`."""

    def __init__(self, graph: Graph, ctx=None):
        specs = fake_quant_specs(graph)
        input_specs = [s for s in specs if s.kind == "input"]
        thresholds = {s.threshold: graph.params[s.threshold] for s in input_specs if s.threshold}
        float_graph = strip_fake_quant(graph.copy())
        for spec in input_specs:
            name = _threshold_name(spec)
            value = thresholds.get(name, np.zeros(1, np.float32))
            float_graph.add_variable(name, value.astype(np.float32), attrs={FQ_TAG: spec.id})
        ctx = ctx or mx.cpu()
        shared = _make_params(float_graph, {_threshold_name(s) for s in input_specs}, ctx)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(graph.to_symbol(), [mx.sym.var(n) for n in graph.input_names], params=shared)
        self.ctx = ctx
        self.float_graph = float_graph
        self.input_specs = input_specs
        self.weight_specs = [s for s in specs if s.kind == "weight"]
        self.weights_on = bool(self.weight_specs)
        self.inputs_on = bool(input_specs)
        self.online = any(s.online for s in input_specs)
        self.bn_frozen = False  # QAT: BatchNorm uses running statistics in training too
        self.report = None
        self._shared = shared
        self._seen_threshold = {_threshold_name(s): not s.online for s in input_specs}
        self._checked_signs = False
        self._emissions: dict = {}
        self._batch_stats: dict = {}

    def collect_params(self, select=None):
        """Every parameter of every mode: float weights, BN statistics, input thresholds."""
        return self._shared if select is None else super().collect_params(select)

    # ------------------------------------------------------------------ emissions
    def emit(self, weights: bool, inputs: bool, online: bool, ste: bool = True, sign_probe: bool = False,
             baked: tuple | None = None, bn_frozen: bool = False) -> Graph:
        """The float graph with the requested fake-quant subgraphs. Online emissions add each
        input's batch threshold as an extra output (for update_ema), and with `sign_probe`
        each unsigned input's batch minimum after those. Offline emissions given `baked`
        (one threshold per input spec) use those values as constants."""
        graph = self.float_graph.copy()
        for bn in graph.nodes("BatchNorm") if bn_frozen else ():
            graph.set_attr(bn, "use_global_stats", True)
        for spec in self.weight_specs if weights else ():
            add_weight_fake_quant(graph, spec, ste=ste)
        stats, minima = [], []
        for index, spec in enumerate(self.input_specs if inputs else ()):
            spec = dataclasses.replace(spec, online=online, threshold=_threshold_name(spec))
            if sign_probe and not spec.signed:
                minima.append(TensorRef(graph.add_node("min", f"{spec.id}_probe_min", [graph.inputs(spec.layer)[0]],
                                                       {FQ_TAG: spec.id})))
            value = None if online or baked is None else baked[index]
            _, stat = add_input_fake_quant(graph, spec, ste=ste, threshold_value=value)
            if online:
                stats.append(stat)
        graph.outputs = graph.outputs + stats + minima
        return graph.cleanup()

    def _emission(self, key: EmissionKey) -> _Emission:
        if key not in self._emissions:
            if key.baked is not None:  # thresholds changed since the last baked emission of this mode
                mode = key._replace(baked=None)
                for stale in [k for k in self._emissions if k._replace(baked=None) == mode]:
                    del self._emissions[stale]
            graph = self.emit(*key)
            self._emissions[key] = _Emission(symbol_block(graph, self._shared))
        return self._emissions[key]

    def _baked_thresholds(self) -> tuple:
        """Offline thresholds as constants: a forward reads them once (20-odd scalars), and a
        changed value (calibrate, set_thresholds, update_ema, a Trainer) selects a new emission."""
        values = mx.nd.concat(*[self._shared[_threshold_name(s)].data() for s in self.input_specs], dim=0)
        return tuple(float(v) for v in values.asnumpy())

    def forward(self, x, *args):
        from mxnet import autograd

        inputs_on = self.inputs_on and bool(self.input_specs)
        online = inputs_on and self.online
        probe = online and not self._checked_signs and any(not s.signed for s in self.input_specs)
        baked = self._baked_thresholds() if inputs_on and not online else None
        key = EmissionKey(self.weights_on and bool(self.weight_specs), inputs_on, online, autograd.is_recording(),
                          probe, baked, self.bn_frozen)
        outputs = self._emission(key).block(x, *args)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        n_model, n_stats = len(self.float_graph.outputs), len(self.input_specs)
        if online:
            self._batch_stats = {_threshold_name(s): stat
                                 for s, stat in zip(self.input_specs, outputs[n_model:n_model + n_stats])}
        if probe:
            self._warn_negative_unsigned(outputs[n_model + n_stats:])
        return outputs[0] if n_model == 1 else outputs[:n_model]

    def _warn_negative_unsigned(self, minima) -> None:
        unsigned = [s for s in self.input_specs if not s.signed]
        negative = [s.layer for s, m in zip(unsigned, minima) if float(m.asnumpy().min()) < 0]
        if negative:
            log.warning("unsigned input quantization clips negative values to 0 at %d layer(s): %s; "
                        "consider input_signed='auto' or True", len(negative), ", ".join(negative))
        self._checked_signs = True

    # ------------------------------------------------------------------ modes
    def enable_quantize(self) -> None:
        self.weights_on, self.inputs_on = True, True

    def disable_quantize(self) -> None:
        self.weights_on, self.inputs_on = False, False

    def freeze_bn(self, frozen: bool = True) -> None:
        """QAT: normalise with the running statistics in training too and stop updating them
        (Jacob et al.'s BN freeze); the weights then see the same fold as in inference."""
        self.bn_frozen = frozen

    def quantize_input(self, enable: bool = True, online: bool = True) -> None:
        """Switch input quantization on or off, with batch (online) or stored (offline) thresholds."""
        if enable and not online:
            unset = [name for name, seen in self._seen_threshold.items() if not seen]
            if unset:
                raise ConfigError(f"offline input quantization needs thresholds; {len(unset)} were never set "
                                  f"(e.g. '{unset[0]}'): calibrate, or run update_ema() during online passes first")
        self.inputs_on, self.online = enable, online

    def update_ema(self, momentum: float = 0.9) -> None:
        """Fold the last online batch's thresholds into the stored ones:
        T <- momentum * T + (1 - momentum) * batch T (the first update takes the batch T)."""
        if not self._batch_stats:
            raise ConfigError("update_ema() needs an online forward pass first (quantize_input(online=True))")
        for name, stat in self._batch_stats.items():
            param = self._shared[name]
            if self._seen_threshold[name]:
                param.set_data(param.data(stat.context) * momentum + stat.reshape((1,)) * (1 - momentum))
            else:
                param.set_data(stat.reshape((1,)).copy())
                self._seen_threshold[name] = True

    def reset_thresholds(self) -> None:
        """Forget stored thresholds: the next update_ema() starts from its batch."""
        for name in self._seen_threshold:
            self._seen_threshold[name] = False

    def calibrate(self, data, mode: str = "naive", calib_epoch: int = 3, num_batches=None, **options) -> dict:
        """Set every input threshold from calibration data and switch inputs to offline;
        see qgraph.calibrate.calibrate. Returns layer -> {threshold, method, bits, signed}."""
        from .calibrate import calibrate

        return calibrate(self, data, mode=mode, calib_epoch=calib_epoch, num_batches=num_batches, **options)

    def set_thresholds(self, thresholds: dict) -> None:
        """Store thresholds given by layer name (as `thresholds()` returns them)."""
        by_layer = {s.layer: _threshold_name(s) for s in self.input_specs}
        for layer, value in thresholds.items():
            if layer not in by_layer:
                raise ConfigError(f"'{layer}' has no quantized input; layers with one: {sorted(by_layer)[:5]}...")
            self._shared[by_layer[layer]].set_data(mx.nd.array([float(value)]))
            self._seen_threshold[by_layer[layer]] = True

    def thresholds(self) -> dict[str, float]:
        """Every input threshold, by the name of the layer whose input it quantizes."""
        return {s.layer: float(self._shared[_threshold_name(s)].data().asnumpy()[0]) for s in self.input_specs}

    # ------------------------------------------------------------------ graphs and files
    def current_graph(self, ste: bool = True) -> Graph:
        """The graph of the current mode with the current parameter values (no extra outputs)."""
        online = self.inputs_on and self.online
        graph = self.emit(self.weights_on, self.inputs_on, online, ste=ste)
        graph.outputs = graph.outputs[:len(self.float_graph.outputs)]
        graph.cleanup()
        graph.params = {n: self._shared[n].data().asnumpy() for n in graph.params}
        return graph

    def export(self, prefix, fix_params: bool = False) -> tuple:
        """Save the current mode as PREFIX-symbol.json + PREFIX-0000.params (stock MXNet ops;
        `SymbolBlock.imports` loads it, `QuantizedNet.load` brings it back as a QuantizedNet).
        With `fix_params`, save `fixed_graph()` instead: the deployable form."""
        from .io import save

        return save(self.fixed_graph() if fix_params else self.current_graph(), prefix)

    def fixed_graph(self) -> Graph:
        """The deployable graph: every quantized convolution's BatchNorm folded into its weight
        and bias, every quantized weight replaced by its quantized value (integers times scale,
        computed by the same MXNet operators as the simulation), input quantizers kept in
        evaluation form. A fake-BN net keeps the quantized weights it was evaluated with; a
        plain one has its BN folded into the float weights before they are quantized, as a
        deployment tool would do, which is how it is actually deployed."""
        from .quantizer import FAKE_BN_TAG, weight_param

        graph = self.float_graph.copy()
        graph.params = {n: self._shared[n].data().asnumpy() for n in graph.params}
        for spec in self.weight_specs:
            if spec.winograd:
                raise ConfigError(f"{spec.layer}: fixing Winograd-domain weights is not supported")
            weight = mx.nd.array(graph.params[weight_param(graph, spec.layer)])
            bn = graph.attrs(graph.inputs(spec.layer)[1].node).get(FAKE_BN_TAG) or _batchnorm_after(graph, spec.layer)
            if bn:
                scale = _fake_bn_scale(graph, bn)
                weight = mx.nd.broadcast_mul(weight, scale.reshape((-1,) + (1,) * (weight.ndim - 1)))
                _fold_bias(graph, spec.layer, bn, scale)
            fixed = graph.add_variable(f"{spec.layer}_weight_fixed", _quantize_weight(weight, spec).asnumpy())
            graph.set_input(spec.layer, 1, fixed)
        if self.inputs_on:
            for spec in self.input_specs:
                spec = dataclasses.replace(spec, online=self.online, threshold=_threshold_name(spec))
                add_input_fake_quant(graph, spec, ste=False)
        return graph.cleanup()

    @classmethod
    def load(cls, prefix, ctx=None, input_names=("data",)) -> "QuantizedNet":
        from .io import load

        return cls(load(prefix, input_names=input_names), ctx=ctx)


def _fake_bn_scale(graph: Graph, bn: str) -> mx.nd.NDArray:
    """gamma / sqrt(running_var + eps) by the operators passes/fake_bn.py uses."""
    from .attrs import get_bool, get_float

    gamma, _, _, running_var = (mx.nd.array(graph.params[r.node]) for r in graph.inputs(bn)[1:5])
    scale = mx.nd.rsqrt(running_var + get_float(graph.attrs(bn), "eps", 1e-3, bn))
    return scale if get_bool(graph.attrs(bn), "fix_gamma", True, bn) else gamma * scale


def _batchnorm_after(graph: Graph, layer: str) -> str | None:
    """The BatchNorm that alone reads a convolution's output, when fold_bn's rule lets it fold."""
    from .analysis import bn_fold_blocker

    users = graph.consumers(layer)
    if graph.op(layer) != "Convolution" or len(users) != 1:
        return None
    bn, slot = users[0]
    if graph.op(bn) != "BatchNorm" or slot != 0 or bn_fold_blocker(graph, layer, bn):
        return None
    return bn


def _fold_bias(graph: Graph, layer: str, bn: str, scale) -> None:
    """layer -> bn  becomes  layer with bias beta + (b - running_mean) * scale."""
    from .attrs import get_bool

    _, beta, running_mean, _ = (mx.nd.array(graph.params[r.node]) for r in graph.inputs(bn)[1:5])
    has_bias = not get_bool(graph.attrs(layer), "no_bias", False, layer)
    bias = mx.nd.array(graph.params[graph.inputs(layer)[2].node]) if has_bias else mx.nd.zeros_like(beta)
    folded = graph.add_variable(f"{layer}_bias_fixed", (beta + (bias - running_mean) * scale).asnumpy())
    if has_bias:
        graph.set_input(layer, 2, folded)
    else:
        graph.add_input(layer, folded)
        graph.set_attr(layer, "no_bias", False)
    graph.replace_all_uses(TensorRef(bn, 0), TensorRef(layer, 0))


def _quantize_weight(weight: mx.nd.NDArray, spec: FakeQuantSpec) -> mx.nd.NDArray:
    """The weight quantizer's evaluation form (qgraph/quantizer.py), imperatively."""
    from .quantizer import MIN_SCALE

    grouped = weight.reshape(spec.reshape)
    scale = mx.nd.maximum(mx.nd.max(mx.nd.abs(grouped), axis=spec.axes, keepdims=True) / spec.levels, MIN_SCALE)
    integers = mx.nd.clip(mx.nd.round(mx.nd.broadcast_div(grouped, scale)), -spec.levels, spec.levels)
    return mx.nd.broadcast_mul(integers, scale).reshape(spec.shape)


def quantize(source, config: QuantConfig | None = None, input_shape=None, ctx=None, instruments=()):
    """Load `source` (block, graph or files), run the passes `config` asks for and return a QuantizedNet."""
    import passes

    from .io import load
    from .pass_manager import PassManager

    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, not {type(config).__name__}")
    graph = load(source, input_shape=input_shape)
    rewritten, report = PassManager(passes.default_pipeline(config), instruments).run(graph, config)
    net = QuantizedNet(rewritten, ctx=ctx)
    net.report = report
    return net
