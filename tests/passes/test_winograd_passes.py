"""quantize_winograd_weights (weight mode) and lower_winograd_kernel (full mode): which layers they
rewrite, both modes against an independent numpy Winograd
simulation, the float graph against direct convolution on the trained CIFAR-10 model, and the
rewritten graphs through QuantizedNet (modes, calibration, training, export and reload) and the CLI."""
from __future__ import annotations

import argparse
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import passes
import qgraph
from qgraph import Graph, PassManager, QuantConfig
from qgraph.cli import add_quant_args, config_from_args
from qgraph.errors import ConfigError, PassError
from qgraph.graph import TensorRef
from qgraph.pass_manager import PassContext
from qgraph.quantizer import fake_quant_specs
from qgraph.tags import WINOGRAD_PRODUCT_TAG, WINOGRAD_TAG
from qgraph.winograd import matrices, pseudo_inverse

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "cifar_resnet20_v1"
F32 = np.float32


# ---------------------------------------------------------------------- numpy reference
def round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def ref_weight_quant(v, bits, axes):
    levels = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(v).max(axis=axes, keepdims=True) / levels, 1e-30)
    return np.clip(round_half_away(v / scale), -levels, levels) * scale


def ref_input_quant(x, threshold, bits, signed):
    levels = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    scale = max(threshold / levels, 1e-30)
    return round_half_away(np.clip(x, -threshold if signed else 0.0, threshold) / scale) * scale


def ref_conv(x, W, b, pad, groups):
    out = mx.nd.Convolution(mx.nd.array(x), mx.nd.array(W), None if b is None else mx.nd.array(b),
                            kernel=W.shape[2:], pad=(pad, pad), num_filter=W.shape[0], num_group=groups,
                            no_bias=b is None)
    return out.asnumpy().astype(np.float64)


def ref_winograd_weight(W, tile, bits):
    """The seed's mode: Q(G g G^T) per output channel, back with the pseudo-inverse."""
    G, pinv = matrices(tile)[0], pseudo_inverse(tile)
    U = np.einsum("jk,oikl,ml->oijm", G, W.astype(np.float64), G)
    return np.einsum("kj,oijm,lm->oikl", pinv, ref_weight_quant(U, bits, axes=(1, 2, 3)), pinv)


def ref_tiles(x, pad, tile):
    """Input tiles V = B^T d B, shape (N, C, tiles down, tiles across, n, n), float64; the input is
    zero-padded by `pad` and cut into n x n tiles every m pixels, enough to cover the output."""
    G, BT, AT = matrices(tile)
    m, n = AT.shape
    N, C, H, Wd = x.shape
    th, tw = -(-(H + 2 * pad - 2) // m), -(-(Wd + 2 * pad - 2) // m)
    xp = np.zeros((N, C, th * m + 2, tw * m + 2))
    xp[:, :, pad:pad + H, pad:pad + Wd] = x
    d = np.stack([np.stack([xp[:, :, i * m:i * m + n, j * m:j * m + n] for j in range(tw)], axis=2)
                  for i in range(th)], axis=2)
    return np.einsum("ak,nctukl,bl->nctuab", BT, d, BT)


def ref_transformed_weight(W, tile):
    G = matrices(tile)[0]
    return np.einsum("jk,oikl,ml->oijm", G, W.astype(np.float64), G)


def ref_kernel(V, U, b, groups, tile, out_hw, wbits=None, tile_bits=None, tile_threshold=None, per_position=False):
    """The rest of the F(m,3) kernel: V quantized signed (threshold: the batch max|V| unless given),
    U per output channel, products summed over each group's input channels, A^T M A, crop, bias.
    `per_position`: one threshold per tile position (a, b) for V and a scale per (output channel,
    position) for U. Returns (output, the tile threshold)."""
    AT = matrices(tile)[2]
    m, n = AT.shape
    N, C, th, tw = V.shape[:4]
    c_out, c_in_g = U.shape[:2]
    if tile_bits and per_position:
        tile_threshold = np.abs(V).max(axis=(0, 1, 2, 3))  # (n, n)
        V = np.stack([np.stack([ref_input_quant(V[..., a, b], tile_threshold[a, b], tile_bits, True)
                                for b in range(n)], axis=-1) for a in range(n)], axis=-2)
    elif tile_bits:
        tile_threshold = np.abs(V).max() if tile_threshold is None else tile_threshold
        V = ref_input_quant(V, tile_threshold, tile_bits, True)
    if wbits:
        U = ref_weight_quant(U, wbits, axes=(1,) if per_position else (1, 2, 3))
    M = np.einsum("gojab,ngjtuab->ngotuab", U.reshape(groups, c_out // groups, c_in_g, n, n),
                  V.reshape(N, groups, c_in_g, th, tw, n, n)).reshape(N, c_out, th, tw, n, n)
    Y = np.einsum("pa,notuab,qb->notpuq", AT, M, AT).reshape(N, c_out, th * m, tw * m)
    Y = Y[:, :, :out_hw[0], :out_hw[1]]
    return (Y if b is None else Y + b.reshape(1, -1, 1, 1)), tile_threshold


def ref_winograd_conv(x, W, b, pad, groups, tile, wbits=None, xbits=None, x_signed=False, x_threshold=None,
                      tile_threshold=None):
    """The whole kernel in float64 from x and W: Q(x) (threshold: the batch max x or max|x| unless
    given), then ref_tiles and ref_kernel."""
    x = x.astype(np.float64)
    if xbits:
        if x_threshold is None:
            x_threshold = np.abs(x).max() if x_signed else max(x.max(), 0.0)
        x = ref_input_quant(x, x_threshold, xbits, x_signed)
    out_hw = (x.shape[2] + 2 * pad - 2, x.shape[3] + 2 * pad - 2)
    return ref_kernel(ref_tiles(x, pad, tile), ref_transformed_weight(W, tile), b, groups, tile, out_hw,
                      wbits, xbits, tile_threshold)


def run_with_float_domain(graph, x, tile, layer="conv"):
    """The graph's output and its float (unquantized) V and U, in ref_tiles / ref_transformed_weight
    layout. Quantizing the graph's own float32 tiles in the reference keeps a value that float32 and
    float64 round to different sides of a .5 step from failing the comparison."""
    n = matrices(tile)[0].shape[0]
    graph = graph.copy()
    graph.set_outputs(list(graph.outputs) + [TensorRef(f"{layer}_wino_tiles_by_position"),
                                             TensorRef(f"{layer}_wino_u")])
    out, V, U = (o.asnumpy().astype(np.float64) for o in qgraph.to_block(graph)(mx.nd.array(x)))
    N, _, th, tw = V.shape
    V = V.reshape(N, n, n, -1, th, tw).transpose(0, 3, 4, 5, 1, 2)
    U = U.reshape(n, n, -1, U.shape[1]).transpose(2, 3, 0, 1)
    return out, V, U


def check_kernel(graph, x, W, b, pad, groups, tile, wbits=None, xbits=None, x_signed=False, x_threshold=None,
                 tile_threshold=None):
    """Assert that `graph` computes the F(m,3) kernel of its layer 'conv': its float tiles and
    transformed weights are numpy's (from the numpy-quantized x), and its output is ref_kernel's on
    them. Returns (the graph's output, the tile threshold)."""
    got, V, U = run_with_float_domain(graph, x, tile)
    x = x.astype(np.float64)
    if xbits:
        if x_threshold is None:
            x_threshold = np.abs(x).max() if x_signed else max(x.max(), 0.0)
        x = ref_input_quant(x, x_threshold, xbits, x_signed)
    V_ref, U_ref = ref_tiles(x, pad, tile), ref_transformed_weight(W, tile)
    assert V.shape == V_ref.shape and U.shape == U_ref.shape
    assert np.abs(V - V_ref).max() <= 1e-5 * np.abs(V_ref).max()
    assert np.abs(U - U_ref).max() <= 1e-5 * np.abs(U_ref).max()
    out_hw = (x.shape[2] + 2 * pad - 2, x.shape[3] + 2 * pad - 2)
    expected, threshold = ref_kernel(V, U, b, groups, tile, out_hw, wbits, xbits, tile_threshold)
    assert got.shape == expected.shape
    assert _rel(got, expected) < 1e-5
    return got, threshold


# ---------------------------------------------------------------------- tiny graphs
WINOGRAD_PASSES = ("quantize_winograd_weights", "lower_winograd_kernel")


def _conv_graph(c_in=4, c_out=6, groups=1, pad=1, hw=(9, 7), bias=True, seed=0, relu_input=True):
    x = mx.sym.var("data")
    src = mx.sym.relu(x, name="act") if relu_input else x
    conv = mx.sym.Convolution(src, kernel=(3, 3), pad=(pad, pad), num_filter=c_out, num_group=groups,
                              no_bias=not bias, name="conv")
    rng = np.random.default_rng(seed)
    shape = (2, c_in) + hw
    arg_shapes, _, _ = conv.infer_shape(data=shape)
    params = {name: (rng.standard_normal(s) * (0.3 if name.endswith("weight") else 0.1)).astype(F32)
              for name, s in zip(conv.list_arguments(), arg_shapes) if name != "data"}
    graph = Graph.from_json(conv.tojson(), params)
    graph.input_shapes = {"data": shape}
    return graph, shape


def _rewrite(graph, **config):
    config = QuantConfig(**{"exclude_first_conv": False, "quant_type": "channel", **config})
    return PassManager(passes.default_pipeline(config)).run(graph.copy(), config)


def _run(graph, x):
    return qgraph.to_block(graph)(mx.nd.array(x)).asnumpy().astype(np.float64)


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# ---------------------------------------------------------------------- which layers
def test_only_3x3_stride1_dilation1_convolutions_are_rewritten():
    x = mx.sym.var("data")
    first = mx.sym.Convolution(x, kernel=(3, 3), pad=(1, 1), num_filter=8, name="first")
    ok = mx.sym.Convolution(mx.sym.relu(first), kernel=(3, 3), pad=(1, 1), num_filter=8, name="ok")
    strided = mx.sym.Convolution(ok, kernel=(3, 3), stride=(2, 2), pad=(1, 1), num_filter=8, name="strided")
    dilated = mx.sym.Convolution(strided, kernel=(3, 3), dilate=(2, 2), pad=(2, 2), num_filter=8, name="dilated")
    point = mx.sym.Convolution(dilated, kernel=(1, 1), num_filter=8, name="point")
    five = mx.sym.Convolution(point, kernel=(5, 5), pad=(2, 2), num_filter=8, name="five")
    deconv = mx.sym.Deconvolution(five, kernel=(3, 3), pad=(1, 1), num_filter=8, name="deconv")
    depthwise = mx.sym.Convolution(deconv, kernel=(3, 3), pad=(1, 1), num_filter=8, num_group=8, name="depthwise")
    fc = mx.sym.FullyConnected(depthwise, num_hidden=3, name="fc")
    shape = (1, 3, 8, 8)
    arg_shapes, _, _ = fc.infer_shape(data=shape)
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal(s).astype(F32) for n, s in zip(fc.list_arguments(), arg_shapes) if n != "data"}
    graph = Graph.from_json(fc.tojson(), params)
    graph.input_shapes = {"data": shape}
    entries = {}
    for mode, pass_name in (("weight", "quantize_winograd_weights"), ("full", "lower_winograd_kernel")):
        config = QuantConfig(winograd="F43", quant_type="channel", winograd_mode=mode)
        _, report = PassManager(passes.default_pipeline(config)).run(graph, config)
        entries = {e.node: (e.action, e.reason) for e in report.for_pass(pass_name)}
        _check_layer_choice(entries)


def _check_layer_choice(entries):
    assert entries["ok"][0] == "changed" and "F43" in entries["ok"][1]
    assert entries["depthwise"][0] == "changed"
    assert entries["first"] == ("skipped", "excluded (first convolution)")
    assert entries["strided"] == ("skipped", "stride (2, 2) is not 1")
    assert entries["dilated"] == ("skipped", "dilation (2, 2) is not 1")
    assert entries["point"] == ("skipped", "kernel (1, 1) is not 3x3")
    assert entries["five"] == ("skipped", "kernel (5, 5) is not 3x3")
    assert entries["deconv"] == ("skipped", "Deconvolution is not a Convolution")
    assert entries["fc"] == ("skipped", "FullyConnected is not a Convolution")


@pytest.mark.parametrize("name", WINOGRAD_PASSES)
def test_pass_needs_a_tile_and_insert_fake_quant(name):
    graph, _ = _conv_graph()
    with pytest.raises(ConfigError, match=f"{name} needs"):
        passes.get_pass(name).run(graph, PassContext(QuantConfig()))
    with pytest.raises((ConfigError, PassError), match="insert_fake_quant"):
        PassManager(passes.build_pipeline(name)).run(graph, QuantConfig(winograd="F23"))


def test_default_pipeline_includes_the_pass_of_the_mode_only_when_a_tile_is_set():
    names = [p.name for p in passes.default_pipeline(QuantConfig())]
    assert not set(WINOGRAD_PASSES) & set(names)
    names = [p.name for p in passes.default_pipeline(QuantConfig(winograd="F63", winograd_mode="full"))]
    assert names[-2:] == ["insert_fake_quant", "lower_winograd_kernel"]
    names = [p.name for p in passes.default_pipeline(QuantConfig(winograd="F63"))]
    assert names[-2:] == ["insert_fake_quant", "quantize_winograd_weights"]


@pytest.mark.parametrize("field, value", [("winograd", "F33"), ("winograd", None), ("winograd_mode", "both")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**{field: value})


@pytest.mark.parametrize("mode", ["weight", "full"])
def test_second_run_changes_nothing(mode):
    graph, _ = _conv_graph()
    config = QuantConfig(winograd="F23", winograd_mode=mode, exclude_first_conv=False)
    once, _ = PassManager(passes.default_pipeline(config)).run(graph, config)
    ctx = PassContext(config)
    name = WINOGRAD_PASSES[mode == "full"]
    twice = passes.get_pass(name).run(once.copy(), ctx)
    assert not ctx.report.modified(name)
    assert sorted(twice.nx.nodes) == sorted(once.nx.nodes)


# ---------------------------------------------------------------------- numerics against numpy
@pytest.mark.parametrize("tile", ["F23", "F43", "F63"])
@pytest.mark.parametrize("groups, c_in, c_out", [(1, 4, 6), (2, 4, 6), (4, 4, 4)])
def test_weight_mode_matches_numpy(tile, groups, c_in, c_out):
    graph, shape = _conv_graph(c_in=c_in, c_out=c_out, groups=groups)
    rewritten, report = _rewrite(graph, winograd=tile, quantize_input=False)
    (spec,) = fake_quant_specs(rewritten)
    assert spec.winograd == tile and spec.kind == "weight"
    x = np.random.default_rng(1).standard_normal(shape).astype(F32)
    W, b = graph.params["conv_weight"], graph.params["conv_bias"]
    expected = ref_conv(np.maximum(x, 0), ref_winograd_weight(W, tile, 8).astype(F32), b, 1, groups)
    got = _run(rewritten, x)
    assert _rel(got, expected) < 1e-5
    # and Winograd-domain quantization is not the direct one
    assert _rel(ref_conv(np.maximum(x, 0), W, b, 1, groups), expected) > 1e-4


@pytest.mark.parametrize("tile", ["F23", "F43", "F63"])
@pytest.mark.parametrize("groups, c_in, c_out, pad, hw", [(1, 4, 6, 1, (9, 7)), (2, 4, 6, 0, (10, 8)),
                                                          (4, 4, 4, 1, (6, 6))])
def test_full_mode_matches_numpy(tile, groups, c_in, c_out, pad, hw):
    graph, shape = _conv_graph(c_in=c_in, c_out=c_out, groups=groups, pad=pad, hw=hw)
    rewritten, _ = _rewrite(graph, winograd=tile, winograd_mode="full", input_signed=False)
    x = np.random.default_rng(2).standard_normal(shape).astype(F32)
    W, b = graph.params["conv_weight"], graph.params["conv_bias"]
    relu = np.maximum(x, 0)
    got, _ = check_kernel(rewritten, relu, W, b, pad, groups, tile, wbits=8, xbits=8)
    assert got.shape == ref_conv(relu, W, b, pad, groups).shape
    # the reference is sensitive: the float Winograd result is far from the quantized one
    float_winograd, _ = ref_winograd_conv(relu, W, b, pad, groups, tile)
    assert _rel(float_winograd, got) > 1e-3
    assert _rel(float_winograd, ref_conv(relu, W, b, pad, groups)) < 1e-5


@pytest.mark.parametrize("tile", ["F23", "F43"])
def test_tile_scales_match_numpy(tile):
    """winograd_scales='tile': a threshold per tile position for V, a scale per (channel, position) for U."""
    graph, shape = _conv_graph(c_in=4, c_out=6, groups=1, pad=1, hw=(9, 7))
    rewritten, _ = _rewrite(graph, winograd=tile, winograd_mode="full", input_signed=False, winograd_scales="tile")
    n = matrices(tile)[0].shape[0]
    specs = fake_quant_specs(rewritten)
    assert sum(s.kind == "input" and s.layer.startswith("conv_wino_tile") for s in specs) == n * n
    x = np.random.default_rng(8).standard_normal(shape).astype(F32)
    W, b = graph.params["conv_weight"], graph.params["conv_bias"]
    relu = np.maximum(x, 0)
    got, V, U = run_with_float_domain(rewritten, ref_input_quant(relu, relu.max(), 8, False).astype(F32), tile)
    expected, _ = ref_kernel(V, U, b, 1, tile, got.shape[2:], wbits=8, tile_bits=8, per_position=True)
    channel, _ = ref_kernel(V, U, b, 1, tile, got.shape[2:], wbits=8, tile_bits=8)
    assert _rel(got, expected) < 1e-5 < _rel(channel, expected)  # and the per-channel kernel differs


def test_tile_scales_need_a_full_mode_kernel():
    with pytest.raises(ConfigError, match="winograd_scales='tile'"):
        QuantConfig(winograd_scales="tile")
    with pytest.raises(ConfigError, match="winograd_scales='tile'"):
        QuantConfig(winograd="F43", winograd_mode="weight", winograd_scales="tile")


@pytest.mark.parametrize("tile", ["F23", "F63"])
def test_full_mode_quantizes_weights_alone_when_inputs_are_not_quantized(tile):
    graph, shape = _conv_graph(bias=False)
    rewritten, _ = _rewrite(graph, winograd=tile, winograd_mode="full", quantize_input=False)
    assert [s.kind for s in fake_quant_specs(rewritten)] == ["weight"]
    x = np.maximum(np.random.default_rng(3).standard_normal(shape).astype(F32), 0)
    check_kernel(rewritten, x, graph.params["conv_weight"], None, 1, 1, tile, wbits=8)


def test_full_mode_structure_is_tagged_and_uses_no_parameters():
    graph, _ = _conv_graph()
    rewritten, report = _rewrite(graph, winograd="F43", winograd_mode="full")
    assert "conv" not in rewritten
    assert set(rewritten.params) == {"conv_weight", "conv_bias"}
    structural = [n for n in rewritten.nodes(("Convolution", "Deconvolution")) if WINOGRAD_TAG in rewritten.attrs(n)]
    assert sorted(structural) == ["conv_wino_in_rows", "conv_wino_in_tiles", "conv_wino_out_pixels"]
    assert rewritten.attrs("conv_wino_product")[WINOGRAD_PRODUCT_TAG] == "conv"
    specs = {(s.layer, s.kind): s for s in fake_quant_specs(rewritten)}
    assert set(specs) == {("conv_wino_pad", "input"), ("conv_wino_product", "input"), ("conv_wino_product", "weight")}
    assert specs["conv_wino_product", "input"].signed
    assert specs["conv_wino_product", "weight"].shape == (36 * 6, 4, 1, 1)


# ---------------------------------------------------------------------- the trained model
def _resnet_graph():
    if not (RESNET.parent / "cifar_resnet20_v1-symbol.json").is_file():
        pytest.skip("models/cifar_resnet20_v1 is not in the repository")
    return qgraph.load_files(RESNET.parent / "cifar_resnet20_v1-symbol.json",
                             RESNET.parent / "cifar_resnet20_v1-0000.params", input_names=["data"])


def _cifar_batch(n=16):
    from qgraph.data import cifar10_arrays, default_cifar10_dir

    folder = default_cifar10_dir()
    if folder is not None and Path(folder, "cifar10_test.rec").is_file():
        images, _ = cifar10_arrays(folder, "test", limit=n)
        return np.asarray(images[:n], dtype=F32)
    # no data here: normalised noise still exercises every layer of the trained model
    return np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(F32)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weight", "full"])
def test_disabled_quantization_matches_direct_convolution_on_the_trained_model(mode):
    graph = _resnet_graph()
    x = mx.nd.array(_cifar_batch())
    direct = qgraph.to_block(graph)(x).asnumpy()
    for tile in ("F23", "F43", "F63"):
        config = QuantConfig(winograd=tile, winograd_mode=mode, quant_type="channel", input_signed="auto")
        net = passes.quantize(graph.copy(), config)
        entries = net.report.for_pass(WINOGRAD_PASSES[mode == "full"])
        # 19 3x3 convolutions: the first is excluded, two have stride 2; the 1x1 shortcuts are skipped
        assert sum(e.action == "changed" for e in entries) == 16
        assert sum(e.reason == "stride (2, 2) is not 1" for e in entries) == 2
        quantized = net(x).asnumpy()
        net.disable_quantize()
        disabled = net(x).asnumpy()
        assert _rel(disabled, direct) < 1e-4, tile
        assert _rel(quantized, direct) > 1e-4  # quantization is on by default and changes the logits


# ---------------------------------------------------------------------- QuantizedNet
def test_quantized_net_switches_weights_and_tiles_independently():
    graph, shape = _conv_graph()
    rewritten, _ = _rewrite(graph, winograd="F43", winograd_mode="full", input_signed=False)
    net = qgraph.QuantizedNet(rewritten)
    x = np.random.default_rng(4).standard_normal(shape).astype(F32)
    W, b = graph.params["conv_weight"], graph.params["conv_bias"]
    relu = np.maximum(x, 0)
    cases = {(True, True): dict(wbits=8, xbits=8), (True, False): dict(wbits=8), (False, True): dict(xbits=8),
             (False, False): {}}
    for (weights, inputs), quant in cases.items():
        net.mode = net.mode.replace(weights=weights, inputs=inputs)
        got, _ = check_kernel(net.current_graph(training=False), relu, W, b, 1, 1, "F43", **quant)
        assert _rel(net(mx.nd.array(x)).asnumpy(), got) < 1e-6, (weights, inputs)


def test_offline_tile_thresholds_calibrate_and_reload(tmp_path):
    graph, shape = _conv_graph(hw=(8, 8))
    rewritten, _ = _rewrite(graph, winograd="F23", winograd_mode="full", online=False, input_signed=False)
    assert rewritten.params["conv_wino_pad_data_threshold"].tolist() == [0.0]
    assert rewritten.params["conv_wino_product_data_threshold"].tolist() == [0.0]
    net = qgraph.QuantizedNet(rewritten)
    rng = np.random.default_rng(6)
    calib = rng.standard_normal((32,) + shape[1:]).astype(F32)
    result = net.calibrate(calib, "naive", calib_epoch=1, batch_size=32, progress=False)
    assert set(result) == {"conv_wino_pad", "conv_wino_product"}
    # one batch of 32: the naive EMA starts from that batch, so T is its max
    W, b = graph.params["conv_weight"], graph.params["conv_bias"]
    tile_top = np.abs(ref_tiles(ref_input_quant(np.maximum(calib, 0).astype(np.float64), np.maximum(calib, 0).max(),
                                                8, False), 1, "F23")).max()
    np.testing.assert_allclose(result["conv_wino_product"]["threshold"], tile_top, rtol=1e-5)
    np.testing.assert_allclose(result["conv_wino_pad"]["threshold"], np.maximum(calib, 0).max(), rtol=1e-6)
    assert result["conv_wino_product"]["signed"] and not result["conv_wino_pad"]["signed"]

    x = rng.standard_normal(shape).astype(F32)
    offline = net(mx.nd.array(x)).asnumpy()
    relu = np.maximum(x, 0)
    expected, _ = check_kernel(net.current_graph(training=False), relu, W, b, 1, 1, "F23", wbits=8, xbits=8,
                               x_threshold=float(result["conv_wino_pad"]["threshold"]),
                               tile_threshold=float(result["conv_wino_product"]["threshold"]))
    assert _rel(offline, expected) < 1e-6
    online, _ = ref_winograd_conv(relu, W, b, 1, 1, "F23", wbits=8, xbits=8)
    assert _rel(online, expected) > 1e-3  # the stored thresholds are used, not the batch's

    for method in ("kl", "percentile"):
        thresholds = net.calibrate(calib, method, progress=False)
        assert all(v["threshold"] > 0 for v in thresholds.values())

    net.export(tmp_path / "wino")
    again = qgraph.QuantizedNet.load(tmp_path / "wino")
    assert again.thresholds() == pytest.approx(net.thresholds())
    np.testing.assert_allclose(again(mx.nd.array(x)).asnumpy(), net(mx.nd.array(x)).asnumpy(), rtol=1e-6, atol=1e-6)
    again.disable_quantize()
    np.testing.assert_allclose(again(mx.nd.array(x)).asnumpy(), ref_conv(relu, W, b, 1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["weight", "full"])
def test_training_step_updates_the_weights_through_the_winograd_graph(mode):
    graph, shape = _conv_graph()
    rewritten, _ = _rewrite(graph, winograd="F43", winograd_mode=mode)
    net = qgraph.QuantizedNet(rewritten)
    params = net.collect_params()
    # the Winograd matrices are operators, not parameters: only the layer's own are trained
    assert {n for n, p in params.items() if p.grad_req != "null"} == {"conv_weight", "conv_bias"}
    trainer = mx.gluon.Trainer(params, "sgd", {"learning_rate": 0.1, "wd": 1e-4})
    x = mx.nd.array(np.random.default_rng(7).standard_normal(shape).astype(F32))
    before = params["conv_weight"].data().asnumpy().copy()
    with autograd.record():
        loss = (net(x) ** 2).mean()
    loss.backward()
    grad = params["conv_weight"].grad().asnumpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    trainer.step(1)
    assert not np.array_equal(params["conv_weight"].data().asnumpy(), before)


# ---------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv, tile, mode", [
    ([], "none", "weight"),
    (["--wino_quantize", "F43"], "F43", "weight"),
    (["--wino-quantize", "F63", "--wino-mode", "full"], "F63", "full"),
])
def test_flags_become_config(argv, tile, mode):
    parser = argparse.ArgumentParser()
    add_quant_args(parser)
    config = config_from_args(parser.parse_args(argv))
    assert (config.winograd, config.winograd_mode) == (tile, mode)


@pytest.mark.parametrize("argv", [["--wino_quantize", "F33"], ["--wino-mode", "both"]])
def test_bad_flags_are_rejected(argv, capsys):
    parser = argparse.ArgumentParser(prog="tool")
    add_quant_args(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_quantize_symbol_writes_a_full_mode_graph(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "mnist-wino"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "quantize_symbol.py"),
                             str(ROOT / "models" / "mnist_cnn-symbol.json"), "--out", str(out),
                             "--wino-quantize", "F43", "--wino-mode", "full", "--quant-type", "channel"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lower_winograd_kernel:" in result.stdout and "F43 Winograd kernel" in result.stdout
    net = qgraph.QuantizedNet.load(out)
    assert any(s.layer.endswith("_wino_product") for s in net.input_specs)
