"""qgraph.deploy.ncnn against the real ncnn runtime and independent numpy readings of the files."""
from __future__ import annotations

import re
import struct

import mxnet as mx
import numpy as np
import pytest

import passes
import qgraph
from qgraph.data import cifar10_arrays, default_cifar10_dir, mnist_split
from qgraph.deploy import ncnn as deploy
from qgraph.errors import GraphError

pytest.importorskip("ncnn")

MODELS = {"mnist_cnn": (1, 1, 28, 28), "cifar_resnet20_v1": (1, 3, 32, 32), "mobilenet0.5_cifar10": (1, 3, 32, 32)}
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def folded(name):
    graph = qgraph.load(str(ROOT / "models" / name), input_shape=MODELS[name])
    graph, _ = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(graph, qgraph.QuantConfig())
    return graph


def runner(model, prefix, int8=False):
    param, binary = model.save(prefix)
    options = dict(deploy.FLOAT32_OPTIONS, use_int8_inference=int8)
    return deploy.NcnnRunner(param, binary, output_name=model.outputs[0], options=options)


def mxnet_outputs(graph, images):
    return qgraph.to_block(graph)(mx.nd.array(images)).asnumpy()


def round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


# ---------------------------------------------------------------------- FP32
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp32_ncnn_matches_mxnet(name, tmp_path):
    graph = folded(name)
    images = np.random.default_rng(1).standard_normal((6,) + MODELS[name][1:]).astype(np.float32)
    ours = runner(deploy.to_ncnn(graph), tmp_path / name)(images)
    ref = mxnet_outputs(graph, images)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (ours.argmax(1) == ref.argmax(1)).all()


def test_param_file_structure(tmp_path):
    """Header counts match, each blob has one producer and at most one reader (Split fans out),
    and every layer's .bin arrays add up to the file size."""
    model = deploy.to_ncnn(folded("cifar_resnet20_v1"))
    lines = model.param.splitlines()
    assert lines[0] == "7767517"
    n_layers, n_blobs = map(int, lines[1].split())
    producers, readers = {}, {}
    for line in lines[2:]:
        kind, name, nb, nt, *rest = line.split()
        bottoms, tops = rest[:int(nb)], rest[int(nb):int(nb) + int(nt)]
        assert all(re.fullmatch(r"-?\d+=\S+", p) for p in rest[int(nb) + int(nt):])
        for blob in tops:
            assert blob not in producers
            producers[blob] = name
        for blob in bottoms:
            assert blob in producers, f"{name} reads {blob} before it is made"
            readers.setdefault(blob, []).append(name)
    assert n_layers == len(lines) - 2 and n_blobs == len(producers)
    assert all(len(r) == 1 for r in readers.values())
    assert sum(line.startswith("Split") for line in lines) == 9  # one per residual branch point
    sizes = sum(4 * layer_tagged + arr.nbytes for layer in model.layers
                for layer_tagged, arr in layer.arrays)
    assert len(model.bin) == sizes


def test_batchnorm_must_be_folded():
    graph = qgraph.load(str(ROOT / "models" / "mnist_cnn"), input_shape=MODELS["mnist_cnn"])
    with pytest.raises(GraphError, match=r"mnistcnn_batchnorm0_fwd.*BatchNorm.*fold_bn"):
        deploy.to_ncnn(graph)


def test_unsupported_op_names_node_and_op():
    data = mx.sym.var("data")
    conv = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), name="conv")
    out = mx.sym.Deconvolution(conv, num_filter=2, kernel=(2, 2), name="up")
    rng = np.random.default_rng(0)
    params = {"conv_weight": rng.standard_normal((4, 3, 3, 3)).astype("f4"), "conv_bias": np.zeros(4, "f4"),
              "up_weight": rng.standard_normal((4, 2, 2, 2)).astype("f4")}
    graph = qgraph.Graph.from_json(out.tojson(), params)
    with pytest.raises(GraphError, match=r"node 'up': op Deconvolution cannot be written for ncnn"):
        deploy.to_ncnn(graph, (1, 3, 8, 8))


def test_missing_input_shape_is_an_error():
    graph = folded("mnist_cnn")
    graph.input_shapes = {}
    with pytest.raises(qgraph.ConfigError, match="input shape"):
        deploy.to_ncnn(graph)


def test_runner_missing_file(tmp_path):
    with pytest.raises(GraphError, match="no such ncnn model file"):
        deploy.NcnnRunner(tmp_path / "x.param", tmp_path / "x.bin")


# ---------------------------------------------------------------------- table
def test_table_format_and_values():
    graph = folded("mnist_cnn")
    layers = graph.nodes(("Convolution", "FullyConnected"))
    thresholds = {layer: 0.5 + i for i, layer in enumerate(layers)}
    text = deploy.calibration_table(graph, thresholds).format()
    lines = text.splitlines()
    assert [l.split()[0] for l in lines] == [f"{l}_param_0" for l in layers] + layers
    assert all(re.fullmatch(r"\S+( \d+\.\d{6})+ ", line) for line in lines)
    parsed = deploy.Table.parse(text)
    for layer in layers:
        weight = graph.params[graph.inputs(layer)[1].node].astype(np.float64)
        group = int(graph.attrs(layer).get("num_group", "1"))
        # depthwise: one scale per group (= per channel here); otherwise one per output channel
        rows = weight.reshape(group if group > 1 else weight.shape[0], -1)
        expected = 127.0 / np.abs(rows).max(axis=1)
        np.testing.assert_allclose(parsed.weights[layer], expected, rtol=1e-6, atol=1e-6)
        assert parsed.inputs[layer] == pytest.approx(127.0 / thresholds[layer], rel=1e-6, abs=1e-6)
    assert graph.attrs("mnistcnn_conv1_fwd")["num_group"] == "16"


def test_table_rejects_bad_thresholds():
    graph = folded("mnist_cnn")
    with pytest.raises(GraphError, match="mnistcnn_relu0_fwd"):
        deploy.calibration_table(graph, {"mnistcnn_relu0_fwd": 1.0})
    with pytest.raises(GraphError, match="positive"):
        deploy.calibration_table(graph, {"mnistcnn_conv0_fwd": 0.0})
    with pytest.raises(GraphError, match="line|table:2"):
        deploy.Table.parse("a_param_0 1.0\nb x\n")


def test_int8_bin_holds_ncnn2int8_weights():
    """Read the int8 .bin back by hand: for each layer in .param order, a 4-byte int8 tag, the
    int8 weights round(W * s) (padded to 4 bytes), the float bias, the scales."""
    graph = folded("mnist_cnn")
    layers = graph.nodes(("Convolution", "FullyConnected"))
    table = deploy.Table.parse(deploy.calibration_table(graph, {l: 2.0 for l in layers}).format())
    model = deploy.to_ncnn(graph, table=table)
    blob, offset = model.bin, 0
    for line in model.param.splitlines()[2:]:
        kind, name = line.split()[:2]
        if kind not in ("Convolution", "ConvolutionDepthWise", "InnerProduct"):
            continue
        params = dict(p.split("=") for p in line.split() if "=" in p)
        assert params["8"] == ("1" if kind == "ConvolutionDepthWise" else "2")
        weight = graph.params[graph.inputs(name)[1].node]
        tag, = struct.unpack_from("<I", blob, offset)
        assert tag == 0x000D4B38
        q = np.frombuffer(blob, np.int8, weight.size, offset + 4)
        scales = table.weights[name].astype(np.float32)
        expected = np.clip(round_half_away(weight.reshape(len(scales), -1).astype(np.float32) * scales[:, None]),
                           -127, 127).reshape(-1)
        np.testing.assert_array_equal(q, expected)
        offset += 4 + weight.size + (-weight.size % 4)
        n_out = weight.shape[0]
        bias = np.frombuffer(blob, "<f4", n_out, offset)
        np.testing.assert_array_equal(bias, graph.params[graph.inputs(name)[2].node])
        offset += 4 * n_out
        np.testing.assert_array_equal(np.frombuffer(blob, "<f4", len(scales), offset), scales)
        offset += 4 * len(scales)
        assert np.frombuffer(blob, "<f4", 1, offset)[0] == np.float32(table.inputs[name])
        offset += 4
    assert offset == len(blob)


# ---------------------------------------------------------------------- int8 against the simulation
def simulated(graph, images, exclude_first_conv):
    config = qgraph.QuantConfig(quant_type="channel", input_signed=True, merge_bn=True,
                                exclude_first_conv=exclude_first_conv, online=False)
    net = passes.quantize(graph, config)
    net.calibrate(images, "naive", calib_epoch=1, progress=False)
    return net


def int8_vs_simulation(graph, net, images, tmp_path):
    table = deploy.Table.parse(deploy.calibration_table(graph, net.thresholds()).format())
    ours = runner(deploy.to_ncnn(graph, table=table), tmp_path / "int8", int8=True)(images)
    sim = net(mx.nd.array(images)).asnumpy()
    return ours, sim, table


@pytest.mark.parametrize("exclude_first_conv", [False, True])
def test_int8_mnist_agrees_with_simulation(exclude_first_conv, tmp_path):
    (x_train, _), (x_test, y_test) = mnist_split()
    graph = folded("mnist_cnn")
    net = simulated(graph, x_train[:256], exclude_first_conv)
    images, labels = x_test[:300], y_test[:300]
    ours, sim, table = int8_vs_simulation(graph, net, images, tmp_path)
    assert ("mnistcnn_conv0_fwd" in table.inputs) is not exclude_first_conv
    agreement = (ours.argmax(1) == sim.argmax(1)).mean()
    assert agreement >= 0.99
    # int8 noise is real: ncnn int8 is not the float model, but it is the simulation
    fp = mxnet_outputs(graph, images)
    assert np.abs(ours - sim).mean() < 0.25 * np.abs(ours - fp).mean()
    assert abs((ours.argmax(1) == labels).mean() - (sim.argmax(1) == labels).mean()) <= 0.01


@pytest.mark.skipif(default_cifar10_dir() is None, reason="CIFAR-10 RecordIO not found at ../shared/data/cifar10")
def test_int8_cifar_resnet20_agrees_with_simulation(tmp_path):
    images, labels = cifar10_arrays(default_cifar10_dir(), "test", limit=300)
    graph = folded("cifar_resnet20_v1")
    net = simulated(graph, images[:128], exclude_first_conv=False)
    ours, sim, _ = int8_vs_simulation(graph, net, images, tmp_path)
    assert (ours.argmax(1) == sim.argmax(1)).mean() >= 0.99
    assert abs((ours.argmax(1) == labels).mean() - (sim.argmax(1) == labels).mean()) <= 0.01


def test_layer_granularity_repeats_one_scale():
    graph = folded("mnist_cnn")
    table = deploy.calibration_table(graph, {"mnistcnn_conv2_fwd": 1.0}, granularity="layer")
    weight = graph.params[graph.inputs("mnistcnn_conv2_fwd")[1].node]
    np.testing.assert_allclose(table.weights["mnistcnn_conv2_fwd"], np.full(32, 127.0 / np.abs(weight).max()),
                               rtol=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_depthwise_int8_against_exact_integer_arithmetic(packing, tmp_path):
    """ncnn's x86 depthwise int8 layer, read against numpy's exact int32 sum * 1/(s_in * s_w) + bias.
    Unpacked it is exact; with the default packing layout (8 channels a pack) it dequantizes with
    _mm_rcp_ps, an approximate reciprocal (relative error up to 1.5 * 2^-12), which is why its
    outputs, and the codes of the next layer's input, drift from the simulation."""
    import ncnn

    graph = folded("mnist_cnn")
    layer, source = "mnistcnn_conv1_fwd", "mnistcnn_pool0_fwd"
    layers = graph.nodes(("Convolution", "FullyConnected"))
    table = deploy.Table.parse(deploy.calibration_table(graph, {l: 2.0 for l in layers}).format())
    param, binary = deploy.to_ncnn(graph, table=table).save(tmp_path / "m")
    net = ncnn.Net()
    for key, value in dict(deploy.FLOAT32_OPTIONS, use_int8_inference=True, use_packing_layout=packing).items():
        setattr(net.opt, key, value)
    net.load_param(str(param))
    net.load_model(str(binary))
    (_, _), (x_test, _) = mnist_split()
    weight = graph.params[graph.inputs(layer)[1].node]
    bias = graph.params[graph.inputs(layer)[2].node].astype(np.float64)
    w_scale, in_scale = table.weights[layer], np.float32(table.inputs[layer])
    q_weight = np.clip(round_half_away(weight.reshape(16, 9) * w_scale[:, None]), -127, 127).reshape(16, 3, 3)
    worst = 0.0
    for image in x_test[:4]:
        extractor = net.create_extractor()
        extractor.input("data", ncnn.Mat(np.ascontiguousarray(image)))
        x = np.array(extractor.extract(source)[1]).reshape(16, 14, 14)
        out = np.array(extractor.extract(layer)[1]).reshape(16, 14, 14)
        q_x = np.pad(np.clip(round_half_away(x * in_scale), -127, 127), ((0, 0), (1, 1), (1, 1)))
        acc = sum(q_x[:, i:i + 14, j:j + 14] * q_weight[:, i, j, None, None] for i in range(3) for j in range(3))
        exact = acc / (np.float64(in_scale) * w_scale.astype(np.float64))[:, None, None] + bias[:, None, None]
        worst = max(worst, np.abs(out - exact).max() / np.abs(exact).max())
    if packing:
        assert 1e-6 < worst < 1e-3
    else:
        assert worst < 1e-6
