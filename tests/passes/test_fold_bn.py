"""fold_bn: numerics against the unfolded graph, skips with reasons, idempotence, trained weights."""
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from helpers import init_params

import passes
import qgraph
from qgraph import PassContext, PassManager
from passes.fold_bn import FoldBN

ROOT = Path(__file__).resolve().parents[2]


def _random_params(symbol, input_shapes, seed):
    return init_params(symbol, input_shapes, seed, bias_std=0.2, var_range=(0.3, 3.0))


def _graph(symbol, input_shape, seed=0):
    shapes = {"data": input_shape}
    params = _random_params(symbol, shapes, seed)
    graph = qgraph.Graph.from_json(symbol.tojson(), params, input_names=["data"])
    graph.input_shapes = shapes
    return graph


def _forward(graph, x):
    return qgraph.to_block(graph)(mx.nd.array(x)).asnumpy()


def _relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _fold(graph):
    return PassManager([FoldBN()]).run(graph)


def _bn(x, name, **kwargs):
    return mx.sym.BatchNorm(x, name=name, **kwargs)


CASES = {
    "conv_no_bias": lambda x: mx.sym.Convolution(x, kernel=(3, 3), num_filter=8, pad=(1, 1), no_bias=True, name="c"),
    "conv_bias": lambda x: mx.sym.Convolution(x, kernel=(3, 3), num_filter=8, name="c"),
    "conv_grouped": lambda x: mx.sym.Convolution(x, kernel=(3, 3), num_filter=8, num_group=2, name="c"),
    "conv_depthwise": lambda x: mx.sym.Convolution(x, kernel=(3, 3), num_filter=4, num_group=4, no_bias=True,
                                                   stride=(2, 2), name="c"),
    "deconv": lambda x: mx.sym.Deconvolution(x, kernel=(2, 2), stride=(2, 2), num_filter=6, name="c"),
    "deconv_grouped_bias": lambda x: mx.sym.Deconvolution(x, kernel=(3, 3), num_filter=6, num_group=2,
                                                          no_bias=False, name="c"),
    "fc": lambda x: mx.sym.FullyConnected(x, num_hidden=7, name="c"),
    "fc_no_bias": lambda x: mx.sym.FullyConnected(x, num_hidden=7, no_bias=True, name="c"),
}


@pytest.mark.parametrize("fix_gamma", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_folded_layer_matches_layer_then_batchnorm(case, fix_gamma):
    data = mx.sym.var("data")
    out = mx.sym.Activation(_bn(CASES[case](data), "bn", fix_gamma=fix_gamma, eps=2e-3), act_type="relu")
    graph = _graph(out, (2, 4, 6, 6))
    x = np.random.RandomState(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    folded, report = _fold(graph)

    assert [(e.node, e.action) for e in report.entries] == [("c", "changed")]
    assert "bn" not in folded and not [n for n in folded.params if n.startswith("bn_")]
    assert _relative_error(_forward(folded, x), _forward(graph, x)) < 1e-5


def test_fold_uses_the_layers_own_eps_and_fix_gamma_against_numpy():
    data = mx.sym.var("data")
    out = _bn(mx.sym.FullyConnected(data, num_hidden=3, name="fc"), "bn", fix_gamma=True, eps=0.5)
    graph = _graph(out, (2, 5))
    folded, _ = _fold(graph)
    w, b = graph.params["fc_weight"].astype(np.float64), graph.params["fc_bias"].astype(np.float64)
    mean, var = graph.params["bn_moving_mean"], graph.params["bn_moving_var"]
    scale = 1.0 / np.sqrt(var + 0.5)  # fix_gamma: gamma is 1 whatever is stored
    np.testing.assert_allclose(folded.params["fc_weight"], w * scale[:, None], rtol=1e-6)
    np.testing.assert_allclose(folded.params["fc_bias"], (b - mean) * scale + graph.params["bn_beta"], rtol=1e-5)


def test_skipped_when_layer_output_has_another_consumer():
    data = mx.sym.var("data")
    conv = mx.sym.Convolution(data, kernel=(1, 1), num_filter=4, name="c")
    out = _bn(conv, "bn") + conv
    graph = _graph(out, (1, 3, 4, 4))
    folded, report = _fold(graph)
    (entry,) = report.entries
    assert entry.action == "skipped" and entry.node == "bn" and "also read by" in entry.reason
    assert "bn" in folded
    x = np.random.RandomState(0).normal(size=(1, 3, 4, 4)).astype(np.float32)
    assert np.array_equal(_forward(folded, x), _forward(graph, x))


def test_skipped_when_batch_statistics_are_used():
    data = mx.sym.var("data")
    bn = mx.sym.BatchNorm(mx.sym.Convolution(data, kernel=(1, 1), num_filter=4, name="c"),
                          output_mean_var=True, name="bn")
    graph = _graph(mx.sym.Group([bn[0], bn[1]]), (1, 3, 4, 4))
    _, report = _fold(graph)
    assert report.entries[0].action == "skipped" and "output 1" in report.entries[0].reason


def test_shared_weight_is_copied_not_overwritten():
    data = mx.sym.var("data")
    weight = mx.sym.var("shared_weight")
    a = _bn(mx.sym.Convolution(data, weight=weight, kernel=(1, 1), num_filter=3, no_bias=True, name="a"), "bna")
    b = _bn(mx.sym.Convolution(data, weight=weight, kernel=(1, 1), num_filter=3, no_bias=True, name="b"), "bnb")
    graph = _graph(a + b, (1, 3, 4, 4))
    folded, report = _fold(graph)
    assert report.modified("fold_bn") and len(report.entries) == 2
    x = np.random.RandomState(0).normal(size=(1, 3, 4, 4)).astype(np.float32)
    assert _relative_error(_forward(folded, x), _forward(graph, x)) < 1e-5


def test_second_run_is_a_no_op():
    data = mx.sym.var("data")
    graph = _graph(_bn(mx.sym.Convolution(data, kernel=(3, 3), num_filter=4, name="c"), "bn"), (1, 3, 5, 5))
    once, _ = _fold(graph)
    twice, report = _fold(once)
    assert not report.modified("fold_bn")
    assert once.to_json() == twice.to_json()


def test_pass_is_registered_and_does_not_touch_its_input():
    data = mx.sym.var("data")
    graph = _graph(_bn(mx.sym.Convolution(data, kernel=(3, 3), num_filter=4, name="c"), "bn"), (1, 3, 5, 5))
    before = graph.to_json()
    PassManager(passes.build_pipeline("fold_bn")).run(graph)
    assert graph.to_json() == before


def test_trained_bundled_model_folds_within_1e4_and_keeps_predictions():
    from qgraph.data import mnist_split
    from qgraph.evaluate import predict

    graph = qgraph.load(ROOT / "models" / "mnist_cnn-symbol.json", input_shape=(1, 1, 28, 28))
    folded, report = PassManager(passes.build_pipeline("fold_bn")).run(graph)
    assert sum(e.action == "changed" for e in report.entries) == 4
    assert not folded.nodes("BatchNorm")
    _, (x_test, _) = mnist_split()
    original_block, folded_block = qgraph.to_block(graph), qgraph.to_block(folded)
    reference = original_block(mx.nd.array(x_test[:500])).asnumpy()
    assert _relative_error(folded_block(mx.nd.array(x_test[:500])).asnumpy(), reference) < 1e-4
    assert np.mean(predict(folded_block, x_test) == predict(original_block, x_test)) > 0.999


def test_context_report_collects_entries_without_pass_manager():
    data = mx.sym.var("data")
    graph = _graph(_bn(mx.sym.Convolution(data, kernel=(3, 3), num_filter=4, name="c"), "bn"), (1, 3, 5, 5))
    ctx = PassContext()
    FoldBN().run(graph, ctx)
    assert ctx.report.modified("fold_bn")
    graph.verify()
