"""exclude: mark layers that must stay in float  =>  EXCLUDE_TAG = reason on each.

Marks the first Convolution (config.exclude_first_conv, as the seed), the last
FullyConnected (config.exclude_last_fc), every node of an op type in
config.exclude_ops, every node named by config.exclude (an exact name, else a
regular expression matched against the whole name), and every layer config.layer_overrides
sets to "float". A name or pattern that matches nothing is an error: a typo must not
silently quantize a layer the user meant to keep. Running it twice changes nothing.
"""
from __future__ import annotations

import re

from qgraph.config import QuantConfig
from qgraph.errors import ConfigError
from qgraph.graph import Graph
from qgraph.pass_manager import PassContext
from qgraph.quantizer import QUANTIZABLE_OPS
from qgraph.tags import EXCLUDE_TAG


class Exclude:
    name = "exclude"
    requires = ()

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        config = ctx.config or QuantConfig()
        for node, reason in _find_exclusions(graph, config).items():
            if graph.attrs(node).get(EXCLUDE_TAG) == reason:
                continue
            graph.set_attr(node, EXCLUDE_TAG, reason)
            ctx.report.changed(self.name, node, f"kept in float: {reason}")
        return graph


def _find_exclusions(graph: Graph, config: QuantConfig) -> dict[str, str]:
    order = graph.nodes()
    reasons: dict[str, str] = {}
    convolutions = [n for n in order if graph.op(n) == "Convolution"]
    if config.exclude_first_conv and convolutions:
        reasons[convolutions[0]] = "first convolution"
    dense = [n for n in order if graph.op(n) == "FullyConnected"]
    if config.exclude_last_fc and dense:
        reasons[dense[-1]] = "last FullyConnected"
    for node in order:
        if graph.op(node) in config.exclude_ops:
            reasons.setdefault(node, f"op type {graph.op(node)}")
    for pattern in config.exclude:
        matches = [pattern] if pattern in graph else [n for n in order if re.fullmatch(pattern, n)]
        if not matches:
            raise ConfigError(f"exclude {pattern!r} matches no node of the graph")
        for node in matches:
            reasons.setdefault(node, f"matches {pattern!r}")
    for node, entry in config.overrides_for(graph.nodes(QUANTIZABLE_OPS)).items():
        if entry.float:
            reasons.setdefault(node, "layer_overrides: float")
    return reasons
