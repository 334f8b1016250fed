"""insert_fake_quant: report, verify, refusal to insert twice, exclusions honoured, 'auto'
signedness from the producer, and the saved graph as plain stock MXNet."""
from __future__ import annotations

import ctypes
import json

import mxnet as mx
import numpy as np
import pytest
from helpers import init_params

import passes
import qgraph
from passes.insert_fake_quant import InsertFakeQuant

from qgraph import Graph, PassError, PassManager, QuantConfig

F32 = np.float32
SPEC_ATTR = "__qgraph_spec__"
S = mx.sym


def _params(symbol, data_shape, seed=0):
    return init_params(symbol, {"data": data_shape}, seed, weight_gain=np.sqrt(2.0))


def _graph(symbol, data_shape, seed=0, shapes=True):
    graph = Graph.from_json(symbol.tojson(), _params(symbol, data_shape, seed), input_names=["data"])
    if shapes:
        graph.input_shapes = {"data": data_shape}
    return graph


def _net_symbol():
    """data -> conv0 -> bn0 -> relu0 -> conv1 (grouped) -> relu1 -> pool1 -> deconv2 -> flatten -> fc3."""
    x = S.Convolution(S.var("data"), num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv0")
    x = S.Activation(S.BatchNorm(x, fix_gamma=False, name="bn0"), act_type="relu", name="relu0")
    x = S.Convolution(x, num_filter=8, kernel=(3, 3), pad=(1, 1), num_group=2, name="conv1")
    x = S.Pooling(S.Activation(x, act_type="relu", name="relu1"), kernel=(2, 2), stride=(2, 2), pool_type="max",
                  name="pool1")
    x = S.Deconvolution(x, num_filter=4, kernel=(2, 2), stride=(2, 2), name="deconv2")
    return S.FullyConnected(S.Flatten(x, name="flat"), num_hidden=5, name="fc3")


DATA_SHAPE = (2, 3, 8, 8)
LAYERS = ("conv0", "conv1", "deconv2", "fc3")


@pytest.fixture
def net_graph():
    return _graph(_net_symbol(), DATA_SHAPE)


def _run(graph, config):
    return PassManager(passes.default_pipeline(config)).run(graph, config)


def _specs(graph):
    """{(layer, kind): spec dict} read from the exit nodes' attributes."""
    specs = {}
    for node in graph.nodes():
        if SPEC_ATTR in graph.attrs(node):
            spec = json.loads(graph.attrs(node)[SPEC_ATTR])
            specs[(spec["layer"], spec["kind"])] = spec
    return specs


def _registered_ops() -> set:
    size, names = ctypes.c_uint(), ctypes.POINTER(ctypes.c_char_p)()
    mx.base.check_call(mx.base._LIB.MXListAllOpNames(ctypes.byref(size), ctypes.byref(names)))
    return {mx.base.py_str(names[i]) for i in range(size.value)}


# ---------------------------------------------------------------------- report, verify, twice
def test_report_lists_every_quantized_and_skipped_layer(net_graph):
    rewritten, report = _run(net_graph, QuantConfig())
    entries = {e.node: e for e in report.for_pass("insert_fake_quant")}
    assert set(entries) == set(LAYERS)
    assert entries["conv0"].action == "skipped" and "first convolution" in entries["conv0"].reason
    for layer in LAYERS[1:]:
        assert entries[layer].action == "changed"
        assert entries[layer].reason == "weight int8 per layer; input uint8 online"
    assert report.modified("insert_fake_quant")
    assert "insert_fake_quant: 3 changed, 1 skipped" in report.format()


def test_report_describes_the_configuration(net_graph):
    config = QuantConfig(weight_bits=4, input_bits=6, quant_type="channel", input_signed=True, online=False)
    _, report = _run(net_graph, config)
    reasons = {e.node: e.reason for e in report.for_pass("insert_fake_quant") if e.action == "changed"}
    assert reasons == {layer: "weight int4 per channel; input int6 offline (calibrate)" for layer in LAYERS[1:]}


def test_verify_passes_after_insertion(net_graph):
    for config in (QuantConfig(), QuantConfig(quant_type="group", input_signed="auto"),
                   QuantConfig(quant_type="channel", exclude_first_conv=False, online_stat="mean_max"),
                   QuantConfig(online=False, input_signed=True)):
        rewritten, _ = _run(net_graph, config)
        assert rewritten.input_shapes == {"data": DATA_SHAPE}
        rewritten.verify()
        assert set(rewritten.params) >= set(net_graph.params)


def test_specs_on_the_exit_nodes(net_graph):
    rewritten, _ = _run(net_graph, QuantConfig(weight_bits=5, input_bits=7, quant_type="channel"))
    specs = _specs(rewritten)
    assert set(specs) == {(layer, kind) for layer in LAYERS[1:] for kind in ("weight", "input")}
    for layer in LAYERS[1:]:
        assert specs[(layer, "weight")]["bits"] == 5 and specs[(layer, "weight")]["signed"] is True
        assert specs[(layer, "weight")]["granularity"] == "channel"
        assert specs[(layer, "input")]["bits"] == 7 and specs[(layer, "input")]["signed"] is False
        assert specs[(layer, "input")]["online"] is True


def test_inserting_twice_is_refused(net_graph):
    config = QuantConfig()
    rewritten, _ = _run(net_graph, config)
    with pytest.raises(PassError, match="insert_fake_quant.*already has fake-quant"):
        PassManager([InsertFakeQuant()]).run(rewritten, config)
    with pytest.raises(PassError, match="already has fake-quant"):
        _run(rewritten, config)  # the whole default pipeline again


def test_inserting_into_a_saved_quantized_graph_is_refused(net_graph, tmp_path):
    rewritten, _ = _run(net_graph, QuantConfig())
    qgraph.save(rewritten, tmp_path / "q")
    with pytest.raises(PassError, match="already has fake-quant"):
        passes.quantize(str(tmp_path / "q"), QuantConfig())


def test_excluded_first_conv_is_untouched(net_graph):
    rewritten, _ = _run(net_graph, QuantConfig())
    assert [ref.node for ref in rewritten.inputs("conv0")] == ["data", "conv0_weight", "conv0_bias"]
    assert all(layer != "conv0" for layer, _ in _specs(rewritten))
    for layer in LAYERS[1:]:
        data_in, weight_in = (ref.node for ref in rewritten.inputs(layer)[:2])
        assert data_in.startswith(f"{layer}_data_fq") and weight_in.startswith(f"{layer}_weight_fq")
    # and with the exclusion off the first conv is quantized too
    rewritten, _ = _run(net_graph, QuantConfig(exclude_first_conv=False))
    assert ("conv0", "weight") in _specs(rewritten) and ("conv0", "input") in _specs(rewritten)


def test_quantize_input_false_inserts_only_weight_quantizers(net_graph):
    rewritten, report = _run(net_graph, QuantConfig(quantize_input=False))
    assert {kind for _, kind in _specs(rewritten)} == {"weight"}
    assert all(e.reason == "weight int8 per layer" for e in report.for_pass("insert_fake_quant")
               if e.action == "changed")


def test_first_conv_output_equals_float_and_the_rest_differs(net_graph):
    """Numerically: the excluded conv0 computes in float, quantized layers do not."""
    rewritten, _ = _run(net_graph, QuantConfig(weight_bits=3, input_bits=3))
    x = np.random.default_rng(0).standard_normal(DATA_SHAPE).astype(F32)
    taps = [qgraph.TensorRef("conv0"), qgraph.TensorRef("fc3")]
    outputs = []
    for graph in (net_graph, rewritten):
        graph = graph.copy()
        graph.set_outputs(taps)
        outputs.append([o.asnumpy() for o in qgraph.to_block(graph)(mx.nd.array(x))])
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    assert not np.allclose(outputs[0][1], outputs[1][1], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------- input_signed='auto'
def _pre(x):
    return S.Convolution(x, num_filter=4, kernel=(3, 3), pad=(1, 1), name="pre")


PRODUCERS = {
    # name: (producer of the target conv's input, from the excluded first conv "pre"; unsigned?)
    "relu": (lambda p: S.Activation(p, act_type="relu", name="act"), True),
    "relu_op": (lambda p: S.relu(p, name="act"), True),
    "maxpool_of_relu": (lambda p: S.Pooling(S.Activation(p, act_type="relu", name="act"), kernel=(2, 2),
                                            stride=(2, 2), pool_type="max", name="pool"), True),
    "concat_of_relus": (lambda p: S.Concat(S.Activation(p, act_type="relu", name="act_a"),
                                           S.Activation(p, act_type="relu", name="act_b"), dim=1, name="cat"), True),
    "clip_a_min_0": (lambda p: S.clip(p, a_min=0.0, a_max=6.0, name="relu6"), True),
    "sigmoid": (lambda p: S.Activation(p, act_type="sigmoid", name="act"), True),
    "leaky_slope_0": (lambda p: S.LeakyReLU(p, act_type="leaky", slope=0.0, name="act"), True),
    "add_of_relus": (lambda p: S.elemwise_add(S.relu(p, name="act_a"), S.relu(p, name="act_b"), name="add"), True),
    "batchnorm": (lambda p: S.BatchNorm(p, fix_gamma=False, name="bn"), False),
    "conv_output": (lambda p: p, False),
    "relu_then_batchnorm": (lambda p: S.BatchNorm(S.relu(p, name="act"), fix_gamma=False, name="bn"), False),
    "clip_a_min_negative": (lambda p: S.clip(p, a_min=-1.0, a_max=6.0, name="clip"), False),
    "leaky_relu": (lambda p: S.LeakyReLU(p, act_type="leaky", slope=0.1, name="act"), False),
    "tanh": (lambda p: S.Activation(p, act_type="tanh", name="act"), False),
    "concat_relu_and_bn": (lambda p: S.Concat(S.relu(p, name="act"), S.BatchNorm(p, name="bn"), dim=1,
                                              name="cat"), False),
    "maxpool_of_conv": (lambda p: S.Pooling(p, kernel=(2, 2), stride=(2, 2), pool_type="max", name="pool"), False),
}


@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_auto_signedness_follows_the_producer(producer):
    build, unsigned = PRODUCERS[producer]
    target = S.Convolution(build(_pre(S.var("data"))), num_filter=3, kernel=(1, 1), name="target")
    graph = _graph(target, (2, 3, 6, 6))
    rewritten, report = _run(graph, QuantConfig(input_signed="auto"))
    specs = _specs(rewritten)
    assert ("pre", "input") not in specs  # the first conv stays float
    assert specs[("target", "input")]["signed"] is (not unsigned)
    reason = {e.node: e.reason for e in report.for_pass("insert_fake_quant")}["target"]
    assert ("input uint8" if unsigned else "input int8") in reason


def test_auto_quantizes_network_input_as_signed():
    graph = _graph(S.FullyConnected(S.var("data"), num_hidden=3, name="fc"), (2, 5))
    rewritten, _ = _run(graph, QuantConfig(input_signed="auto"))
    assert _specs(rewritten)[("fc", "input")]["signed"] is True


@pytest.mark.parametrize("setting", [True, False])
def test_explicit_signedness_ignores_the_producer(setting):
    build, _ = PRODUCERS["relu"]
    target = S.Convolution(build(_pre(S.var("data"))), num_filter=3, kernel=(1, 1), name="target")
    rewritten, _ = _run(_graph(target, (2, 3, 6, 6)), QuantConfig(input_signed=setting))
    assert _specs(rewritten)[("target", "input")]["signed"] is setting


def test_auto_keeps_negative_values_after_batchnorm():
    """Numerically: after a BN, 'auto' quantizes signed (negatives survive), False clips them to 0."""
    build, _ = PRODUCERS["batchnorm"]
    symbol = S.Convolution(build(_pre(S.var("data"))), num_filter=3, kernel=(1, 1), name="target")
    graph = _graph(symbol, (2, 3, 6, 6))
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(F32)
    quantized = {}
    for setting in ("auto", False):
        rewritten, _ = _run(graph, QuantConfig(input_signed=setting))
        exit_node = next(n for n in rewritten.nodes() if SPEC_ATTR in rewritten.attrs(n)
                         and json.loads(rewritten.attrs(n)[SPEC_ATTR])["kind"] == "input")
        rewritten.set_outputs([qgraph.TensorRef(exit_node)])
        rewritten.cleanup()
        quantized[setting] = qgraph.to_block(rewritten)(mx.nd.array(x)).asnumpy()
    assert quantized["auto"].min() < 0
    assert quantized[False].min() == 0


# ---------------------------------------------------------------------- saved graph is stock MXNet
def _imports(prefix):
    return mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(quant_type="channel", input_signed="auto",
                                                               weight_bits=4, input_bits=4),
                                    QuantConfig(online=False, input_signed=True, quant_type="group")],
                         ids=["default", "channel-auto-4bit", "offline"])
def test_saved_graph_loads_as_plain_symbolblock_with_same_outputs(net_graph, config, tmp_path):
    rewritten, _ = _run(net_graph, config)
    for name in rewritten.params:
        if name.endswith("_data_threshold"):  # as calibration would
            rewritten.set_param(name, np.array([1.25], F32))
    prefix = tmp_path / "rewritten"
    qgraph.save(rewritten, prefix)

    document = json.loads((tmp_path / "rewritten-symbol.json").read_text())
    ops = {node["op"] for node in document["nodes"]} - {"null"}
    assert ops - _registered_ops() == set()
    assert {"round", "broadcast_div"} <= ops  # the fake-quant subgraphs really are in the file

    x = mx.nd.array(np.random.default_rng(2).standard_normal(DATA_SHAPE).astype(F32))
    plain = _imports(prefix)(x).asnumpy()
    net = qgraph.QuantizedNet(rewritten)
    np.testing.assert_array_equal(plain, net(x).asnumpy())
    np.testing.assert_array_equal(plain, qgraph.to_block(rewritten)(x).asnumpy())
    net.disable_quantize()
    assert not np.array_equal(plain, net(x).asnumpy())  # the quantizers do change the output


@pytest.mark.parametrize("config", [
    dict(quant_type="channel", input_signed="auto", online=False),
    dict(quant_type="layer", online=True, quantize_bias=True, input_signed=True, online_stat="mean_max"),
    dict(quant_type="channel", winograd="F23", winograd_mode="full", online=False),
    dict(quant_type="channel", fake_bn=True, exclude_first_conv=False, online=False, learn_thresholds=True),
], ids=["offline", "bias", "winograd", "fake_bn"])
def test_stripped_copy_is_strip_fake_quant_on_a_copy(config):
    """The copy that never copies the subgraphs is the graph strip_fake_quant leaves, and the
    rewritten graph is untouched."""
    from qgraph.quantizer import strip_fake_quant, stripped_copy

    graph = _graph(_net_symbol(), (2, 3, 8, 8))
    rewritten, _ = PassManager(passes.build_pipeline("fake_bn,exclude,insert_fake_quant"
                                                     if config.get("fake_bn") else "exclude,insert_fake_quant")
                               ).run(graph, QuantConfig(**config))
    before = rewritten.to_json()
    fast = stripped_copy(rewritten)
    assert rewritten.to_json() == before
    slow = strip_fake_quant(rewritten.copy())
    assert fast.to_json() == slow.to_json()
    assert sorted(fast.params) == sorted(slow.params)
    assert fast.topo_order() == slow.topo_order() and len(fast) < len(rewritten)
    fast.lint()
