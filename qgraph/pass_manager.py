"""Pass protocol, the report passes write to, PassManager, and instruments around each pass.

A pass is an object with `name`, `requires` (names of passes that must run
earlier in the same pipeline) and `run(graph, ctx) -> graph`. Passes never print
or time themselves: they append to `ctx.report`, and instruments (timing,
checking, dumps) hook `run_before` / `run_after` / `should_run`. By default the
PassManager lints the graph (Graph.lint: structure, pure Python) before the first
pass and after each; `verify=True` adds MXNet's operator and shape checks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence

from . import viz
from .errors import ConfigError, PassError, QGraphError
from .graph import Graph

log = logging.getLogger(__name__)


class Pass(Protocol):
    name: str
    requires: tuple

    def run(self, graph: Graph, ctx: "PassContext") -> Graph: ...


class ReportEntry(NamedTuple):
    pass_name: str
    node: str
    action: str  # "changed" or "skipped"
    reason: str


class Report:
    """What each pass changed and what it skipped, and why."""

    def __init__(self):
        self.entries: list[ReportEntry] = []
        self.timings: dict[str, float] = {}

    def changed(self, pass_name: str, node: str, reason: str) -> None:
        self.entries.append(ReportEntry(pass_name, node, "changed", reason))

    def skipped(self, pass_name: str, node: str, reason: str) -> None:
        self.entries.append(ReportEntry(pass_name, node, "skipped", reason))

    def for_pass(self, pass_name: str) -> list[ReportEntry]:
        return [e for e in self.entries if e.pass_name == pass_name]

    def modified(self, pass_name: str) -> bool:
        return any(e.action == "changed" for e in self.for_pass(pass_name))

    def format(self) -> str:
        lines = []
        for pass_name in dict.fromkeys(e.pass_name for e in self.entries) | dict.fromkeys(self.timings):
            entries = self.for_pass(pass_name)
            n_changed = sum(e.action == "changed" for e in entries)
            timing = f" in {self.timings[pass_name] * 1e3:.1f} ms" if pass_name in self.timings else ""
            lines.append(f"{pass_name}: {n_changed} changed, {len(entries) - n_changed} skipped{timing}")
            lines.extend(f"  {e.action:8s} {e.node}: {e.reason}" for e in entries)
        return "\n".join(lines) if lines else "no pass ran"


@dataclass
class PassContext:
    """What a pass may read (the config) and where it writes (the report)."""

    config: Any = None
    report: Report = field(default_factory=Report)


class Instrument:
    """Hooks around a pipeline run and every pass in it; subclasses override what they need."""

    def run_begin(self, graph: Graph, ctx: PassContext) -> None:
        pass

    def should_run(self, pass_: Pass, graph: Graph, ctx: PassContext) -> bool:
        return True

    def run_before(self, pass_: Pass, graph: Graph, ctx: PassContext) -> None:
        pass

    def run_after(self, pass_: Pass, graph: Graph, ctx: PassContext) -> None:
        pass


class TimingInstrument(Instrument):
    """Records wall time of each pass in `ctx.report.timings`."""

    def run_before(self, pass_, graph, ctx):
        self._start = time.perf_counter()

    def run_after(self, pass_, graph, ctx):
        ctx.report.timings[pass_.name] = time.perf_counter() - self._start


class LintInstrument(Instrument):
    """Runs Graph.lint() (structure only, no MXNet) after each pass."""

    def run_after(self, pass_, graph, ctx):
        graph.lint()


class VerifyInstrument(Instrument):
    """Runs Graph.verify() (lint plus MXNet's operator and shape checks) after each pass."""

    def run_after(self, pass_, graph, ctx):
        graph.verify()


def node_signatures(graph: Graph) -> dict[str, tuple]:
    """A comparable fingerprint of each node: op, attrs, inputs and (for params) value identity."""
    return {n: (graph.op(n), tuple(sorted(graph.attrs(n).items())), tuple(graph.inputs(n)),
                id(graph.params.get(n))) for n in graph.nx}


def diff_nodes(before: dict, graph: Graph) -> tuple[set, set]:
    """(inserted, changed) node names of `graph` relative to signatures `before`.
    A parameter whose value changed marks the operators reading it as changed."""
    after = node_signatures(graph)
    inserted = {n for n in after if n not in before}
    changed = {n for n in after if n in before and after[n] != before[n]}
    for name in list(changed | inserted):
        if graph.op(name) == "null":
            changed |= {c for c, _ in graph.consumers(name)} - inserted
    return inserted, changed


class DumpInstrument(Instrument):
    """After each pass writes `NN_<pass>.dot` (and .svg/.png when graphviz's `dot` exists)
    into `folder`, highlighting the nodes the pass inserted or changed. `detail` 'collapsed'
    draws each fake-quant subgraph as one node labelled with its spec, 'full' every node;
    `dump(graph, label)` adds a drawing of a later state (a calibrated graph, say)."""

    def __init__(self, folder, formats: Sequence[str] = ("svg",), detail: str = "collapsed"):
        if detail not in viz.DETAILS:
            raise ConfigError(f"dump detail {detail!r}: must be one of {', '.join(viz.DETAILS)}")
        self.folder = Path(folder)
        self.formats = tuple(formats)
        self.detail = detail
        self.count = 0

    def run_begin(self, graph, ctx):
        self.count = 0  # each run numbers its dumps from 00_input again
        self._dump(graph, "input", set(), set())

    def run_before(self, pass_, graph, ctx):
        self._before = node_signatures(graph)

    def run_after(self, pass_, graph, ctx):
        inserted, changed = diff_nodes(self._before, graph)
        self._dump(graph, pass_.name, inserted, changed)

    def dump(self, graph: Graph, label: str) -> None:
        """Draw `graph` as the next numbered dump, `NN_<label>`, titled `label`."""
        self._dump(graph, label, set(), set(), label)

    def _dump(self, graph, label, inserted, changed, title=None):
        stem = self.folder / f"{self.count:02d}_{label}"
        title = title or (f"after {label}" if self.count else "input graph")
        viz.write(graph, stem, inserted=inserted, changed=changed, formats=self.formats, title=title,
                  detail=self.detail)
        self.count += 1


class PassManager:
    """Runs passes in order on a copy of the graph. The graph is checked before the first pass
    and after each: with Graph.lint() by default, with Graph.verify() when `verify`, not at
    all when both are off. Failures become PassError naming the pass and the passes that ran
    before it."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (), verify: bool = False,
                 lint: bool = True):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.check = "verify" if verify else ("lint" if lint else None)
        checker = {"verify": VerifyInstrument, "lint": LintInstrument}.get(self.check)
        if checker is not None and not any(isinstance(i, checker) for i in self.instruments):
            self.instruments.append(checker())
        self._check_requires()

    def _check_requires(self):
        seen = []
        for pass_ in self.passes:
            missing = [r for r in getattr(pass_, "requires", ()) if r not in seen]
            if missing:
                raise PassError(f"pass '{pass_.name}' requires {missing} to run before it "
                                f"(pipeline: {[p.name for p in self.passes]})")
            seen.append(pass_.name)

    def run(self, graph: Graph, config=None, ctx: PassContext | None = None) -> tuple[Graph, Report]:
        ctx = ctx or PassContext(config=config)
        graph = graph.copy()
        if self.check is not None:
            try:
                graph.verify() if self.check == "verify" else graph.lint()
            except QGraphError as err:
                raise PassError(f"input graph fails {self.check} before any pass: {err}") from None
        for instrument in self.instruments:
            instrument.run_begin(graph, ctx)
        ran: list[str] = []
        for pass_ in self.passes:
            if not all(i.should_run(pass_, graph, ctx) for i in self.instruments):
                ctx.report.skipped(pass_.name, "*", "an instrument asked to skip this pass")
                continue
            try:
                for instrument in self.instruments:
                    instrument.run_before(pass_, graph, ctx)
                graph = pass_.run(graph, ctx)
                for instrument in self.instruments:
                    instrument.run_after(pass_, graph, ctx)
            except Exception as err:
                after = f" (after {', '.join(ran)})" if ran else " (first pass)"
                raise PassError(f"pass '{pass_.name}' failed{after}: {err}") from err
            log.debug("pass %s done", pass_.name)
            ran.append(pass_.name)
        return graph, ctx.report
