"""insert_observers: layer(x, ...)  =>  the same graph with calibration taps on x as extra outputs.

The taps themselves (in-graph reductions and histograms, one set per tensor) are built by
qgraph.taps, which calibration uses directly; this pass puts them in a pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qgraph.graph import Graph
from qgraph.pass_manager import PassContext
from qgraph.taps import REDUCTIONS, add_taps


@dataclass
class InsertObservers:
    """Taps the data input of `layers` (default: every quantizable layer not excluded)."""

    layers: tuple | None = None
    reductions: tuple = REDUCTIONS
    histograms: dict = field(default_factory=dict)   # tensor key -> qgraph.taps.HistogramTap
    name: str = "insert_observers"
    requires: tuple = ()

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        for key in add_taps(graph, self.layers, self.reductions, self.histograms):
            ctx.report.changed(self.name, key.rsplit(":", 1)[0], f"tapped {key}")
        return graph
