"""qgraph.taps: in-graph ranges and histograms of layer inputs equal numpy's, one set per tensor."""
import mxnet as mx
import numpy as np
from helpers import graph_of, make_model, run_graph

import qgraph
from qgraph.taps import HistogramTap, add_taps, observed_tensors, tap_kind, tensor_key

S = mx.sym


def _net():
    """data -> conv_a -> relu -> conv_b and fc_c (both read the ReLU), conv_a reads signed data."""
    data = S.var("data")
    conv_a = S.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv_a")
    relu = S.relu(conv_a, name="relu")
    conv_b = S.Convolution(relu, num_filter=2, kernel=(1, 1), name="conv_b")
    fc_c = S.FullyConnected(relu, num_hidden=3, name="fc_c")
    return graph_of(make_model(S.Group([conv_b, fc_c]), {"data": (2, 3, 6, 6)}))


def _run(graph, x):
    return run_graph(graph, {"data": x})


def test_a_tensor_read_by_two_layers_is_tapped_once():
    graph = _net()
    assert list(observed_tensors(graph)) == ["data:0", "relu:0"]
    assert add_taps(graph, reductions=("max",)) == ["data:0", "relu:0"]
    assert [tap_kind(graph, ref) for ref in graph.outputs[2:]] == ["data:0|max", "relu:0|max"]


def test_ranges_and_histograms_equal_numpy():
    graph = _net()
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    relu = _run(graph.copy().set_outputs(["relu"]).cleanup(), x)[0]
    taps = {"data:0": HistogramTap("abs", 16, 0.0, 4.0), "relu:0": HistogramTap("relu", 8, 0.0, 3.0)}
    add_taps(graph, histograms=taps)
    values = dict(zip([tap_kind(graph, r) for r in graph.outputs[2:]], _run(graph, x)[2:]))
    assert values["data:0|max"][0] == x.max() and values["data:0|min"][0] == x.min()
    assert values["relu:0|min"][0] == 0.0 and values["relu:0|max"][0] == relu.max()  # min: a constant
    np.testing.assert_array_equal(values["data:0|hist"], np.histogram(np.abs(x), 16, (0.0, 4.0))[0])
    assert values["data:0|zeros"][0] == np.sum(x == 0)
    np.testing.assert_array_equal(values["relu:0|hist"], np.histogram(relu, 8, (0.0, 3.0))[0])
    assert values["relu:0|zeros"][0] == np.sum(relu == 0) > 0


def test_keys_name_tensor_and_output():
    assert tensor_key(qgraph.TensorRef("split", 1)) == "split:1"
