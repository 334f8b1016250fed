"""qgraph.emit: each Mode emits the graph it promises, as a pure function of (float graph, specs,
mode) that needs no block; QuantizedNet runs exactly these graphs."""
import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN

import passes
import qgraph
from qgraph.emit import Mode, emit
from qgraph.tags import FQ_TAG


@pytest.fixture(scope="module")
def net():
    config = qgraph.QuantConfig(quant_type="channel", input_signed="auto", online=False)
    return passes.quantize(f"{MNIST_CNN}-symbol.json", config)


def _ops(graph):
    return [graph.op(n) for n in graph.nodes()]


def _emit(net, mode, thresholds=None):
    return emit(net.float_graph, net.weight_specs, net.input_specs, mode, thresholds)


def test_quantization_off_is_the_float_model(net):
    emission = _emit(net, Mode(weights=False, inputs=False))
    float_model = qgraph.load(f"{MNIST_CNN}-symbol.json")
    assert sorted(emission.graph.nx.nodes) == sorted(float_model.nx.nodes)
    x = mx.nd.array(np.random.RandomState(1).rand(3, 1, 28, 28))
    np.testing.assert_array_equal(qgraph.to_block(emission.graph)(x).asnumpy(),
                                  qgraph.to_block(float_model)(x).asnumpy())
    assert emission.model_outputs == 1 and emission.stat_layers == () == emission.probe_layers


def test_weights_only_and_inputs_only(net):
    weights = _emit(net, Mode(inputs=False)).graph
    inputs = _emit(net, Mode(weights=False)).graph
    tagged = lambda g: {g.attrs(n)[FQ_TAG] for n in g.nodes() if FQ_TAG in g.attrs(n)}  # noqa: E731
    assert tagged(weights) == {s.id for s in net.weight_specs}
    assert tagged(inputs) == {s.id for s in net.input_specs}


def test_training_form_is_straight_through_and_evaluation_form_is_not(net):
    assert "BlockGrad" in _ops(_emit(net, Mode(training=True)).graph)
    assert "BlockGrad" not in _ops(_emit(net, Mode()).graph)


def test_offline_thresholds_are_parameters_or_constants(net, input_form):
    params = _emit(net, Mode(weights=False)).graph
    assert all(s.threshold in params.params for s in net.input_specs)
    thresholds = {s.layer: 2.0 + i for i, s in enumerate(net.input_specs)}
    baked = _emit(net, Mode(weights=False), thresholds).graph
    assert not any(s.threshold in baked.params for s in net.input_specs)
    suffix, attr = ("_data_fq_fused", "step") if input_form == "fused" else ("_data_fq_dequant", "scalar")
    scales = sorted(float(baked.attrs(n)[attr]) for n in baked.nodes() if n.endswith(suffix))
    expected = sorted(float(np.float32(t) / np.float32(s.levels)) for s, t in zip(net.input_specs, thresholds.values()))
    assert scales == pytest.approx(expected)


def test_online_emission_outputs_each_batch_threshold_and_the_sign_probe(net):
    emission = _emit(net, Mode(online=True, sign_probe=True))
    layers = tuple(s.layer for s in net.input_specs)
    assert emission.stat_layers == layers
    assert emission.probe_layers == tuple(s.layer for s in net.input_specs if not s.signed)
    assert len(emission.graph.outputs) == 1 + len(layers) + len(emission.probe_layers)


def test_bn_freeze_uses_running_statistics(net):
    frozen = _emit(net, Mode(bn_frozen=True)).graph
    assert all(frozen.attrs(bn)["use_global_stats"] == "True" for bn in frozen.nodes("BatchNorm"))


def test_the_net_computes_the_emitted_graph(net):
    x = np.random.RandomState(0).rand(4, 1, 28, 28).astype(np.float32)
    net.calibrate(x, "naive", progress=False)
    graph = _emit(net, net.mode, net.thresholds()).graph
    expected = qgraph.to_block(graph.set_params({k: v for k, v in net.parameter_values().items()
                                                 if k in graph.params}))
    np.testing.assert_array_equal(expected(mx.nd.array(x)).asnumpy(), net(mx.nd.array(x)).asnumpy())
    assert (net.mode, tuple(net.thresholds().values())) in net.cached_forms()


def test_mode_is_a_frozen_value():
    mode = Mode()
    assert mode.replace(online=True) == Mode(online=True) and mode == Mode()
    with pytest.raises(Exception):
        mode.online = True
