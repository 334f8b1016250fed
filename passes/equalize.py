"""equalize: L1 -> act -> L2 (-> act -> L3 ...)  =>  the same chain with each channel's weight range
balanced between the layers (cross-layer equalization) and, through ReLUs, high biases absorbed
into the next layer: Data-Free Quantization (Nagel et al. 2019), after AIMET's DlEqualization.

Finds chains of Convolution (2-D, dense or depthwise) and FullyConnected layers in which each
layer's output is read by one node only, either the next layer or a positively homogeneous
activation (ReLU, PReLU, LeakyReLU) read by the next layer only; splits each chain as AIMET does
into conv -> depthwise -> conv triplets and pairs; scales every set (qgraph.equalization), and
repeats over all sets until no scale moves by more than 1e-5 (at most 1,000 rounds). Then, through
ReLUs, it absorbs c = max(0, beta - 3 |gamma|) of each channel into the next layer, from the
BatchNorm statistics fold_bn recorded (with config.equalize); a next layer with zero padding
does not take it, since its padded border would not carry the shift. Skipped, with the reason
in the report: a layer whose output has other readers (a residual add, a concat, a branch or a
graph output), goes through ReLU6/clip or another activation that is not scale-equivariant, or
feeds a layer that is grouped but not depthwise, a Deconvolution, or a FullyConnected reading a
flattened convolution output. BatchNorm must be folded first: a layer still followed by
BatchNorm is an error. Equalization leaves the float outputs unchanged up to float rounding;
absorption changes them only where a pre-activation falls below its c. Running it twice changes
(almost) nothing.
"""
from __future__ import annotations

import numpy as np

from qgraph import attrs as A
from qgraph import equalization as eq
from qgraph.errors import ConfigError
from qgraph.folding import format_statistics, recorded_statistics
from qgraph.graph import Graph, TensorRef
from qgraph.pass_manager import PassContext
from qgraph.tags import BN_STATS_TAG

MAX_ROUNDS = 1000
TOLERANCE = 1e-5   # largest |log s| of a round below which the scales have settled
_LAYERS = ("Convolution", "FullyConnected")
_ACTIVATIONS = ("relu", "Activation", "LeakyReLU", "clip", "sigmoid", "tanh", "softsign")
_ADDS = ("elemwise_add", "_Plus", "_plus", "broadcast_add", "add_n", "ElementWiseSum")


class Equalize:
    name = "equalize"
    requires = ()

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        _check_folded(graph)
        edges, reasons = _find_edges(graph)
        for layer, reason in reasons.items():
            ctx.report.skipped(self.name, layer, reason)
        sets = _find_sets(graph, edges)
        if not sets:
            return graph
        layers = _Layers(graph)
        rounds = _rewrite_scales(layers, sets)
        for chain in sets:
            ctx.report.changed(self.name, chain[0], f"equalized {' -> '.join(chain)} "
                                                    f"({'triplet' if len(chain) == 3 else 'pair'}; {rounds} rounds)")
        for first, second in [(a, b) for chain in sets for a, b in zip(chain, chain[1:])]:
            verdict = _check_absorption(graph, layers, first, second, edges[first])
            if verdict:
                ctx.report.skipped(self.name, first, f"no bias absorption into {second}: {verdict}")
                continue
            amount = _rewrite_absorption(layers, first, second)
            ctx.report.changed(self.name, first, f"absorbed bias into {second} (largest {amount.max():.3g}, "
                                                 f"{int((amount > 0).sum())} channels)")
        layers.store()
        return graph


# ---------------------------------------------------------------------- find
def _check_folded(graph: Graph) -> None:
    for bn in graph.nodes("BatchNorm"):
        producer = graph.inputs(bn)[0].node
        if graph.op(producer) in _LAYERS + ("Deconvolution",):
            raise ConfigError(f"equalize needs BatchNorm merged into the layers: '{bn}' still follows "
                              f"'{producer}' (run fold_bn first; QuantConfig.merge_bn=True, --merge-bn)")


def _find_edges(graph: Graph) -> tuple[dict, dict]:
    """({layer: (next layer, activation or None)}, {layer: why its output cannot be equalized})."""
    edges, reasons = {}, {}
    for layer in graph.nodes(_LAYERS):
        reason = _layer_blocker(graph, layer)
        found = None if reason else _next_layer(graph, layer)
        if found is not None and isinstance(found, str):
            reason, found = found, None
        if found is not None:
            reason = _layer_blocker(graph, found[0]) or _pair_blocker(graph, layer, found[0])
        if reason:
            reasons[layer] = reason
        else:
            edges[layer] = found
    return edges, reasons


def _layer_blocker(graph: Graph, layer: str) -> str | None:
    attrs = graph.attrs(layer)
    weight = graph.inputs(layer)[1].node
    if not graph.is_param(weight):
        return f"weight of {layer} ('{weight}') is computed, not a stored parameter"
    if len({c for c, _ in graph.consumers(weight)}) > 1:
        return f"weight '{weight}' is shared by several layers"
    if graph.op(layer) == "Convolution":
        if len(A.get_tuple(attrs, "kernel", (), layer)) != 2 or attrs.get("layout", "None") not in ("None", "NCHW"):
            return f"{layer} is not a 2-D NCHW convolution"
        groups = A.get_int(attrs, "num_group", 1, layer)
        if groups > 1 and not eq.is_depthwise(graph.param_shape(weight), groups):
            return f"{layer} is grouped ({groups} groups) but not depthwise"
    return None


def _homogeneous(graph: Graph, node: str) -> str | None:
    """None for ReLU, PReLU and LeakyReLU (act(x / s) = act(x) / s for s > 0), else why not."""
    op, attrs = graph.op(node), graph.attrs(node)
    if op == "relu" or (op == "Activation" and attrs.get("act_type") == "relu"):
        return None
    if op == "LeakyReLU" and attrs.get("act_type", "leaky") in ("leaky", "prelu"):
        return None
    kind = "ReLU6/clip" if op == "clip" else f"{op}{' ' + attrs['act_type'] if 'act_type' in attrs else ''}"
    return f"{node} ({kind}) is not scale-equivariant"


def _next_layer(graph: Graph, layer: str):
    """(next layer, activation or None), or why there is none."""
    tensor = TensorRef(layer)
    activation = None
    for _ in range(2):
        users = graph.consumers(tensor)
        if graph.is_graph_output(tensor) or len(users) != 1:
            readers = sorted({u for u, _ in users}) + (["a graph output"] if graph.is_graph_output(tensor) else [])
            kinds = {graph.op(u) for u, _ in users}
            what = "a residual add" if kinds & set(_ADDS) else ("a concat" if kinds & {"Concat", "concat"} else "")
            return f"output of {tensor.node} is read by {readers}{' (' + what + ')' if what else ''}"
        user, slot = users[0]
        op = graph.op(user)
        if op in _LAYERS and slot == 0:
            return user, activation
        if activation is not None:
            return f"{activation} feeds {user} ({op}), not a Convolution or FullyConnected"
        if op in _ADDS:
            return f"output of {layer} goes to a residual add ({user})"
        if op in ("Concat", "concat"):
            return f"output of {layer} goes to a concat ({user})"
        if op not in _ACTIVATIONS:
            return f"output of {layer} goes to {user} ({op})"
        reason = _homogeneous(graph, user)
        if reason:
            return reason
        activation, tensor = user, TensorRef(user)
    return None


def _pair_blocker(graph: Graph, first: str, second: str) -> str | None:
    if graph.op(second) == "FullyConnected" and graph.op(first) == "Convolution":
        return f"{second} (FullyConnected) reads the flattened output of convolution {first}"
    if graph.op(second) == "Convolution" and graph.op(first) == "FullyConnected":
        return f"{second} (Convolution) reads the output of FullyConnected {first}"
    first_out = graph.params[graph.inputs(first)[1].node].shape[0]
    second_in = graph.params[graph.inputs(second)[1].node].shape
    channels = second_in[0] if _groups(graph, second) > 1 else second_in[1]
    if first_out != channels:
        return f"{first} has {first_out} output channels but {second} reads {channels}"
    return None


def _groups(graph: Graph, layer: str) -> int:
    return A.get_int(graph.attrs(layer), "num_group", 1, layer) if graph.op(layer) == "Convolution" else 1


def _find_sets(graph: Graph, edges: dict) -> list[tuple]:
    """AIMET's split of each chain into pairs and conv -> depthwise -> conv triplets."""
    followers = {nxt for nxt, _ in edges.values()}
    sets = []
    for head in [n for n in graph.nodes(_LAYERS) if n in edges and n not in followers]:
        chain = [head]
        while chain[-1] in edges:
            chain.append(edges[chain[-1]][0])
        previous, rest = chain[0], chain[1:]
        while rest:
            current = rest.pop(0)
            if _groups(graph, current) > 1 and rest:
                following = rest.pop(0)
                sets.append((previous, current, following))
                previous = following
            else:
                sets.append((previous, current))
                previous = current
    return sets


# ---------------------------------------------------------------------- rewrite
class _Layers:
    """The weights, biases and recorded statistics of the layers being equalized, in float64,
    written back to the graph (in each parameter's dtype) by store()."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.weight, self.bias, self.stats = {}, {}, {}

    def load(self, layer: str) -> None:
        if layer in self.weight:
            return
        inputs = self.graph.inputs(layer)
        self.weight[layer] = self.graph.params[inputs[1].node].astype(np.float64)
        self.bias[layer] = self.graph.params[inputs[2].node].astype(np.float64) if len(inputs) > 2 else None
        self.stats[layer] = recorded_statistics(self.graph, layer)

    def groups(self, layer: str) -> int:
        return _groups(self.graph, layer)

    def divide_outputs(self, layer: str, scale: np.ndarray) -> None:
        self.weight[layer], self.bias[layer] = eq.scale_outputs(self.weight[layer], self.bias[layer], scale)
        if self.stats[layer] is not None:
            self.stats[layer] = tuple(v / scale for v in self.stats[layer])

    def multiply_inputs(self, layer: str, scale: np.ndarray) -> None:
        self.weight[layer] = eq.scale_inputs(self.weight[layer], self.groups(layer), scale)

    def add_bias(self, layer: str, value: np.ndarray) -> None:
        self.bias[layer] = value if self.bias[layer] is None else self.bias[layer] + value

    def store(self) -> None:
        graph = self.graph
        for layer, weight in self.weight.items():
            inputs = graph.inputs(layer)
            dtype = graph.params[inputs[1].node].dtype
            graph.set_param(inputs[1].node, weight.astype(dtype))
            if self.bias[layer] is not None:
                if len(inputs) > 2:
                    graph.set_param(inputs[2].node, self.bias[layer].astype(dtype))
                else:
                    stem = inputs[1].node[:-len("_weight")] if inputs[1].node.endswith("_weight") else layer
                    graph.add_input(layer, graph.add_variable(f"{stem}_bias", self.bias[layer].astype(dtype)))
                    graph.set_attr(layer, "no_bias", "False")
            if self.stats[layer] is not None:
                graph.set_attr(layer, BN_STATS_TAG, format_statistics(*self.stats[layer]))


def _rewrite_scales(layers: _Layers, sets: list[tuple]) -> int:
    """Scale every set until the scales settle; returns the number of rounds."""
    for chain in sets:
        for layer in chain:
            layers.load(layer)
    for rounds in range(1, MAX_ROUNDS + 1):
        largest = 0.0
        for chain in sets:
            first, last = chain[0], chain[-1]
            r_first = eq.output_ranges(layers.weight[first])
            r_last = eq.input_ranges(layers.weight[last], layers.groups(last))
            if len(chain) == 2:
                scale = eq.pair_scales(r_first, r_last)
                layers.divide_outputs(first, scale)
                layers.multiply_inputs(last, scale)
                moved = scale
            else:
                middle = chain[1]
                s01, s12 = eq.triplet_scales(r_first, eq.output_ranges(layers.weight[middle]), r_last)
                layers.divide_outputs(first, s01)
                layers.multiply_inputs(middle, s01)
                layers.divide_outputs(middle, s12)
                layers.multiply_inputs(last, s12)
                moved = np.concatenate([s01, s12])
            largest = max(largest, float(np.abs(np.log(moved)).max()))
        if largest < TOLERANCE:
            break
    return rounds


def _check_absorption(graph: Graph, layers: _Layers, first: str, second: str, edge) -> str | None:
    _, activation = edge
    if activation is None or _homogeneous(graph, activation) or not (
            graph.op(activation) == "relu" or graph.attrs(activation).get("act_type") == "relu"):
        return "only a ReLU between the layers lets a shift through"
    if layers.stats[first] is None:
        return f"{first} has no BatchNorm statistics (fold_bn records them with QuantConfig.equalize)"
    if any(A.get_tuple(graph.attrs(second), "pad", (0, 0), second) or ()):
        return f"{second} pads with zeros, which would not carry the shift"
    return None


def _rewrite_absorption(layers: _Layers, first: str, second: str) -> np.ndarray:
    mean, std = layers.stats[first]
    amount = eq.absorbable(mean, std)
    layers.add_bias(first, -amount)
    layers.stats[first] = (mean - amount, std)
    layers.add_bias(second, eq.input_shift(layers.weight[second], layers.groups(second), amount))
    return amount
