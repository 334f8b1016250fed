"""Bad inputs to qgraph.load / load_files: each raises GraphError (a QGraphError) naming the file
or the node, and leaves every input file exactly as it was."""
from __future__ import annotations

import json
import os
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from helpers import graph_of

import qgraph
from qgraph import GraphError
from qgraph.io import load_files, read_params


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _load_fails(source, *fragments, **kwargs) -> GraphError:
    """load(source) must raise GraphError mentioning each fragment and change no file."""
    folder = Path(source).parent
    before = _snapshot(folder)
    with pytest.raises(GraphError) as err:
        qgraph.load(source, **kwargs)
    message = str(err.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"
    assert _snapshot(folder) == before, "a failed load changed, added or removed files"
    assert "Traceback" not in message and len(message) < 1000
    return err.value


def _params_file(prefix) -> Path:
    return Path(f"{prefix}-0000.params")


def _symbol_file(prefix) -> Path:
    return Path(f"{prefix}-symbol.json")


def _rewrite_params(prefix, change):
    arrays = mx.nd.load(str(_params_file(prefix)))
    change(arrays)
    mx.nd.save(str(_params_file(prefix)), arrays)


def test_the_fixture_loads(saved, small):
    graph = qgraph.load(saved, input_shape=small.input_shapes["data"])
    assert graph.verify().to_json() == graph_of(small).to_json()


@pytest.mark.parametrize("text", ["{nodes: [", "", "not json at all", '{"nodes": [], "heads": [[0, 0, 0]]',
                                  "\ufeff[1, 2"])
def test_malformed_json(saved, text):
    _symbol_file(saved).write_text(text)
    _load_fails(saved, _symbol_file(saved))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_json(saved, fraction):
    text = _symbol_file(saved).read_text()
    _symbol_file(saved).write_text(text[: int(len(text) * fraction)])
    _load_fails(saved, _symbol_file(saved), "not valid JSON")


@pytest.mark.parametrize("doc", [{"a": 1}, [], None, 3, {"nodes": [], "heads": []},
                                 {"nodes": {"op": "null"}, "heads": [[0, 0, 0]]}])
def test_json_that_is_not_a_symbol(saved, doc):
    _symbol_file(saved).write_text(json.dumps(doc))
    _load_fails(saved, _symbol_file(saved))


def test_json_naming_an_unknown_operator_names_the_file_and_the_op(saved):
    doc = json.loads(_symbol_file(saved).read_text())
    next(n for n in doc["nodes"] if n["name"] == "relu0")["op"] = "NoSuchOperator"
    _symbol_file(saved).write_text(json.dumps(doc))
    _load_fails(saved, _symbol_file(saved), "NoSuchOperator")


def test_json_with_a_bad_attribute_names_the_file(saved):
    doc = json.loads(_symbol_file(saved).read_text())
    next(n for n in doc["nodes"] if n["name"] == "conv0")["attrs"]["kernel"] = "(three, 3)"
    _symbol_file(saved).write_text(json.dumps(doc))
    _load_fails(saved, _symbol_file(saved))


def test_binary_garbage_instead_of_json(saved):
    _symbol_file(saved).write_bytes(b"\xff\xfe\x00\x81garbage" * 10)
    _load_fails(saved, _symbol_file(saved))


def test_missing_symbol_file(tmp_path):
    before = _snapshot(tmp_path)
    for source in (tmp_path / "nothing", tmp_path / "nothing-symbol.json"):
        with pytest.raises(GraphError, match="nothing-symbol.json"):
            qgraph.load(source)
    with pytest.raises(GraphError, match="nothing-symbol.json"):
        load_files(tmp_path / "nothing-symbol.json")
    assert _snapshot(tmp_path) == before == {}


def test_missing_params_file_given_explicitly(saved):
    _load_fails(_symbol_file(saved), "elsewhere.params", params=saved.parent / "elsewhere.params")


def test_params_missing_a_parameter_names_it_and_the_file(saved):
    _rewrite_params(saved, lambda arrays: arrays.pop("arg:conv0_weight"))
    _load_fails(saved, "conv0_weight", _params_file(saved), "conv0")


def test_params_missing_an_auxiliary_state(saved):
    _rewrite_params(saved, lambda arrays: arrays.pop("aux:bn0_moving_var"))
    _load_fails(saved, "bn0_moving_var", _params_file(saved))


def test_params_with_an_extra_parameter_names_it_and_the_file(saved):
    _rewrite_params(saved, lambda arrays: arrays.__setitem__("arg:ghost_weight", mx.nd.ones((2, 2))))
    _load_fails(saved, "ghost_weight", _params_file(saved))


def test_params_storing_the_input_names_it(saved):
    _rewrite_params(saved, lambda arrays: arrays.__setitem__("arg:data", mx.nd.ones((2, 3, 6, 6))))
    _load_fails(saved, "'data'", _params_file(saved))


def test_params_storing_a_name_twice(saved):
    _rewrite_params(saved, lambda arrays: arrays.__setitem__("aux:conv0_bias", mx.nd.ones(4)))
    _load_fails(saved, "conv0_bias", "twice", _params_file(saved))


@pytest.mark.parametrize("name, shape", [("conv0_weight", (5, 3, 3, 3)), ("bn0_moving_var", (7,)),
                                         ("fc0_weight", (5, 145))])
def test_params_with_a_wrong_shape_name_it_when_the_input_shape_is_known(saved, small, name, shape):
    key = ("aux:" if name in small.aux_names else "arg:") + name
    _rewrite_params(saved, lambda arrays: arrays.__setitem__(key, mx.nd.zeros(shape)))
    _load_fails(saved, name, _params_file(saved), input_shape=small.input_shapes["data"])
    with pytest.raises(GraphError, match=name):
        load_files(_symbol_file(saved), _params_file(saved), input_shapes=small.input_shapes)


def test_wrong_shape_without_an_input_shape_is_caught_by_verify_once_it_is_known(saved, small):
    """Without an input shape MXNet cannot tell a weight's shape; verify() can once it is set."""
    _rewrite_params(saved, lambda arrays: arrays.__setitem__("arg:conv0_weight", mx.nd.zeros((5, 3, 3, 3))))
    graph = qgraph.load(saved)
    graph.input_shapes = dict(small.input_shapes)
    with pytest.raises(GraphError, match=r"conv0_weight.*\(5, 3, 3, 3\).*\(4, 3, 3, 3\)"):
        graph.verify()


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, os.urandom(256), b"PK\x03\x04 a zip file",
                                     b'{"nodes": []}'], ids=["empty", "zeros", "random", "zip", "json"])
def test_garbage_params_file(saved, content):
    _params_file(saved).write_bytes(content)
    _load_fails(saved, _params_file(saved))
    with pytest.raises(GraphError, match="not an MXNet params file"):
        read_params(_params_file(saved))


def test_truncated_params_file(saved):
    data = _params_file(saved).read_bytes()
    for cut in (8, len(data) // 2, len(data) - 3):
        _params_file(saved).write_bytes(data[:cut])
        _load_fails(saved, _params_file(saved))


def test_params_file_holding_an_unnamed_list(saved):
    arrays = mx.nd.load(str(_params_file(saved)))
    mx.nd.save(str(_params_file(saved)), list(arrays.values()))
    _load_fails(saved, _params_file(saved), "unnamed")


def test_params_file_that_is_a_folder(saved):
    _params_file(saved).unlink()
    _params_file(saved).mkdir()
    with pytest.raises(GraphError, match="model-0000.params"):
        read_params(_params_file(saved))


def test_params_without_prefixes_load_like_exported_ones(saved, small):
    """`save_parameters`-style names (no arg:/aux:) are accepted as well."""
    arrays = mx.nd.load(str(_params_file(saved)))
    mx.nd.save(str(_params_file(saved)), {k.split(":", 1)[1]: v for k, v in arrays.items()})
    graph = qgraph.load(saved, input_shape=small.input_shapes["data"]).verify()
    assert all(np.array_equal(graph.params[k], v) for k, v in small.params.items())


def test_failed_save_leaves_existing_files_alone(saved, small):
    """A graph MXNet rejects is not written, and the files already at the prefix stay as they were."""
    graph = graph_of(small)
    graph.nx.nodes["relu0"]["op"] = "NoSuchOperator"
    before = _snapshot(saved.parent)
    with pytest.raises(GraphError, match="NoSuchOperator"):
        qgraph.save(graph, saved)
    assert _snapshot(saved.parent) == before


def test_params_reader_agrees_with_mxnet_for_every_dtype_and_layout(tmp_path):
    """qgraph reads dense .params files with numpy alone; the values, dtypes and shapes must be
    mx.nd.load's, for files MXNet writes with and without numpy shape semantics."""
    rng = np.random.default_rng(0)
    arrays = {"arg:w32": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              "arg:w64": rng.standard_normal((5, 2)), "aux:half": rng.standard_normal(7).astype(np.float16),
              "arg:u8": np.arange(6, dtype=np.uint8).reshape(2, 3), "arg:i32": np.arange(-3, 3, dtype=np.int32),
              "arg:i8": np.arange(-4, 4, dtype=np.int8), "arg:i64": np.arange(5, dtype=np.int64),
              "arg:one": np.float32([2.5]), "arg:big": rng.standard_normal((3, 1, 1, 2, 2)).astype(np.float32)}
    path = tmp_path / "m-0000.params"
    for numpy_shapes in (False, True):
        with mx.util.np_shape(numpy_shapes):
            mx.nd.save(str(path), {k: mx.nd.array(v, dtype=v.dtype) for k, v in arrays.items()})
            reference = {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}
        fast = qgraph.io._read_dense_params(path)
        assert fast is not None
        assert fast.keys() == reference.keys()
        for key, value in reference.items():
            assert fast[key].dtype == value.dtype and np.array_equal(fast[key], value), key
        assert read_params(path)["w32"].flags.writeable


def test_loaded_weights_are_private_and_outlive_an_atomic_rewrite_of_their_file(saved, small):
    """Weights are a copy-on-write map of the file: writing to them never reaches the file, and
    qgraph.save over the same prefix (a rename) leaves the loaded graph's values as they were."""
    path = _params_file(saved)
    on_disk = path.read_bytes()
    graph = qgraph.load(saved, input_shape=small.input_shapes["data"])
    name = max(graph.params, key=lambda n: graph.params[n].size)
    graph.params[name][...] += 1.0
    assert path.read_bytes() == on_disk
    expected = {n: v.copy() for n, v in graph.params.items()}
    other = graph_of(small)
    other.set_param(name, np.zeros_like(small.params[name]))
    qgraph.save(other, saved)
    assert path.read_bytes() != on_disk
    assert all(np.array_equal(graph.params[n], v) for n, v in expected.items())
    np.testing.assert_array_equal(graph.params[name], small.params[name] + 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_finite_check_names_nan_and_inf_and_passes_values_whose_squares_overflow(dtype):
    """check_finite's fast path sums squares; a finite value too large to square must still pass."""
    huge = np.finfo(dtype).max
    fine = {"w": np.array([[huge, -huge], [1.0, 0.0]], dtype), "b": np.zeros(3, dtype)}
    qgraph.io.check_finite(fine, "f.params")
    for bad in (np.nan, np.inf, -np.inf):
        value = np.array([1.0, bad, huge, 2.0], dtype)
        with pytest.raises(GraphError, match=r"f.params: parameter 'w' holds 1 NaN or Inf"):
            qgraph.io.check_finite({"b": np.zeros(2, dtype), "w": value}, "f.params")
