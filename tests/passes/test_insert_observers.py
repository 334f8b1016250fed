"""insert_observers: taps appended as outputs, reported per tensor, and equal to numpy statistics."""
from pathlib import Path

import mxnet as mx
import numpy as np

import passes
import qgraph
from qgraph.taps import TAP_TAG, HistogramTap, tap_kind

ROOT = Path(__file__).resolve().parents[2]


def test_taps_match_numpy_statistics_of_the_tapped_tensor():
    graph = qgraph.load(ROOT / "models" / "mnist_cnn-symbol.json", input_shape=(8, 1, 28, 28))
    key = "mnistcnn_pool1_fwd:0"
    histograms = {key: HistogramTap("relu", 16, 0.0, 8.0)}
    tapped, report = qgraph.PassManager([passes.PASSES["insert_observers"](histograms=histograms)]).run(graph)
    assert len(report.for_pass("insert_observers")) == 5  # conv1..conv3, dense0, conv0 (nothing excluded)
    kinds = [tap_kind(tapped, ref) for ref in tapped.outputs[1:]]
    assert f"{key}|max" in kinds and f"{key}|hist" in kinds and all(TAP_TAG in tapped.attrs(r.node)
                                                                   for r in tapped.outputs[1:])
    x = np.random.RandomState(0).normal(size=(8, 1, 28, 28)).astype(np.float32)
    outputs = dict(zip(kinds, [o.asnumpy() for o in qgraph.to_block(tapped)(mx.nd.array(x))[1:]]))
    internals = graph.to_symbol().get_internals()["mnistcnn_pool1_fwd_output"]
    reference = mx.gluon.SymbolBlock(internals, [mx.sym.var("data")], params=qgraph.to_block(graph).collect_params())
    activations = reference(mx.nd.array(x)).asnumpy()
    assert outputs[f"{key}|max"][0] == activations.max()
    assert outputs[f"{key}|min"][0] == 0.0  # proven non-negative (a pooled ReLU): the constant 0
    assert np.array_equal(outputs[f"{key}|hist"], np.histogram(activations, bins=16, range=(0, 8.0))[0])
    assert outputs[f"{key}|zeros"][0] == np.sum(activations == 0)
