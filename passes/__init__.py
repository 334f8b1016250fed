"""The graph passes and the pipelines that compose them.

`PASSES` maps each pass's name to its class, built once at import and only read. The
pipelines are the library's entry points that need passes, which is why they live here
and not in qgraph (the core never imports passes):

- `default_pipeline(config)`: the passes a QuantConfig asks for;
- `quantize(source, config)`: load a model, run that pipeline, return a QuantizedNet;
- `fixed_graph(net)`: a QuantizedNet's deployable graph (fold_bn, then fix_weights).
"""
from __future__ import annotations

from qgraph.config import QuantConfig
from qgraph.emit import Mode, emit
from qgraph.errors import ConfigError
from qgraph.graph import Graph
from qgraph.io import load
from qgraph.pass_manager import PassManager
from qgraph.runtime import QuantizedNet, add_threshold_params

from .exclude import Exclude
from .fake_bn import FakeBN
from .fix_weights import FixWeights
from .fold_bn import FoldBN
from .insert_fake_quant import InsertFakeQuant
from .insert_observers import InsertObservers
from .lower_winograd_kernel import LowerWinogradKernel
from .quantize_winograd_weights import QuantizeWinogradWeights

PASSES = {cls.name: cls for cls in (FoldBN, Exclude, FakeBN, InsertFakeQuant, InsertObservers,
                                    QuantizeWinogradWeights, LowerWinogradKernel, FixWeights)}


def get_pass(name: str):
    """A new instance of the pass registered as `name`."""
    try:
        return PASSES[name]()
    except KeyError:
        raise ConfigError(f"unknown pass '{name}'; known passes: {', '.join(sorted(PASSES))}") from None


def build_pipeline(names) -> list:
    """Pass instances for a list of names (or a comma-separated string)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return [get_pass(n) for n in names]


def default_pipeline(config: QuantConfig) -> list:
    """The passes a QuantConfig asks for: fold_bn when merge_bn, then exclude, fake_bn when asked
    for, insert_fake_quant, then the Winograd rewrite of `winograd_mode` when a tile is set."""
    names = (["fold_bn"] if config.merge_bn else []) + ["exclude"] + (["fake_bn"] if config.fake_bn else [])
    names += ["insert_fake_quant"]
    if config.winograd != "none":
        names += ["quantize_winograd_weights" if config.winograd_mode == "weight" else "lower_winograd_kernel"]
    return build_pipeline(names)


def quantize(source, config: QuantConfig | None = None, input_shape=None, ctx=None, instruments=()) -> QuantizedNet:
    """Load `source` (block, graph or files), run the passes `config` asks for and return a QuantizedNet."""
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, not {type(config).__name__}")
    graph = load(source, input_shape=input_shape)
    rewritten, report = PassManager(default_pipeline(config), instruments).run(graph, config)
    net = QuantizedNet(rewritten, ctx=ctx)
    net.report = report
    return net


def fixed_graph(net: QuantizedNet) -> Graph:
    """The deployable graph of `net` with its current parameter values: BatchNorm folded into the
    layers (fold_bn; a fake-BN layer keeps the Q(W * s) it was trained with), every quantized
    weight replaced by its quantized value (fix_weights: integers times scale, computed by the
    simulation's own operators), and the input quantizers, when on, in evaluation form. A
    plain QAT net has its BatchNorm folded into the float weights before they are quantized,
    which is how a deployment tool treats it."""
    current = net.current_float_graph()
    folded, _ = PassManager([FoldBN()]).run(current)  # drops the threshold parameters nothing reads yet
    add_threshold_params(folded, net.input_specs, current.params)
    mode = Mode(weights=True, inputs=net.mode.inputs, online=net.mode.inputs and net.mode.online)
    emission = emit(folded, net.weight_specs, net.input_specs, mode)
    graph = emission.graph.set_outputs(emission.graph.outputs[:emission.model_outputs]).cleanup()
    fixed, _ = PassManager([FixWeights()]).run(graph)
    return fixed
