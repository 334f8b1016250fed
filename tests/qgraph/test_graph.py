"""Graph IR: exact round trips (JSON, files, blocks), the edit verbs, and what verify() catches."""
from __future__ import annotations

import json
import os

import mxnet as mx
import numpy as np
import pytest
from helpers import EVERYTHING_HEADS, graph_of, run_block, run_graph, run_symbol

import qgraph
from qgraph import Graph, GraphError, QGraphError, TensorRef


def _mxnet_symbol_block(symbol, params: dict, aux_names):
    """A SymbolBlock built by MXNet alone (no qgraph code) from a symbol and bare-named params."""
    block = mx.gluon.SymbolBlock(symbol, [mx.sym.var("data")])
    arrays = {("aux:" if k in aux_names else "arg:") + k: mx.nd.array(v) for k, v in params.items()}
    block.collect_params().load_dict(arrays, ctx=mx.cpu())
    return block


def _assert_bit_exact(expected: list, actual: list):
    assert len(expected) == len(actual)
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert e.shape == a.shape, f"output {i}"
        assert np.array_equal(e, a), f"output {i}: max |diff| {np.abs(e - a).max()}"


def _assert_nontrivial(outputs: list):
    for i, out in enumerate(outputs):
        assert np.isfinite(out).all() and out.std() > 1e-3, f"output {i} is degenerate: std {out.std()}"


# ---------------------------------------------------------------------------------- round trips
def test_json_round_trip_reproduces_mxnet_json(everything):
    graph = Graph.from_json(everything.json, everything.params)
    original, emitted = json.loads(everything.json), json.loads(graph.to_json())
    assert emitted["nodes"] == original["nodes"]  # names, ops, attrs, inputs with versions, order
    assert emitted["heads"] == original["heads"]
    assert emitted["arg_nodes"] == original["arg_nodes"]
    assert emitted["attrs"] == original["attrs"]


def test_round_trip_keeps_heads_aux_states_and_entry_versions(everything):
    graph = Graph.from_json(everything.json, everything.params)
    again = mx.sym.load_json(Graph.from_json(graph.to_json(), graph.params).to_json())
    assert again.list_outputs() == everything.symbol.list_outputs() == [
        "fc_output", "split_output1", "bn2_output", "pool_output"]
    assert [(r.node, r.index) for r in graph.outputs] == list(EVERYTHING_HEADS)
    assert again.list_arguments() == everything.symbol.list_arguments()
    assert again.list_auxiliary_states() == everything.symbol.list_auxiliary_states()
    assert graph.aux_names() == set(everything.aux_names) == {
        f"{bn}_moving_{s}" for bn in ("bn1", "bn2", "bn3") for s in ("mean", "var")}
    # MXNet marks the mutated inputs of BatchNorm (running mean/var) with entry version 1
    assert [r.version for r in graph.inputs("bn1")] == [0, 0, 0, 1, 1]
    assert graph.input_names == ["data"]
    assert set(graph.params) == set(everything.params)
    for node in everything.symbol.get_internals().list_outputs():
        name = node[: -len("_output")] if node.endswith("_output") else node
        if name in graph:
            assert graph.attrs(name) == everything.symbol.get_internals()[node].list_attr()


def test_repeated_inputs_and_swapped_multi_outputs_are_separate_edges(everything_graph):
    graph = everything_graph
    assert graph.inputs("double") == [TensorRef("square"), TensorRef("square")]
    assert graph.inputs("square") == [TensorRef("dwconv"), TensorRef("dwconv")]
    assert graph.consumers("square") == [("double", 0), ("double", 1)]
    assert graph.inputs("swap") == [TensorRef("split", 1), TensorRef("split", 0)]
    assert graph.consumers(TensorRef("split", 1)) == [("swap", 0)]
    assert graph.consumers(("split", 0)) == [("swap", 1)]
    assert graph.is_graph_output(("split", 1)) and not graph.is_graph_output(("split", 0))


def test_round_trip_outputs_are_bit_exact_with_an_executor(everything):
    inputs = everything.inputs(seed=5)
    expected = run_symbol(everything.symbol, everything.params, inputs)
    _assert_nontrivial(expected)
    graph = Graph.from_json(everything.json, everything.params)
    reloaded = Graph.from_json(graph.to_json(), graph.params)
    _assert_bit_exact(expected, run_symbol(mx.sym.load_json(reloaded.to_json()), reloaded.params, inputs))


def test_to_block_is_bit_exact_with_an_mxnet_symbol_block(everything):
    inputs = everything.inputs(seed=6)
    expected = run_block(_mxnet_symbol_block(everything.symbol, everything.params, everything.aux_names),
                         inputs, ["data"])
    _assert_nontrivial(expected)
    graph = Graph.from_json(everything.json, everything.params)
    _assert_bit_exact(expected, run_graph(Graph.from_json(graph.to_json(), graph.params), inputs))


def test_to_block_runs_batchnorm_with_running_statistics_and_fix_gamma(everything):
    """bn2 (fix_gamma=True, a graph head) against numpy: catches aux states loaded as args,
    default statistics, or gamma used although fixed."""
    inputs = everything.inputs(seed=7)
    p = everything.params
    gconv = run_symbol(everything.symbol.get_internals()["gconv_output"], p, inputs)[0]
    c = (slice(None), None, None)
    expected = (gconv - p["bn2_moving_mean"][c]) / np.sqrt(p["bn2_moving_var"][c] + 1e-3) + p["bn2_beta"][c]
    bn2 = run_graph(graph_of(everything), inputs)[2]
    np.testing.assert_allclose(bn2, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(p["bn2_gamma"], 1.0)  # the check above would be vacuous otherwise


# ---------------------------------------------------------------------------------- files
def test_save_and_load_round_trip_through_files(everything, tmp_path):
    graph = graph_of(everything)
    symbol_path, params_path = qgraph.save(graph, tmp_path / "model")
    assert (symbol_path, params_path) == (tmp_path / "model-symbol.json", tmp_path / "model-0000.params")
    assert sorted(os.listdir(tmp_path)) == ["model-0000.params", "model-symbol.json"]  # no temp files left

    stored = mx.nd.load(str(params_path))
    expected_keys = {("aux:" if k in everything.aux_names else "arg:") + k for k in everything.params}
    assert set(stored) == expected_keys
    for key, value in stored.items():
        assert np.array_equal(value.asnumpy(), everything.params[key.split(":", 1)[1]])

    for source in (tmp_path / "model", str(tmp_path / "model"), symbol_path, str(symbol_path)):
        loaded = qgraph.load(source)
        assert loaded.to_json() == graph.to_json()
        assert loaded.input_names == ["data"]
        assert set(loaded.params) == set(graph.params)
        assert all(np.array_equal(loaded.params[k], v) and loaded.params[k].dtype == v.dtype
                   for k, v in graph.params.items())

    inputs = everything.inputs(seed=8)
    _assert_bit_exact(run_graph(graph, inputs), run_graph(qgraph.load(tmp_path / "model"), inputs))
    # and plain MXNet reads the files the same way
    imported = mx.gluon.SymbolBlock.imports(str(symbol_path), ["data"], str(params_path))
    _assert_bit_exact(run_graph(graph, inputs), run_block(imported, inputs, ["data"]))


def test_load_sets_input_shapes_and_other_epochs_need_an_explicit_params_path(small, tmp_path):
    graph = graph_of(small)
    symbol_path, params_path = qgraph.save(graph, tmp_path / "net", epoch=3)
    assert params_path.name == "net-0003.params"
    loaded = qgraph.load(symbol_path, params=params_path, input_shape=(2, 3, 6, 6))
    assert loaded.input_shapes == {"data": (2, 3, 6, 6)}
    loaded.verify()
    assert loaded.to_json() == graph.to_json()


def test_save_makes_missing_folders_and_files_get_the_umask_mode(small_graph, tmp_path):
    old = os.umask(0o022)
    try:
        symbol_path, params_path = qgraph.save(small_graph, tmp_path / "runs" / "r20" / "model")
    finally:
        os.umask(old)
    for path in (symbol_path, params_path):
        assert path.is_file() and (path.stat().st_mode & 0o777) == 0o644
    assert sorted(os.listdir(tmp_path / "runs" / "r20")) == ["model-0000.params", "model-symbol.json"]


def test_a_failed_save_leaves_no_file_and_no_new_folder(small_graph, tmp_path):
    broken = small_graph.copy()
    broken._outputs = [TensorRef("nowhere")]  # to_json fails before anything is written
    with pytest.raises(Exception):
        qgraph.save(broken, tmp_path / "new" / "model")
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(GraphError, match="is a file"):
        qgraph.save(small_graph, tmp_path / "file" / "model")


# ---------------------------------------------------------------------------------- blocks
def _gluon_net():
    net = mx.gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(mx.gluon.nn.Conv2D(4, 3, padding=1), mx.gluon.nn.BatchNorm(),
                mx.gluon.nn.Activation("relu"), mx.gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier(magnitude=2.0))
    # non-trivial running statistics, so a BN loaded with defaults would be noticed
    rng = np.random.default_rng(0)
    net[1].running_mean.set_data(mx.nd.array(rng.normal(0, 0.3, 4)))
    net[1].running_var.set_data(mx.nd.array(rng.uniform(0.5, 2.0, 4)))
    return net


def test_never_run_block_without_input_shape_raises_graph_error():
    with pytest.raises(GraphError, match="input_shape"):
        qgraph.load(_gluon_net())


def test_hybrid_block_is_traced_with_input_shape_and_computes_the_same():
    net = _gluon_net()
    graph = qgraph.load(net, input_shape=(2, 3, 5, 5))
    assert graph.input_names == ["data"] and graph.input_shapes == {"data": (2, 3, 5, 5)}
    assert set(graph.params) == set(net.collect_params().keys())
    assert graph.aux_names() == {"net_batchnorm0_running_mean", "net_batchnorm0_running_var"}
    graph.verify()
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(np.float32)
    expected = net(mx.nd.array(x)).asnumpy()
    _assert_nontrivial([expected])
    np.testing.assert_allclose(run_graph(graph, {"data": x})[0], expected, rtol=1e-5, atol=1e-6)
    # a block that already ran hybridized needs no input shape
    again = qgraph.load(net)
    assert again.to_json() == graph.to_json() and again.input_shapes == {}


def test_symbol_block_that_has_run_loads(small, tmp_path):
    symbol_path, params_path = qgraph.save(graph_of(small), tmp_path / "m")
    block = mx.gluon.SymbolBlock.imports(str(symbol_path), ["data"], str(params_path))
    inputs = small.inputs()
    expected = run_block(block, inputs, ["data"])
    graph = qgraph.load(block)
    assert graph.to_json() == graph_of(small).to_json()
    assert all(np.array_equal(graph.params[k], v) for k, v in small.params.items())
    _assert_bit_exact(expected, run_graph(graph, inputs))


@pytest.mark.parametrize("input_shape", [None, (2, 3, 6, 6)])
def test_symbol_block_that_never_ran_loads(small, tmp_path, input_shape):
    """Fresh from SymbolBlock.imports (or qgraph.to_block), export() would write no parameters."""
    symbol_path, params_path = qgraph.save(graph_of(small), tmp_path / "m")
    for block in (mx.gluon.SymbolBlock.imports(str(symbol_path), ["data"], str(params_path)),
                  qgraph.to_block(graph_of(small))):
        graph = qgraph.load(block, input_shape=input_shape)
        assert graph.to_json() == graph_of(small).to_json()
        assert set(graph.params) == set(small.params)
        assert all(np.array_equal(graph.params[k], v) for k, v in small.params.items())
        assert graph.input_shapes == ({} if input_shape is None else {"data": input_shape})
        graph.verify()


def test_load_of_a_graph_copies_and_of_anything_else_raises(small_graph):
    copy = qgraph.load(small_graph)
    assert copy is not small_graph and copy.to_json() == small_graph.to_json()
    with pytest.raises(GraphError, match="int"):
        qgraph.load(42)


# ---------------------------------------------------------------------------------- edit verbs
def test_insert_on_edge_rewires_one_slot_and_computes_the_new_graph(small):
    graph = graph_of(small)
    new = graph.insert_on_edge("fc0", 0, "_mul_scalar", "relu0_scaled", {"scalar": 2.0})
    assert new == "relu0_scaled"
    assert graph.inputs("fc0")[0] == TensorRef("relu0_scaled")
    assert graph.inputs("relu0_scaled") == [TensorRef("relu0")]
    assert graph.consumers("relu0") == [("relu0_scaled", 0)]
    assert graph.attrs("relu0_scaled") == {"scalar": "2.0"}
    graph.verify()

    # the same graph written by hand with mx.sym
    S = mx.sym
    internals = small.symbol.get_internals()
    expected_symbol = S.FullyConnected(S._internal._mul_scalar(internals["relu0_output"], scalar=2.0), num_hidden=5,
                                       name="fc0")
    inputs = small.inputs()
    expected = run_symbol(expected_symbol, small.params, inputs)
    _assert_bit_exact(expected, run_symbol(graph.to_symbol(), graph.params, inputs))
    assert not np.allclose(expected[0], run_symbol(small.symbol, small.params, inputs)[0])


def test_insert_on_edge_with_an_extra_parameter_input_and_a_taken_name(small):
    graph = graph_of(small)
    # name taken: uniqued; __shape__ because MXNet cannot infer a broadcast operand's shape backwards
    shift = graph.add_variable("relu0", np.full((1, 4, 1, 1), 0.5, np.float32), {"__shape__": "(1, 4, 1, 1)"})
    assert shift == "relu0_1" and graph.is_param(shift) and shift not in graph.input_names
    node = graph.insert_on_edge("fc0", 0, "broadcast_add", "relu0", extra_inputs=[shift])
    assert node == "relu0_2"
    assert graph.inputs(node) == [TensorRef("relu0"), TensorRef(shift)]  # extra inputs fill slots 1..
    assert graph.inputs("fc0")[0] == TensorRef(node)
    graph.verify()
    inputs = small.inputs()
    relu0 = run_symbol(small.symbol.get_internals()["relu0_output"], small.params, inputs)[0]
    flat = (relu0.astype(np.float64) + 0.5).reshape(len(relu0), -1)
    expected = flat @ small.params["fc0_weight"].T.astype(np.float64) + small.params["fc0_bias"]
    np.testing.assert_allclose(run_symbol(graph.to_symbol(), graph.params, inputs)[0], expected,
                               rtol=1e-5, atol=1e-5)


def test_replace_all_uses_moves_consumers_and_graph_outputs(everything_graph):
    graph = everything_graph
    graph.replace_all_uses(TensorRef("split", 1), TensorRef("split", 0))
    assert graph.inputs("swap") == [TensorRef("split", 0), TensorRef("split", 0)]
    assert graph.outputs[1] == TensorRef("split", 0)
    assert graph.consumers(TensorRef("split", 1)) == []
    assert [o.node for o in graph.outputs] == ["fc", "split", "bn2", "pool"]  # order kept
    graph.verify()


def test_replace_node_rewires_every_output_index_and_drops_the_old_node(everything):
    graph = graph_of(everything)
    new = graph.add_node("SliceChannel", "split_again", [TensorRef("relu1")], {"num_outputs": 2, "axis": 1})
    graph.replace_node("split", new)
    assert "split" not in graph
    assert graph.inputs("swap") == [TensorRef(new, 1), TensorRef(new, 0)]
    assert graph.outputs[1] == TensorRef(new, 1)
    graph.verify()
    inputs = everything.inputs()
    _assert_bit_exact(run_symbol(everything.symbol, everything.params, inputs),
                      run_symbol(graph.to_symbol(), graph.params, inputs))


def test_replace_node_with_a_different_op_changes_the_numbers(small):
    graph = graph_of(small)
    new = graph.add_node("Activation", "sig0", ["bn0"], {"act_type": "sigmoid"})
    graph.replace_node("relu0", new)
    assert "relu0" not in graph and graph.inputs("fc0")[0] == TensorRef("sig0")
    graph.verify()
    inputs = small.inputs()
    bn0 = run_symbol(small.symbol.get_internals()["bn0_output"], small.params, inputs)[0]
    flat = (1 / (1 + np.exp(-bn0.astype(np.float64)))).reshape(len(bn0), -1)
    expected = flat @ small.params["fc0_weight"].T.astype(np.float64) + small.params["fc0_bias"]
    np.testing.assert_allclose(run_symbol(graph.to_symbol(), graph.params, inputs)[0], expected,
                               rtol=1e-5, atol=1e-5)


def test_remove_node_refuses_while_consumers_remain_and_names_them(everything_graph):
    graph = everything_graph
    with pytest.raises(GraphError, match=r"cannot remove 'square'.*\['double'\]"):
        graph.remove_node("square")
    with pytest.raises(GraphError, match=r"'conv1_weight'.*\['conv1'\]"):
        graph.remove_node("conv1_weight")
    with pytest.raises(GraphError, match="graph outputs"):
        graph.remove_node("fc")
    assert "square" in graph and "conv1_weight" in graph.params
    # a node nobody reads goes, and a variable's value with it
    dead = graph.add_node("Activation", "dead", ["relu1"], {"act_type": "relu"})
    graph.remove_node(dead)
    assert dead not in graph
    extra = graph.add_variable("extra_param", np.zeros(3, np.float32))
    graph.remove_node(extra)
    assert extra not in graph and extra not in graph.params
    graph.verify()


def test_add_input_appends_the_next_slot_for_a_bias(tiny):
    graph = graph_of(tiny)
    bias = graph.add_variable("c_bias", np.array([0.5, -0.25], np.float32))
    assert graph.add_input("c", bias) == 2
    graph.set_attr("c", "no_bias", "False")
    assert graph.inputs("c") == [TensorRef("data"), TensorRef("c_weight"), TensorRef("c_bias")]
    graph.verify()
    inputs = tiny.inputs()
    w = tiny.params["c_weight"].reshape(2, 2)
    conv = np.einsum("oc,nchw->nohw", w, inputs["data"]) + np.array([0.5, -0.25])[None, :, None, None]
    np.testing.assert_allclose(run_symbol(graph.to_symbol(), graph.params, inputs)[0], np.maximum(conv, 0),
                               rtol=1e-5, atol=1e-6)


def test_match_chain_finds_layer_batchnorm_pairs_in_topological_order(everything_graph, small_graph):
    graph = everything_graph
    assert graph.match_chain([("Convolution", "Deconvolution", "FullyConnected"), "BatchNorm"]) == [
        ["conv1", "bn1"], ["gconv", "bn2"], ["deconv", "bn3"]]
    assert small_graph.match_chain(["Convolution", "BatchNorm", "Activation", "FullyConnected"]) == [
        ["conv0", "bn0", "relu0", "fc0"]]
    # an op reading the tensor twice is one chain (slot 0 only), not two
    assert graph.match_chain(["Convolution", "broadcast_mul"]) == [["dwconv", "square"]]
    assert graph.match_chain(["broadcast_mul", "elemwise_add"]) == [["square", "double"]]
    # only output 0 links a chain: swap reads split output 0 through slot 1 and output 1 through slot 0
    assert graph.match_chain(["SliceChannel", "Concat"]) == []
    assert graph.match_chain(["BatchNorm", "Convolution"]) == []


def test_consumers_queries(everything_graph):
    graph = everything_graph
    assert graph.consumers("bn2") == [("tanh2", 0)]
    assert graph.is_graph_output("bn2")
    assert graph.consumers("conv1_weight") == [("conv1", 1)]
    assert graph.consumers("bn1_moving_var") == [("bn1", 4)]
    assert graph.consumers("fc") == []
    assert graph.inputs("bn1")[3].node == "bn1_moving_mean"


def test_cleanup_drops_dead_nodes_and_their_params_but_keeps_inputs(small_graph):
    graph = small_graph
    w = graph.add_variable("dead_weight", np.ones((2, 4 * 6 * 6), np.float32))
    dead = graph.add_node("FullyConnected", "dead_fc", ["relu0", w], {"num_hidden": 2, "no_bias": True})
    unused_input = graph.add_variable("other_data")
    assert graph.cleanup() is graph
    assert dead not in graph and w not in graph and w not in graph.params
    assert "other_data" in graph and "relu0" in graph and "conv0_weight" in graph.params
    assert unused_input in graph.input_names


def test_unique_name_and_edit_errors(small_graph):
    graph = small_graph
    assert graph.unique_name("fresh") == "fresh"
    assert graph.unique_name("conv0") == "conv0_1"
    graph.add_node("Activation", "conv0", ["conv0"], {"act_type": "relu"})
    assert "conv0_1" in graph and graph.unique_name("conv0") == "conv0_2"
    with pytest.raises(GraphError, match="'nowhere'"):
        graph.add_node("Activation", "x", ["nowhere"])
    with pytest.raises(GraphError, match="slot 5"):
        graph.set_input("relu0", 5, "conv0")


def test_copy_is_independent(small_graph):
    copy = small_graph.copy()
    copy.set_attr("conv0", "num_filter", "8")
    copy.set_input("relu0", 0, "conv0")
    copy.set_param("conv0_bias", np.zeros(4, np.float32))
    copy.add_output("relu0")
    copy.nx.nodes["conv0"]["extra"]["note"] = "x"
    assert small_graph.attrs("conv0")["num_filter"] == "4"
    assert small_graph.inputs("relu0") == [TensorRef("bn0")]
    assert not np.array_equal(small_graph.params["conv0_bias"], np.zeros(4))
    assert small_graph.outputs == (TensorRef("fc0"),)
    assert small_graph.nx.nodes["conv0"]["extra"] == {}


@pytest.mark.parametrize("edit", [
    lambda g: g.set_input("relu0", 0, "nowhere"),
    lambda g: g.set_input("nowhere", 0, "conv0"),
    lambda g: g.add_input("conv0", ("nowhere", 0)),
    lambda g: g.add_output("nowhere"),
    lambda g: g.set_outputs(["fc0", "nowhere"]),
    lambda g: g.replace_all_uses("conv0", "nowhere"),
    lambda g: g.replace_all_uses("nowhere", "conv0"),
    lambda g: g.insert_on_edge("nowhere", 0, "relu", "x"),
    lambda g: g.remove_node("nowhere"),
    lambda g: g.set_param("nowhere", np.zeros(1)),
    lambda g: g.set_attr("nowhere", "k", "v"),
    lambda g: g.consumers("nowhere"),
])
def test_every_verb_refuses_a_tensor_that_does_not_exist_and_names_it(small_graph, edit):
    before = small_graph.to_json()
    with pytest.raises(GraphError, match="'nowhere'"):
        edit(small_graph)
    assert small_graph.to_json() == before  # nothing half-done, and networkx made no empty node
    assert "nowhere" not in small_graph.nx


def test_params_and_outputs_change_only_through_verbs(small_graph):
    with pytest.raises(TypeError):
        small_graph.params["conv0_bias"] = np.zeros(4, np.float32)  # noqa: read-only view
    assert isinstance(small_graph.outputs, tuple)
    with pytest.raises(GraphError, match="'conv0' is not a parameter"):
        small_graph.set_param("conv0", np.zeros(1))
    small_graph.set_attr("conv0_weight", "__shape__", "(4, 3, 3, 3)")
    small_graph.set_param("conv0_weight", np.zeros((4, 3, 3, 3), np.float32))
    assert small_graph.attrs("conv0_weight")["__shape__"] == "(4, 3, 3, 3)"
    ref = small_graph.add_output("relu0")
    assert small_graph.outputs[-1] == ref == TensorRef("relu0")


def test_node_builder_names_and_tags_what_it_adds(small_graph):
    node = small_graph.builder("conv0_fq", {"__tag__": "conv0"})
    first = node("_mul_scalar", "scale", ["conv0"], scalar=2.0)
    second = node("_mul_scalar", "scale", [first], scalar=0.5)
    assert first == TensorRef("conv0_fq_scale") and second == TensorRef("conv0_fq_scale_1")
    assert small_graph.attrs(second.node) == {"scalar": "0.5", "__tag__": "conv0"}
    assert small_graph.inputs(second.node) == [first]


def test_lint_checks_structure_without_mxnet(small_graph, monkeypatch):
    def no_mxnet(*args, **kwargs):
        raise AssertionError("lint must not call MXNet")

    monkeypatch.setattr(qgraph.Graph, "to_symbol", no_mxnet)
    monkeypatch.setattr(qgraph.Graph, "check_ops", no_mxnet)
    assert small_graph.lint() is small_graph
    small_graph.nx.add_edge("relu0", "conv0_weight", index=0, slot=0, version=0)
    with pytest.raises(GraphError, match="variable 'conv0_weight' has inputs|cycle"):
        small_graph.lint()


def test_lint_catches_a_node_networkx_made_up(small_graph):
    small_graph.nx.add_edge("ghost", "relu0", index=0, slot=1, version=0)  # the old add_input bug
    with pytest.raises(GraphError, match="'ghost'"):
        small_graph.lint()


# ---------------------------------------------------------------------------------- verify()
def test_verify_passes_and_returns_the_graph(everything_graph):
    assert everything_graph.verify() is everything_graph


def test_verify_catches_a_cycle(small_graph):
    small_graph.add_input("conv0", "relu0")  # conv0 reads relu0, which reads conv0
    with pytest.raises(GraphError, match="cycle"):
        small_graph.verify()


def _remove_edge(graph, consumer, slot):
    for src, _, key, data in list(graph.nx.in_edges(consumer, keys=True, data=True)):
        if data["slot"] == slot:
            graph.nx.remove_edge(src, consumer, key)


def test_verify_catches_an_unfilled_slot(small_graph):
    _remove_edge(small_graph, "bn0", 2)
    with pytest.raises(GraphError, match=r"'bn0'.*\[0, 1, 3, 4\]"):
        small_graph.verify()


def test_verify_catches_a_slot_filled_twice(small_graph):
    small_graph.nx.add_edge("conv0", "relu0", index=0, slot=0, version=0)
    with pytest.raises(GraphError, match="'relu0'"):
        small_graph.verify()


def test_verify_catches_a_missing_param(small_graph):
    del small_graph._params["bn0_moving_var"]  # a corruption no verb allows
    with pytest.raises(GraphError, match=r"no value for parameter 'bn0_moving_var'.*bn0"):
        small_graph.verify()


def test_verify_catches_an_extra_param(small_graph):
    small_graph._params["ghost"] = np.zeros(3, np.float32)  # a corruption no verb allows
    with pytest.raises(GraphError, match="'ghost'"):
        small_graph.verify()


def test_verify_catches_a_param_that_is_also_an_input(small_graph):
    small_graph._params["data"] = np.zeros((2, 3, 6, 6), np.float32)  # a corruption no verb allows
    with pytest.raises(GraphError, match="'data'"):
        small_graph.verify()


@pytest.mark.parametrize("name, shape", [("conv0_weight", (5, 3, 3, 3)), ("fc0_weight", (5, 145)),
                                         ("bn0_moving_mean", (3,)), ("fc0_bias", (5, 1))])
def test_verify_catches_a_param_of_the_wrong_shape(small_graph, name, shape):
    small_graph.verify()
    small_graph.set_param(name, np.zeros(shape, np.float32))
    with pytest.raises(GraphError, match=name) as err:
        small_graph.verify()
    assert str(shape) in str(err.value) or "nconsistent" in str(err.value)


def test_verify_catches_a_stale_shape_attribute(small_graph):
    small_graph.set_attr("conv0_weight", "__shape__", "(4, 3, 3, 3)")
    small_graph.verify()  # consistent with the stored value: fine
    small_graph.set_attr("conv0_weight", "__shape__", "(8, 3, 3, 3)")
    with pytest.raises(GraphError, match="conv0"):
        small_graph.verify()


def test_verify_catches_outputs_that_are_missing_or_absent(small_graph):
    broken = small_graph.copy()
    broken._outputs = [TensorRef("nowhere")]  # set_outputs refuses this itself
    with pytest.raises(GraphError, match="'nowhere'"):
        broken.verify()
    broken.set_outputs([])
    with pytest.raises(GraphError, match="no outputs"):
        broken.verify()


def test_from_json_with_input_names_requires_every_other_variable(small):
    with pytest.raises(GraphError, match="no value for parameter 'conv0_bias'"):
        Graph.from_json(small.json, {k: v for k, v in small.params.items() if k != "conv0_bias"},
                        input_names=["data"])
    with pytest.raises(GraphError, match="'image'"):
        Graph.from_json(small.json, small.params, input_names=["image"])
    graph = Graph.from_json(small.json, None)  # no params at all: every variable is an input
    assert graph.input_names[0] == "data" and set(graph.input_names) == {"data", *small.params}
    graph.verify()


# ---------------------------------------------------------------------------------- repeated names
def _twice_named_symbol():
    """Gluon-style: one Activation block called twice gives two operator nodes named 'act'."""
    S = mx.sym
    first = S.Activation(S.var("data"), act_type="relu", name="act")
    return S.Activation(first, act_type="tanh", name="act")


def test_repeated_operator_names_are_made_unique_and_compute_the_same():
    symbol = _twice_named_symbol()
    graph = Graph.from_json(symbol.tojson())
    assert [n for n in graph.nodes() if graph.op(n) != "null"] == ["act", "act_1"]
    assert graph.attrs("act_1") == {"act_type": "tanh"} and graph.outputs == (TensorRef("act_1"),)
    graph.verify()
    x = {"data": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    _assert_bit_exact(run_symbol(symbol, {}, x), run_symbol(graph.to_symbol(), {}, x))


def test_renaming_a_repeated_name_never_takes_a_name_used_later_in_the_json():
    """'act', 'act', 'act_1': the node the JSON calls act_1 keeps that name (exclude-by-name)."""
    S = mx.sym
    symbol = S.Activation(_twice_named_symbol(), act_type="sigmoid", name="act_1")
    graph = Graph.from_json(symbol.tojson())
    assert graph.attrs("act_1") == {"act_type": "sigmoid"}
    assert graph.attrs("act") == {"act_type": "relu"}
    renamed = [n for n in graph.nodes() if graph.op(n) != "null" and n not in ("act", "act_1")]
    assert len(renamed) == 1 and graph.attrs(renamed[0]) == {"act_type": "tanh"}
    x = {"data": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    _assert_bit_exact(run_symbol(symbol, {}, x), run_symbol(graph.to_symbol(), {}, x))


def test_a_variable_named_like_a_renamed_operator_is_accepted():
    S = mx.sym
    symbol = S.broadcast_add(_twice_named_symbol(), S.var("act_1"), name="add")
    graph = Graph.from_json(symbol.tojson(), {"act_1": np.ones(1, np.float32)})
    assert graph.is_param("act_1") and graph.op("act_1") == "null"


# ---------------------------------------------------------------------------------- hidden outputs
@pytest.mark.parametrize("op, kwargs", [
    ("BatchNorm", {}),
    ("LayerNorm", {}),
    ("GroupNorm", {"num_groups": 1}),
])
def test_hidden_outputs_mxnet_can_read_are_accepted(op, kwargs):
    symbol = getattr(mx.sym, op)(mx.sym.var("data"), name="norm", **kwargs)
    doc = json.loads(symbol.tojson())
    doc["heads"] = [[len(doc["nodes"]) - 1, 0, 0], [len(doc["nodes"]) - 1, 1, 0]]
    text = json.dumps(doc)
    assert mx.sym.load_json(text).list_outputs() == ["norm_output", "norm_mean"]  # MXNet accepts it
    graph = Graph.from_json(text)
    assert graph.outputs[1] == TensorRef("norm", 1)
    graph.verify()


def test_a_copy_can_drop_nodes_and_rewire_their_readers(small_graph):
    graph = small_graph.copy()
    graph.insert_on_edge("fc0", 0, "Activation", "extra", {"act_type": "relu"})
    graph.add_output("extra")
    copy = graph.copy(drop={"extra"}, rewire={"extra": TensorRef("relu0")})
    assert "extra" not in copy and "extra" in graph
    assert copy.inputs("fc0") == [TensorRef("relu0"), *small_graph.inputs("fc0")[1:]]
    assert copy.outputs == (TensorRef("fc0"), TensorRef("relu0"))
    copy.lint()
    assert copy.topo_order() == small_graph.topo_order()
    with pytest.raises(GraphError, match="'fc0' reads output 0 of 'extra', which the copy drops"):
        graph.copy(drop={"extra"})
    with pytest.raises(GraphError, match="the graph outputs reads output 0 of 'fc0'"):
        small_graph.copy(drop={"bn0", "relu0", "fc0"}, rewire={"relu0": TensorRef("conv0"),
                                                               "fc0": TensorRef("relu0")})
