"""The library entry points that run pass pipelines: quantize a model into a QuantizedNet, and
make a QuantizedNet's deployable graph. They sit above both the passes and qgraph's runtime."""
from __future__ import annotations

from qgraph.config import QuantConfig
from qgraph.emit import Mode, emit
from qgraph.errors import ConfigError
from qgraph.graph import Graph
from qgraph.io import load
from qgraph.pass_manager import PassManager
from qgraph.runtime import QuantizedNet, add_rounding_params, add_threshold_params

from .fix_weights import FixWeights
from .fold_bn import FoldBN
from .registry import default_pipeline


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
    add_rounding_params(folded, net.weight_specs, current.params)  # AdaRound's decisions, used as they are
    mode = Mode(weights=True, inputs=net.mode.inputs, online=net.mode.inputs and net.mode.online)
    emission = emit(folded, net.weight_specs, net.input_specs, mode, fused=False)
    graph = emission.graph.set_outputs(emission.graph.outputs[:emission.model_outputs]).cleanup()
    fixed, _ = PassManager([FixWeights()]).run(graph)
    return fixed
