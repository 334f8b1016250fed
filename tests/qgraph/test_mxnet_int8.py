"""qgraph.deploy.mxnet_int8: the ranges handed to MXNet make oneDNN's data steps qgraph's (checked
on MXNet's own quantize_v2), the re-encoded weights give qgraph's codes under oneDNN's weight
scales, every calibration key maps to a tensor with its reader's threshold, residual
convolutions stay out of MXNet's broken sum fusion, and the int8 model agrees with the
simulation and reloads from its files."""
from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN, MOBILENET, RESNET20, conv_deconv_graph

import passes
import qgraph
from qgraph import ConfigError
from qgraph.data import cifar10_arrays, default_cifar10_dir, mnist_split
from qgraph.deploy import integers
from qgraph.deploy import mxnet_int8 as deploy
from qgraph.io import write_files_atomic

F32 = np.float32
CIFAR = (1, 3, 32, 32)
CONFIG = qgraph.QuantConfig(quant_type="channel", input_signed="auto", merge_bn=True, exclude_first_conv=False,
                            online=False, rounding="half_even", quantize_bias=True)


def _calibrated(prefix, shape, images):
    net = passes.quantize(qgraph.load(str(prefix), input_shape=shape), CONFIG)
    net.calibrate(images, "naive", calib_epoch=1, progress=False)
    return net


def _cifar(count):
    if default_cifar10_dir() is not None:
        return cifar10_arrays(default_cifar10_dir(), "test", limit=count)
    return np.random.default_rng(0).standard_normal((count,) + CIFAR[1:]).astype(F32), None


@pytest.mark.parametrize("signed", [True, False])
def test_ranges_make_onednns_data_steps_qgraphs(signed):
    """quantize_v2 with the range R = T * 127.5/127 (T * 255.5/255) has qgraph's step T/127 (T/255)."""
    threshold = 2.7
    levels = 127 if signed else 255
    step = F32(threshold) / F32(levels)
    rng = np.random.default_rng(0)
    x = rng.uniform(-threshold if signed else 0, threshold, 200000).astype(F32)
    top = threshold * deploy.RANGE[signed]
    codes = mx.nd.contrib.quantize_v2(mx.nd.array(x.reshape(1, -1)), out_type="int8" if signed else "uint8",
                                      min_calib_range=-top if signed else 0.0, max_calib_range=top)[0]
    expected = np.clip(np.rint(x / step), -levels if signed else 0, levels)
    # oneDNN multiplies by float32(qr / R) where qgraph divides by T / L: a near-tie may land on
    # the other side (1 value in 200,000 here), never further than one code
    differ = codes.asnumpy().astype(np.float64).ravel() - expected
    assert np.abs(differ).max() <= 1 and np.count_nonzero(differ) <= 5


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_weights_give_qgraphs_codes_under_onednns_weight_scales(seed):
    """oneDNN quantizes a weight with scale 127.5 / max|W_c| (GetWeightScales), rint and
    saturation to int8: the re-encoded weight gives qgraph's codes at (nearly) qgraph's step."""
    graph = qgraph.load(str(MOBILENET), input_shape=CIFAR)
    folded, _ = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(graph)
    layers = folded.nodes("Convolution")[seed::2]
    for layer in layers:
        spec = qgraph.quantizer.weight_spec(folded, layer, 8, "channel", "half_even")
        weight = folded.params[folded.inputs(layer)[1].node]
        encoded, kept = deploy.exact_weight(weight, spec)
        flat = encoded.reshape(len(encoded), -1)
        scale = (F32(127.5) / np.abs(flat).max(axis=1)).astype(F32)
        onednn = np.clip(np.rint(flat * scale[:, None]), -128, 127)
        codes, steps = integers.weight_codes(weight, spec)
        codes = codes.reshape(len(codes), -1).astype(np.float64)
        for channel in kept:
            extreme = np.argmax(np.abs(codes[channel]))
            assert codes[channel, extreme] == -127 and onednn[channel, extreme] == -128
            onednn[channel, extreme] = -127
        np.testing.assert_array_equal(onednn, codes, err_msg=layer)
        np.testing.assert_allclose(F32(1) / scale, steps, rtol=1e-3)
        assert len(kept) <= 2


def test_keys_map_to_tensors_with_their_readers_thresholds():
    images, _ = _cifar(64)
    net = _calibrated(RESNET20, CIFAR, images)
    model = deploy.convert(net, images)
    thresholds, signed = net.thresholds(), {s.layer: s.signed for s in net.input_specs}
    folded = net.current_float_graph().cleanup()
    first = net.input_specs[0].layer
    assert model.tensors["data"] == "data"
    assert model.ranges["data"] == pytest.approx((-thresholds[first] * 127.5 / 127, thresholds[first] * 127.5 / 127))
    requantized = []
    for key, tensor in model.tensors.items():
        readers = [r for r, _ in folded.consumers(qgraph.TensorRef(tensor)) if r in thresholds]
        low, high = model.ranges[key]
        if readers:
            factor = 127.5 / 127 if signed[readers[0]] else 255.5 / 255
            assert high == pytest.approx(thresholds[readers[0]] * factor, rel=1e-6), key
            assert (low < 0) == signed[readers[0]], key
        elif folded.op(tensor) != "FullyConnected":
            requantized.append(tensor)
    # every convolution read by a residual sum is requantized by MXNet for its float readers
    residual = sorted({r.node for n in folded.nodes("elemwise_add") for r in folded.inputs(n)
                       if folded.op(r.node) == "Convolution" and not any(
                           c in thresholds for c, _ in folded.consumers(r))})
    assert sorted(requantized) == residual and len(residual) == 9 + 2
    nodes = json.loads(model.symbol.tojson())["nodes"]
    assert not [n["name"] for n in nodes if n.get("attrs", {}).get("with_sum") == "true"]
    assert not [n["name"] for n in nodes if deploy.UNFUSED in n["name"]]
    final_ops = {n["name"]: n["op"] for n in nodes}
    assert all(final_ops[add] == "elemwise_add" for add in folded.nodes("elemwise_add"))  # float sums


def test_mnist_int8_agrees_with_the_simulation_and_reloads(tmp_path):
    (x_train, _), (x_test, y_test) = mnist_split()
    net = _calibrated(MNIST_CNN, (1, 1, 28, 28), x_train[:256])
    model = deploy.convert(net, x_train[:256])
    ops = {n["op"] for n in json.loads(model.symbol.tojson())["nodes"]}
    assert {"_sg_mkldnn_conv", "_contrib_quantized_pooling", "_sg_mkldnn_fully_connected"} <= ops
    write_files_atomic(model.files(tmp_path / "m"))
    folded = net.current_float_graph().cleanup()
    result = deploy.verify(folded, tmp_path / "m", x_test[:300], y_test[:300], net)
    assert result.fp32_relative <= 1e-5 and result.ok
    assert result.agreement >= 99.0
    loaded = mx.gluon.SymbolBlock.imports(str(tmp_path / "m-symbol.json"), ["data"], str(tmp_path / "m-0000.params"))
    runner = deploy.Int8Runner(model.symbol, model.arg_params, model.aux_params)
    np.testing.assert_array_equal(loaded(mx.nd.array(x_test[:40])).asnumpy(), runner(x_test[:40]))


@pytest.mark.parametrize("changes,flag", [(dict(input_signed=True), "--input-signed auto"),
                                          (dict(quant_type="layer"), "--quant-type channel"),
                                          (dict(rounding="half_away"), "--rounding half_even"),
                                          (dict(winograd="F43", winograd_mode="full"), "--wino-quantize"),
                                          (dict(input_bits=6), "--input-bits-width"),
                                          (dict(layer_overrides={"c": {"input_bits": 4}}), "--layer-config")])
def test_check_config_refuses_what_onednn_does_not_run(changes, flag):
    with pytest.raises(ConfigError, match=flag):
        deploy.check_config(CONFIG.replace(quantize_bias=False, **changes))


def test_a_quantized_layer_without_onednn_kernel_is_refused():
    net = passes.quantize(conv_deconv_graph(), CONFIG, input_shape=(1, 1, 4, 4))
    net.set_thresholds({"c": 1.0, "d": 1.0})
    with pytest.raises(qgraph.GraphError, match=r"node 'd': op Deconvolution has no int8 kernel"):
        deploy.convert(net, np.ones((2, 1, 4, 4), F32))
