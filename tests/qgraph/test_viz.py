"""Graphviz dumps: each fake-quant subgraph drawn as one node labelled with its spec (kind, bits,
granularity, sign, threshold once calibrated), the model's edges kept; 'full' detail draws every
node; DumpInstrument passes the choice on and refuses an unknown one."""
import re

import numpy as np
import pytest
from helpers import MNIST_CNN

import passes
import qgraph
from qgraph import ConfigError, QuantConfig, viz
from qgraph.tags import FQ_TAG


@pytest.fixture(scope="module")
def net():
    net = passes.quantize(MNIST_CNN, QuantConfig(weight_bits=4, quant_type="channel", input_signed="auto",
                                                 online=False))
    net.calibrate(np.random.RandomState(0).randn(8, 1, 28, 28).astype(np.float32), "naive", calib_epoch=1,
                  progress=False)
    return net


def _nodes(dot: str) -> dict:
    """node id -> label of every node statement."""
    return {m.group(1): m.group(2) for m in re.finditer(r'^\s*"([^"]+)" \[label="((?:[^"\\]|\\.)*)"', dot, re.M)}


def test_each_fake_quant_subgraph_is_one_node_with_its_spec(net):
    graph = net.current_graph()
    dot = viz.to_dot(graph)
    nodes = _nodes(dot)
    groups = {graph.attrs(n)[FQ_TAG] for n in graph.nodes() if FQ_TAG in graph.attrs(n)}
    assert groups and groups <= set(nodes)
    assert not [n for n in nodes if n not in groups and FQ_TAG in graph.attrs(n)]  # no member drawn
    weight = nodes["mnistcnn_conv2_fwd_weight_fq"]
    assert "fake-quant weight int4 per channel" in weight and "mnistcnn_conv2_weight (32, 16, 1, 1)" in weight
    threshold = net.thresholds()["mnistcnn_conv2_fwd"]
    data = nodes["mnistcnn_conv2_fwd_data_fq"]
    assert "fake-quant input uint8 per tensor" in data and f"T = {threshold:.4g}" in data
    assert '"mnistcnn_conv2_fwd_data_fq" -> "mnistcnn_conv2_fwd"' in dot
    assert '"mnistcnn_conv2_fwd_weight_fq" -> "mnistcnn_conv2_fwd"' in dot
    assert len(nodes) < len([n for n in graph.nodes() if not graph.is_param(n)]) / 2


def test_thresholds_before_calibration_and_online_ones_say_so():
    offline = passes.quantize(MNIST_CNN, QuantConfig(online=False)).current_graph()
    assert "T not calibrated" in _nodes(viz.to_dot(offline))["mnistcnn_conv1_fwd_data_fq"]
    online = passes.quantize(MNIST_CNN, QuantConfig(online=True)).current_graph()
    assert "T = batch max (online)" in _nodes(viz.to_dot(online))["mnistcnn_conv1_fwd_data_fq"]


def test_full_detail_draws_every_node(net):
    graph = net.current_graph()
    nodes = _nodes(viz.to_dot(graph, detail="full"))
    assert set(nodes) == {n for n in graph.nodes() if not graph.is_param(n)}


def test_dump_instrument_collapses_by_default_and_keeps_full_on_request(tmp_path):
    config = QuantConfig(quant_type="channel")
    for detail in ("collapsed", "full"):
        dumps = qgraph.DumpInstrument(tmp_path / detail, formats=(), detail=detail)
        net = passes.quantize(MNIST_CNN, config, instruments=[dumps])
        dumps.dump(net.current_graph(), "later")
        assert sorted(p.name for p in (tmp_path / detail).iterdir())[-1] == "03_later.dot"
    collapsed = _nodes((tmp_path / "collapsed" / "02_insert_fake_quant.dot").read_text())
    full = _nodes((tmp_path / "full" / "02_insert_fake_quant.dot").read_text())
    assert "mnistcnn_conv1_fwd_weight_fq" in collapsed and "mnistcnn_conv1_fwd_weight_fq_copy" in full
    assert len(full) > 3 * len(collapsed)
    assert 'label="later"' in (tmp_path / "collapsed" / "03_later.dot").read_text()


def test_an_unknown_detail_is_refused():
    with pytest.raises(ConfigError, match="dump detail 'some'"):
        qgraph.DumpInstrument("x", detail="some")
