"""PassManager: order, requires, failures named, instruments (verify, timing, dumps), Report."""
from __future__ import annotations

import re
import shutil
import time

import numpy as np
import pytest
from helpers import run_symbol

import qgraph

from passes.fold_bn import FoldBN
from qgraph import (DumpInstrument, GraphError, Instrument, PassContext, PassError, PassManager,
                    Report, TimingInstrument, VerifyInstrument)
from qgraph.viz import CHANGED_COLOR, INSERTED_COLOR


class Record:
    """Appends its name to a shared log and reports one change (or one skip)."""

    def __init__(self, name, log, requires=(), skip=False, sleep=0.0):
        self.name, self.log, self.requires, self.skip, self.sleep = name, log, tuple(requires), skip, sleep

    def run(self, graph, ctx):
        self.log.append(self.name)
        time.sleep(self.sleep)
        if self.skip:
            ctx.report.skipped(self.name, "relu0", "nothing to do")
        else:
            ctx.report.changed(self.name, "relu0", f"seen by {self.name}")
        return graph


class Fail:
    name = "explode"
    requires = ()

    def __init__(self, error=RuntimeError("kaboom")):
        self.error = error

    def run(self, graph, ctx):
        raise self.error


class ScaleReluOutput:
    """relu0 -> fc0   =>   relu0 -> _mul_scalar(2) -> fc0 (inserts one node)."""

    name = "scale_relu"
    requires = ()

    def run(self, graph, ctx):
        new = graph.insert_on_edge("fc0", 0, "_mul_scalar", "relu0_x2", {"scalar": 2.0})
        ctx.report.changed(self.name, new, "inserted")
        return graph


class DropParam:
    """Breaks the graph behind the verbs' back: the value of a parameter disappears."""

    name = "drop_param"
    requires = ()

    def run(self, graph, ctx):
        del graph._params["conv0_weight"]
        return graph


class MutateInPlace:
    """Edits attrs, edges, outputs and params of the graph it is given."""

    name = "mutate"
    requires = ()

    def run(self, graph, ctx):
        graph.set_attr("relu0", "act_type", "sigmoid")
        graph.set_param("fc0_bias", graph.params["fc0_bias"] + 1.0)
        graph.add_output(graph.outputs[0])
        return graph


class ReturnsNewGraph:
    name = "new_graph"
    requires = ()

    def run(self, graph, ctx):
        other = graph.copy()
        other.set_attr("relu0", "act_type", "tanh")
        return other


# ---------------------------------------------------------------------------------- order, requires
def test_passes_run_in_order_and_the_report_follows(small_graph):
    log = []
    passes = [Record("a", log), Record("b", log, requires=["a"]), Record("c", log, requires=["a", "b"])]
    graph, report = PassManager(passes).run(small_graph)
    assert log == ["a", "b", "c"]
    assert [e.pass_name for e in report.entries] == ["a", "b", "c"]
    assert graph is not small_graph


def test_config_reaches_the_passes_through_the_context(small_graph):
    seen = []

    class ReadConfig:
        name, requires = "read_config", ()

        def run(self, graph, ctx):
            seen.append(ctx.config)
            return graph

    config = object()
    PassManager([ReadConfig()]).run(small_graph, config=config)
    ctx = PassContext(config="given")
    _, report = PassManager([ReadConfig()]).run(small_graph, ctx=ctx)
    assert seen == [config, "given"] and report is ctx.report


def test_requires_are_checked_up_front_naming_the_pass(small_graph):
    log = []
    with pytest.raises(PassError) as err:
        PassManager([Record("a", log), Record("b", log, requires=["c"]), Record("c", log)])
    message = str(err.value)
    assert "'b'" in message and "'c'" in message and "['a', 'b', 'c']" in message
    assert log == []
    with pytest.raises(PassError, match="'b'"):
        PassManager([Record("b", log, requires=["b"])])  # requiring itself is requiring an earlier run


def test_a_failing_pass_is_named_with_the_passes_before_it(small_graph):
    log = []
    manager = PassManager([Record("a", log), Record("b", log), Fail(), Record("c", log)])
    with pytest.raises(PassError) as err:
        manager.run(small_graph)
    assert str(err.value) == "pass 'explode' failed (after a, b): kaboom"
    assert isinstance(err.value.__cause__, RuntimeError)
    assert log == ["a", "b"]  # c never ran


def test_a_failing_first_pass_says_so(small_graph):
    with pytest.raises(PassError, match=r"^pass 'explode' failed \(first pass\): node x is bad$"):
        PassManager([Fail(GraphError("node x is bad"))]).run(small_graph)


# ---------------------------------------------------------------------------------- verification
def test_verify_instrument_catches_a_pass_that_breaks_the_graph(small_graph):
    log = []
    with pytest.raises(PassError) as err:
        PassManager([Record("a", log), DropParam(), Record("c", log)]).run(small_graph)
    message = str(err.value)
    assert "'drop_param'" in message and "after a" in message and "conv0_weight" in message
    assert isinstance(err.value.__cause__, GraphError)
    assert log == ["a"]


def test_without_checks_a_broken_graph_gets_through(small_graph):
    graph, _ = PassManager([DropParam()], verify=False, lint=False).run(small_graph)
    assert "conv0_weight" not in graph.params
    # an explicit VerifyInstrument verifies even with checks off
    with pytest.raises(PassError, match="drop_param"):
        PassManager([DropParam()], instruments=[VerifyInstrument()], lint=False).run(small_graph)


def test_lint_runs_by_default_and_verify_on_request(small_graph, monkeypatch):
    calls = []
    monkeypatch.setattr(qgraph.Graph, "verify", lambda self: calls.append("verify") or self)
    PassManager([Record("a", [])]).run(small_graph)
    assert calls == []  # the default check is lint(), which needs no MXNet
    PassManager([Record("a", [])], verify=True).run(small_graph)
    assert calls == ["verify", "verify"]  # before the first pass and after it


def test_a_broken_input_graph_is_refused_before_any_pass(small_graph):
    log = []
    small_graph._params["ghost"] = np.zeros(1, np.float32)  # a corruption no verb allows
    with pytest.raises(PassError, match="before any pass.*ghost"):
        PassManager([Record("a", log)]).run(small_graph)
    assert log == []


# ---------------------------------------------------------------------------------- instruments
def test_timing_instrument_fills_report_timings(small_graph):
    log = []
    passes = [Record("quick", log), Record("slow", log, sleep=0.05)]
    _, report = PassManager(passes, instruments=[TimingInstrument()]).run(small_graph)
    assert set(report.timings) == {"quick", "slow"}
    assert 0.05 <= report.timings["slow"] < 2.0
    assert 0 <= report.timings["quick"] < report.timings["slow"]
    text = report.format()
    slow_ms = report.timings["slow"] * 1e3
    assert f"slow: 1 changed, 0 skipped in {slow_ms:.1f} ms" in text


def test_should_run_can_skip_a_pass(small_graph):
    log = []

    class SkipB(Instrument):
        def should_run(self, pass_, graph, ctx):
            return pass_.name != "b"

    _, report = PassManager([Record("a", log), Record("b", log), Record("c", log)],
                            instruments=[SkipB()]).run(small_graph)
    assert log == ["a", "c"]
    assert report.for_pass("b")[0].action == "skipped" and report.for_pass("b")[0].node == "*"
    assert not report.modified("b")


def test_instrument_hooks_see_every_pass_in_order(small_graph):
    calls = []

    class Spy(Instrument):
        def run_before(self, pass_, graph, ctx):
            calls.append(("before", pass_.name, "relu0_x2" in graph))

        def run_after(self, pass_, graph, ctx):
            calls.append(("after", pass_.name, "relu0_x2" in graph))

    PassManager([Record("a", []), ScaleReluOutput()], instruments=[Spy()]).run(small_graph)
    assert calls == [("before", "a", False), ("after", "a", False),
                     ("before", "scale_relu", False), ("after", "scale_relu", True)]


def _fill_colors(dot_text: str) -> dict:
    """node name -> fillcolor for each node statement of a .dot file."""
    colors = {}
    for match in re.finditer(r'^\s*"([^"]+)" \[label=.*?(?:fillcolor="([^"]+)")?\];$', dot_text, re.M):
        colors[match.group(1)] = match.group(2)
    return colors


def test_dump_instrument_writes_numbered_dot_files_with_inserted_nodes_colored(small_graph, tmp_path):
    folder = tmp_path / "dump"
    manager = PassManager([FoldBN(), ScaleReluOutput()], instruments=[DumpInstrument(folder)])
    graph, report = manager.run(small_graph)
    has_dot = shutil.which("dot") is not None
    expected = {"00_input.dot", "01_fold_bn.dot", "02_scale_relu.dot"}
    if has_dot:
        expected |= {"00_input.svg", "01_fold_bn.svg", "02_scale_relu.svg"}
    assert {p.name for p in folder.iterdir()} == expected

    dumps = {name: (folder / f"{name}.dot").read_text() for name in ("00_input", "01_fold_bn", "02_scale_relu")}
    for text in dumps.values():
        assert text.startswith("digraph qgraph {") and text.rstrip().endswith("}")
    assert INSERTED_COLOR != CHANGED_COLOR
    assert f'fillcolor="{INSERTED_COLOR}"' in dumps["02_scale_relu"]
    assert "fillcolor" not in dumps["00_input"]

    colors = _fill_colors(dumps["02_scale_relu"])
    assert colors["relu0_x2"] == INSERTED_COLOR
    assert colors["fc0"] == CHANGED_COLOR  # its input was rewired
    assert {n for n, c in colors.items() if c} == {"relu0_x2", "fc0"}
    # fold_bn rewrote conv0's weight and bias and removed bn0: conv0 is "changed", bn0 gone
    fold_colors = _fill_colors(dumps["01_fold_bn"])
    assert fold_colors["conv0"] == CHANGED_COLOR
    assert "bn0" in _fill_colors(dumps["00_input"]) and "bn0" not in fold_colors
    assert report.modified("fold_bn") and report.modified("scale_relu")
    if has_dot:
        svg = (folder / "02_scale_relu.svg").read_text()
        assert "<svg" in svg and "relu0_x2" in svg


def test_dump_instrument_without_image_formats_writes_dot_only(small_graph, tmp_path):
    PassManager([ScaleReluOutput()], instruments=[DumpInstrument(tmp_path, formats=())]).run(small_graph)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_input.dot", "01_scale_relu.dot"]


# ---------------------------------------------------------------------------------- report
def test_report_modified_and_format():
    report = Report()
    assert report.format() == "no pass ran"
    report.skipped("fold_bn", "bn1", "output of conv1 is also read by ['x']")
    report.changed("fold_bn", "conv2", "folded bn2")
    report.skipped("exclude", "conv1", "first conv")
    assert report.modified("fold_bn") and not report.modified("exclude") and not report.modified("nothing")
    assert [e.node for e in report.for_pass("fold_bn")] == ["bn1", "conv2"]
    assert report.format().splitlines() == [
        "fold_bn: 1 changed, 1 skipped",
        "  skipped  bn1: output of conv1 is also read by ['x']",
        "  changed  conv2: folded bn2",
        "exclude: 0 changed, 1 skipped",
        "  skipped  conv1: first conv",
    ]
    report.timings["timed_only"] = 0.0125
    assert report.format().splitlines()[-1] == "timed_only: 0 changed, 0 skipped in 12.5 ms"


def test_fold_bn_through_the_manager_reports_and_keeps_the_numbers(small, small_graph):
    graph, report = PassManager([FoldBN()]).run(small_graph)
    assert report.modified("fold_bn")
    assert [(e.node, e.action) for e in report.for_pass("fold_bn")] == [("conv0", "changed")]
    assert "bn0" not in graph
    inputs = small.inputs()
    expected = run_symbol(small.symbol, small.params, inputs)[0]
    np.testing.assert_allclose(run_symbol(graph.to_symbol(), graph.params, inputs)[0], expected,
                               rtol=1e-4, atol=1e-5)
    _, again = PassManager([FoldBN()]).run(graph)
    assert not again.modified("fold_bn")  # idempotent: nothing left to fold


# ---------------------------------------------------------------------------------- the input graph
@pytest.mark.parametrize("passes", [[FoldBN()], [ScaleReluOutput()], [MutateInPlace()], [ReturnsNewGraph()],
                                    [FoldBN(), ScaleReluOutput(), MutateInPlace()]],
                         ids=["fold_bn", "insert", "mutate", "new_graph", "pipeline"])
def test_the_input_graph_is_not_modified(small_graph, passes):
    json_before = small_graph.to_json()
    params_before = {k: v.copy() for k, v in small_graph.params.items()}
    ids_before = {k: id(v) for k, v in small_graph.params.items()}
    outputs_before = small_graph.outputs
    attrs_before = {n: dict(small_graph.attrs(n)) for n in small_graph.nx}

    graph, _ = PassManager(passes).run(small_graph)

    assert graph.to_json() != json_before or graph.params.keys() != params_before.keys() or any(
        not np.array_equal(graph.params[k], params_before[k]) for k in graph.params if k in params_before)
    assert small_graph.to_json() == json_before
    assert small_graph.outputs == outputs_before
    assert {n: dict(small_graph.attrs(n)) for n in small_graph.nx} == attrs_before
    assert {k: id(v) for k, v in small_graph.params.items()} == ids_before
    for name, value in params_before.items():
        assert np.array_equal(small_graph.params[name], value), name
    small_graph.verify()


def test_reused_dump_instrument_numbers_each_run_from_the_input(small_graph, tmp_path):
    manager = PassManager([FoldBN()], instruments=[DumpInstrument(tmp_path, formats=())])
    manager.run(small_graph)
    manager.run(small_graph)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_input.dot", "01_fold_bn.dot"]
