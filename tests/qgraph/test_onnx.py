"""qgraph.deploy.onnx against ONNX Runtime and the simulation: the FP32 model matches MXNet, the
QDQ initializers hold the simulation's weights and int32 biases bit for bit, the first fused
layer's int8 outputs are bit-identical to the simulation's codes, int8 inputs are clipped at
-127 as the simulation clips them, and what has no QDQ form is refused naming node and op."""
from __future__ import annotations

import sys

import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN, MOBILENET, RESNET20, conv_deconv_graph

import passes
import qgraph
from qgraph import ConfigError, GraphError
from qgraph.data import cifar10_arrays, default_cifar10_dir, mnist_split
from qgraph.deploy import integers
from qgraph.deploy import onnx as deploy
from qgraph.emit import Mode, emit
from qgraph.io import evaluate

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

F32 = np.float32
CIFAR = (1, 3, 32, 32)
CONFIG = qgraph.QuantConfig(quant_type="channel", input_signed=True, merge_bn=True, exclude_first_conv=False,
                            online=False, rounding="half_even", quantize_bias=True)


def _images(shape, count, seed=0):
    if shape == CIFAR and default_cifar10_dir() is not None:
        return cifar10_arrays(default_cifar10_dir(), "test", limit=count)[0]
    if shape[1] == 1:
        return mnist_split()[1][0][:count]
    return np.random.default_rng(seed).standard_normal((count,) + shape[1:]).astype(F32)


def _calibrated(prefix, shape, config=CONFIG, count=64):
    net = passes.quantize(qgraph.load(str(prefix), input_shape=shape), config)
    net.calibrate(_images(shape, count, seed=1), "naive", calib_epoch=1, progress=False)
    return net


def _initializers(model) -> dict:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("prefix,shape", [(MNIST_CNN, (1, 1, 28, 28)), (RESNET20, CIFAR), (MOBILENET, CIFAR)])
def test_fp32_onnx_matches_mxnet(prefix, shape, tmp_path):
    graph, _ = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(qgraph.load(str(prefix), input_shape=shape))
    images = np.random.default_rng(2).standard_normal((8,) + shape[1:]).astype(F32)
    path = tmp_path / "m.onnx"
    path.write_bytes(deploy.export_fp32(graph, shape))
    ours = deploy.run(deploy.session(path), images)[0]
    reference = qgraph.to_block(graph)(mx.nd.array(images)).asnumpy()
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["data"]  # weights are initializers, not inputs
    assert model.opset_import[0].version >= 13


def test_qdq_initializers_hold_the_simulations_weights_and_biases():
    net = _calibrated(MOBILENET, CIFAR)
    folded = net.current_float_graph().cleanup()
    model = deploy.qdq_model(folded, net, CIFAR)
    values = _initializers(model)
    exits = emit(folded, net.weight_specs, [], Mode(inputs=False))
    simulated = evaluate(exits.graph, [exits.graph.inputs(s.layer)[1] for s in net.weight_specs])
    fixed = passes.fixed_graph(net).params
    dequantizers = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for spec, weight in zip(net.weight_specs, simulated):
        codes, scale = values[f"{spec.layer}_weight_quantized"], values[f"{spec.layer}_weight_scale"]
        assert codes.dtype == np.int8 and np.abs(codes).max() <= 127
        np.testing.assert_array_equal(codes * scale.reshape((-1,) + (1,) * (codes.ndim - 1)), weight)
        axis = [a.i for a in dequantizers[f"{spec.layer}_weight_dequantized"].attribute if a.name == "axis"]
        assert axis == [0]
        bias, step = values[f"{spec.layer}_bias_quantized"], values[f"{spec.layer}_bias_scale"]
        assert bias.dtype == np.int32
        np.testing.assert_array_equal(bias.astype(F32) * step, fixed[f"{spec.layer}_bias_fixed"])
        data_scale = values[f"{spec.layer}_data_scale"]
        assert data_scale == integers.input_step(net.thresholds()[spec.layer], next(
            s for s in net.input_specs if s.layer == spec.layer))
        np.testing.assert_array_equal(step, (scale * data_scale).astype(F32))


def test_first_fused_layer_outputs_are_bit_identical_to_the_simulation(tmp_path):
    """mobilenet0_conv0 runs as QLinearConv in ONNX Runtime; the int8 codes it writes (through its
    ReLU: the input codes of mobilenet0_conv1) equal the simulation's, every one of them."""
    net = _calibrated(MOBILENET, CIFAR)
    first, second = (s.layer for s in net.input_specs[:2])
    folded = net.current_float_graph().cleanup()
    path, optimized = tmp_path / "debug.onnx", tmp_path / "optimized.onnx"
    onnx.save(deploy.qdq_model(folded, net, CIFAR, debug_layers=[first, second]), str(path))
    sess = deploy.session(path, int8_activations=True, optimized_path=optimized)
    # the codes come from the QLinearConv of `first` through its ReLU, which runs on the
    # dequantized codes and is quantized again with the same step (exact for zero point 0)
    producers = {o: n for n in onnx.load(str(optimized)).graph.node for o in n.output}
    chain, tensor = [], f"{second}_data_quantized"
    while tensor in producers and producers[tensor].op_type != "QLinearConv":
        chain.append(producers[tensor].op_type)
        tensor = producers[tensor].input[0]
    assert [op for op in chain if op != "Transpose"] == ["QuantizeLinear", "Relu", "DequantizeLinear"]
    assert tensor in producers and producers[tensor].input[3] == f"{first}_weight_quantized"
    images = _images(CIFAR, 200, seed=3)
    _, ort_in, ort_out = deploy.run(sess, images)
    emission = emit(net.current_float_graph(), net.weight_specs, net.input_specs, Mode(), net.thresholds())
    graph = emission.graph
    graph.set_outputs([graph.inputs(first)[0], graph.inputs(second)[0]]).cleanup()
    sim_in, sim_out = (o.asnumpy() for o in qgraph.to_block(graph)(mx.nd.array(images)))
    steps = {s.layer: integers.input_step(net.thresholds()[s.layer], s) for s in net.input_specs}
    np.testing.assert_array_equal(ort_in, np.rint(sim_in / steps[first]))
    np.testing.assert_array_equal(ort_out, np.rint(sim_out / steps[second]))
    assert np.unique(ort_out).size > 50  # the codes span the grid, not a handful of values


@pytest.mark.parametrize("signed", [True, "auto"])
def test_int8_mnist_agrees_with_simulation(signed, tmp_path):
    net = _calibrated(MNIST_CNN, (1, 1, 28, 28), CONFIG.replace(input_signed=signed), count=256)
    export = deploy.export_int8(net, (1, 1, 28, 28))
    (tmp_path / "m.onnx").write_bytes(export.int8)
    (tmp_path / "f.onnx").write_bytes(export.fp32)
    (_, _), (images, labels) = mnist_split()
    result = deploy.verify(export.folded, tmp_path / "f.onnx", images[:300], labels[:300], net, tmp_path / "m.onnx")
    assert result.fp32_relative <= 1e-5 and result.ok
    assert result.agreement >= 99.0 and abs(result.runtime_top1 - result.simulated_top1) <= 1.0
    assert result.details["QLinearConv"] >= 1 and result.details["QGemm"] == 1


def _two_convs():
    data = mx.sym.var("data")
    a = mx.sym.Convolution(data, num_filter=2, kernel=(1, 1), name="a")
    out = mx.sym.Convolution(a, num_filter=2, kernel=(1, 1), name="b")
    params = {"a_weight": np.eye(2, dtype=F32).reshape(2, 2, 1, 1), "a_bias": np.zeros(2, F32),
              "b_weight": np.eye(2, dtype=F32).reshape(2, 2, 1, 1), "b_bias": np.zeros(2, F32)}
    return qgraph.Graph.from_json(out.tojson(), params, input_names=["data"])


def test_signed_inputs_clip_at_minus_127_as_the_simulation(tmp_path):
    net = passes.quantize(_two_convs(), CONFIG, input_shape=(1, 2, 1, 4))
    net.set_thresholds({"a": 1.0, "b": 1.0})
    folded = net.current_float_graph().cleanup()
    path = tmp_path / "m.onnx"
    onnx.save(deploy.qdq_model(folded, net, (1, 2, 1, 4), debug_layers=["a", "b"]), str(path))
    x = np.array([[[[-5.0, -1.0, -0.5, 3.0]], [[-1.004, 1.0, 0.0, -2.0]]]], F32)
    _, codes_a, codes_b = deploy.run(deploy.session(path, int8_activations=True), x)
    expected = np.array([[[[-127, -127, -64, 127]], [[-127, 127, 0, -127]]]], np.int32)
    np.testing.assert_array_equal(codes_a, expected)
    np.testing.assert_array_equal(codes_b, expected)
    assert net(mx.nd.array(x)).asnumpy().min() == -1.0


def test_a_quantized_layer_without_qdq_writer_is_refused():
    net = passes.quantize(conv_deconv_graph(), CONFIG, input_shape=(1, 1, 4, 4))
    net.set_thresholds({"c": 1.0, "d": 1.0})
    with pytest.raises(GraphError, match=r"node 'd': op Deconvolution is quantized .*--exclude-op Deconvolution"):
        deploy.qdq_model(net.current_float_graph().cleanup(), net, (1, 1, 4, 4))


def test_an_op_without_onnx_mapping_names_node_and_op():
    data = mx.sym.var("data")
    out = mx.sym.FullyConnected(mx.sym.softsign(mx.sym.Convolution(data, num_filter=2, kernel=(1, 1), name="c"),
                                                name="soft"), num_hidden=2, name="f")
    params = {"c_weight": np.ones((2, 1, 1, 1), F32), "c_bias": np.zeros(2, F32), "f_weight": np.ones((2, 8), F32),
              "f_bias": np.zeros(2, F32)}
    graph = qgraph.Graph.from_json(out.tojson(), params, input_names=["data"])
    with pytest.raises(GraphError, match=r"node 'soft': op softsign has no ONNX mapping"):
        deploy.export_fp32(graph, (1, 1, 2, 4))


@pytest.mark.parametrize("changes,flag", [(dict(winograd="F43", winograd_mode="full"), "--wino-mode full"),
                                          (dict(winograd="F23"), "--wino-quantize"),
                                          (dict(weight_bits=4), "--weight-bits-width"),
                                          (dict(rounding="half_away"), "--rounding half_even"),
                                          (dict(quantize_input=False), "--no-quantize-input"),
                                          (dict(layer_overrides={"c": {"input_bits": 4}}), "--layer-config")])
def test_check_config_refuses_what_qdq_cannot_state(changes, flag):
    with pytest.raises(ConfigError, match=flag):
        deploy.check_config(CONFIG.replace(quantize_bias=False, **changes))


def test_missing_onnxruntime_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"onnxruntime is not installed \(pip install onnxruntime"):
        deploy.session(b"")
