"""qgraph.analysis.ranges and plots: per-channel weight ranges before and after folding agree
with fold_bn, input histograms count every value, the threshold survey leaves the net as it
was, and every figure is a PNG whatever values it is given."""
import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN

import passes
import qgraph
from passes.fold_bn import FoldBN
from qgraph import QuantConfig
from qgraph.analysis import channel_ranges, input_histograms, plots, threshold_survey
from qgraph.calibrate import MODES
from qgraph.data import mnist_split
from qgraph.quantizer import weight_param

IMAGES = mnist_split()[1][0][:64].copy()


def test_channel_ranges_match_the_folded_graph():
    graph = qgraph.load(MNIST_CNN)
    folded, _ = qgraph.PassManager([FoldBN()]).run(graph)
    ranges = {r["layer"]: r for r in channel_ranges(graph)}
    assert list(ranges) == ["mnistcnn_conv0_fwd", "mnistcnn_conv1_fwd", "mnistcnn_conv2_fwd", "mnistcnn_conv3_fwd",
                            "mnistcnn_dense0_fwd"]
    for layer, found in ranges.items():
        weight = graph.params[weight_param(graph, layer)]
        np.testing.assert_allclose(found["before"], np.abs(weight.reshape(len(weight), -1)).max(axis=1))
        after = folded.params[weight_param(folded, layer)]
        if found["after"] is None:
            assert layer == "mnistcnn_dense0_fwd"
        else:
            np.testing.assert_allclose(found["after"], np.abs(after.reshape(len(after), -1)).max(axis=1), rtol=1e-6)


def test_input_histograms_count_every_value_of_each_input():
    net = passes.quantize(MNIST_CNN, QuantConfig())
    histograms = input_histograms(net, IMAGES, bins=64)
    assert set(histograms) == {s.layer for s in net.input_specs}
    graph = net.float_graph.copy()
    graph.set_outputs([graph.inputs(s.layer)[0] for s in net.input_specs]).cleanup()
    values = qgraph.to_block(graph)(mx.nd.array(IMAGES))
    for spec, value in zip(net.input_specs, values):
        counts, edges = histograms[spec.layer]
        value = value.asnumpy()
        assert counts.sum() == value.size and len(edges) == 65
        assert edges[0] <= value.min() + 1e-6 and edges[-1] == pytest.approx(value.max())  # 0 when provably >= 0


@pytest.mark.parametrize("online", [False, True])
def test_the_threshold_survey_leaves_the_net_as_it_was(online):
    net = passes.quantize(MNIST_CNN, QuantConfig(online=online))
    if not online:
        net.calibrate(IMAGES, "percentile", progress=False)
    before, mode = net.thresholds(), net.mode
    found = threshold_survey(net, IMAGES)
    assert list(found) == list(MODES) and all(set(t) == set(before) for t in found.values())
    assert net.mode == mode
    if not online:
        assert net.thresholds() == before
        assert found["percentile"] == before


def test_every_figure_is_a_png_whatever_it_is_given():
    layers = ["a_rather_long_layer_name_conv0_fwd", "b"]
    assert plots.layer_bars(layers, {"x": [1.0, None], "y": [float("inf"), -2.0], "none": [None, None]}, "x",
                            "t").startswith(b"\x89PNG")
    assert plots.range_ratios(layers, [1.5, 3.0], [None, 40.0]).startswith(b"\x89PNG")
    panel = {"layer": "a", "counts": np.arange(8.0), "edges": np.linspace(-1, 1, 9), "signed": True, "bits": 8,
             "thresholds": {"naive": 1.0, "kl": 0.5, "other": 0.25}}
    pages = plots.input_histograms([panel] * 13)
    assert len(pages) == 2 and all(p.startswith(b"\x89PNG") for p in pages)
    ranges = [{"layer": "a", "before": np.array([1.0, 0.0, 2.0]), "after": None},
              {"layer": "b", "before": np.ones(4), "after": np.array([300.0, 1.0, 0.5, 0.0])}]
    assert plots.weight_ranges(ranges, 8)[0].startswith(b"\x89PNG")
    points = [{"bits": 4.0, "top1": 0.5, "kind": "uniform", "label": "all 4-bit"},
              {"bits": 5.0, "top1": 0.6, "kind": "step"}, {"bits": 5.0, "top1": 0.6, "kind": "chosen", "label": "mix"},
              {"bits": 32.0, "top1": 0.62, "kind": "test", "label": "FP32 (test)"}]
    assert plots.top1_against_bits(points, 0.61, "t").startswith(b"\x89PNG")
