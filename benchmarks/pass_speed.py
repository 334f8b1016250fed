#!/usr/bin/env python
"""pass_speed: how long the pass pipeline takes per graph node, on gluoncv ImageNet models.

For each model (random weights; exported once to a temporary folder, outside the timing):
load the exported files -> fold_bn -> insert_fake_quant (with exclude, as the default pipeline
runs it) -> emit the evaluation form of QuantizedNet's graph (up to the MXNet Symbol it runs, and
until every parameter value is written: fold_bn's products run on a background thread while
the later steps run), each step timed on its own, the
median of `--repeats` runs after one warm-up run. The PassManager runs with its default check
(Graph.lint after every pass). Prints each model's node count and milliseconds per step, the
time per 100 nodes, and last `pass pipeline ms per 100 nodes: X (max over models)`.

    python benchmarks/pass_speed.py
    python benchmarks/pass_speed.py --models resnet18_v1,mobilenetv2_1.0 --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from gluoncv.model_zoo import get_model  # noqa: E402

import passes  # noqa: E402
import qgraph  # noqa: E402
from qgraph.emit import Mode, emit  # noqa: E402
from qgraph.quantizer import fake_quant_specs, stripped_copy  # noqa: E402
from qgraph.runtime import add_threshold_params  # noqa: E402

MODELS = ("resnet18_v1", "resnet50_v1", "resnet152_v1", "densenet201", "mobilenetv2_1.0")
STEPS = ("load", "fold_bn", "insert_fake_quant", "emit")


def export(name: str, folder: str) -> str:
    net = get_model(name, classes=1000)
    net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0))
    net.hybridize()
    net(mx.nd.zeros((1, 3, 224, 224)))
    prefix = os.path.join(folder, name)
    net.export(prefix)
    return prefix


def run_once(prefix: str) -> dict:
    """Seconds per step of one load -> fold_bn -> insert_fake_quant -> emit."""
    config = qgraph.QuantConfig(quant_type="channel", input_signed="auto", online=False, merge_bn=True)
    times = {}
    start = time.perf_counter()
    graph = qgraph.load(prefix)
    times["load"] = time.perf_counter() - start
    start = time.perf_counter()
    folded, _ = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(graph, config)
    times["fold_bn"] = time.perf_counter() - start
    start = time.perf_counter()
    rewritten, _ = qgraph.PassManager(passes.build_pipeline("exclude,insert_fake_quant")).run(folded, config)
    times["insert_fake_quant"] = time.perf_counter() - start
    start = time.perf_counter()
    specs = fake_quant_specs(rewritten)
    inputs = [s for s in specs if s.kind == "input"]
    float_graph = add_threshold_params(stripped_copy(rewritten), inputs,
                                       {s.threshold: rewritten.params[s.threshold] for s in inputs})
    thresholds = {s.layer: 1.0 for s in inputs}
    emission = emit(float_graph, [s for s in specs if s.kind == "weight"], inputs, Mode(), thresholds)
    emission.graph.to_symbol()  # what QuantizedNet builds its SymbolBlock from
    emission.graph.settle()  # every parameter value written (fold_bn's products run in the background)
    times["emit"] = time.perf_counter() - start
    times["nodes"] = len(graph)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated gluoncv names")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model after a warm-up (default: 5)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgraph-pass-speed-") as folder:
        for name in args.models.split(","):
            prefix = export(name, folder)
            os.sync()  # the kernel's writeback of the files just written would otherwise share the timing
            gc.collect()
            gc.freeze()  # as the tools do (qgraph.cli): the collector skips the libraries' objects
            run_once(prefix)  # warm-up: MXNet's operator registry, the op_check probe cache
            runs = [run_once(prefix) for _ in range(args.repeats)]
            median = {step: float(np.median([r[step] for r in runs])) for step in STEPS}
            nodes = runs[0]["nodes"]
            total = sum(median.values())
            rows.append((name, nodes, median, total))
            print(f"{name:18s} {nodes:5d} nodes  " + "  ".join(f"{s} {1e3 * median[s]:7.1f} ms" for s in STEPS)
                  + f"  = {1e3 * total:7.1f} ms, {1e5 * total / nodes:5.1f} ms per 100 nodes", flush=True)
    per_node = [(1e5 * total / nodes, name) for name, nodes, _, total in rows]
    nodes = np.array([r[1] for r in rows], float)
    totals = np.array([r[3] for r in rows])
    slope, intercept = np.polyfit(nodes, totals, 1)
    print(f"linear fit: {1e5 * slope:.1f} ms per 100 nodes + {1e3 * intercept:.1f} ms "
          f"(max deviation {1e3 * np.abs(totals - (slope * nodes + intercept)).max():.1f} ms)")
    print(f"pass pipeline ms per 100 nodes: {max(per_node)[0]:.1f} (max over models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
