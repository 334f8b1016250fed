"""Bad input to every tool that reads models or data: NaN/Inf weights, NaN calibration data, a
missing params file, truncated or corrupt RecordIO, and output folders that do not exist yet.
Each gives one line naming the parameter, file or record, exit code 2, no traceback, no output
file or folder, and leaves the inputs unchanged; the library raises the project's error types."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from helpers import MNIST_CNN, RESNET20, ROOT, write_recordio

import passes
import qgraph
from qgraph import DataError, GraphError, data

TOOLS = ROOT / "tools"


def _tool(name, *args, cwd=None):
    return subprocess.run([sys.executable, str(TOOLS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd or ROOT)


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_refused(result, *fragments):
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and err, result.stderr[-2000:]
    assert all(fragment in err[-1] for fragment in fragments), err[-1]


def _poisoned_copy(tmp_path, prefix=MNIST_CNN, value=np.nan):
    """A copy of an exported model whose first weight holds `value`; returns its prefix."""
    target = tmp_path / "in" / "m"
    target.parent.mkdir()
    shutil.copy(f"{prefix}-symbol.json", f"{target}-symbol.json")
    params = mx.nd.load(f"{prefix}-0000.params")
    key = next(k for k in params if k.endswith("_weight"))
    array = params[key].asnumpy()
    array.flat[3] = value
    params[key] = mx.nd.array(array)
    mx.nd.save(f"{target}-0000.params", params)
    return target, key.split(":", 1)[1]


# ---------------------------------------------------------------------- NaN and Inf in the weights
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_the_library_names_the_parameter(tmp_path, value):
    prefix, name = _poisoned_copy(tmp_path, value=value)
    with pytest.raises(GraphError, match=f"parameter '{name}' holds 1 NaN or Inf"):
        qgraph.load(prefix)


@pytest.mark.parametrize("tool, args", [
    ("quantize_symbol.py", ["{prefix}-symbol.json", "--out", "{out}"]),
    ("simulate_quantization.py", ["--symbol", "{prefix}-symbol.json", "--dataset", "mnist", "--num-eval", "10",
                                  "--report", "{out}.json"]),
    ("train.py", ["--qat", "--symbol", "{prefix}-symbol.json", "--dataset", "mnist", "--out", "{out}"]),
    ("export_ncnn.py", ["{prefix}-symbol.json", "--no-int8", "--out", "{out}"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_tool_refuses_nan_weights_and_writes_nothing(tmp_path, tool, args):
    prefix, name = _poisoned_copy(tmp_path)
    before = _digest(tmp_path)
    out = tmp_path / "new" / "folder" / "out"
    result = _tool(tool, *[a.format(prefix=prefix, out=out) for a in args])
    _assert_refused(result, name, "NaN or Inf", "m-0000.params")
    assert _digest(tmp_path) == before and not (tmp_path / "new").exists()


def test_nan_calibration_data_names_the_file(tmp_path):
    calib = tmp_path / "calib.npy"
    images = np.zeros((4, 1, 28, 28), np.float32)
    images[2, 0, 5, 5] = np.nan
    np.save(calib, images)
    result = _tool("quantize_symbol.py", f"{MNIST_CNN}-symbol.json", "--calib-mode", "naive", "--calib-data", calib,
                   "--out", tmp_path / "q")
    _assert_refused(result, "calib.npy", "NaN or Inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy"]
    net = passes.quantize(f"{MNIST_CNN}-symbol.json", qgraph.QuantConfig(online=False))
    with pytest.raises(DataError, match="calibration batch 0 contains NaN"):
        net.calibrate(images, progress=False)


def test_a_missing_params_file_is_named(tmp_path):
    shutil.copy(f"{MNIST_CNN}-symbol.json", tmp_path / "m-symbol.json")
    result = _tool("quantize_symbol.py", tmp_path / "m-symbol.json", "--out", tmp_path / "q")
    _assert_refused(result, "m-symbol.json", str(tmp_path / "m-0000.params"), "does not exist")
    with pytest.raises(GraphError, match=r"m-0000\.params does not exist"):
        qgraph.load(tmp_path / "m-symbol.json")


# ---------------------------------------------------------------------- RecordIO
@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """cifar10_{train,test}.rec of 30 random 32x32 images (3 per class)."""
    folder = tmp_path_factory.mktemp("cifar")
    for split in ("train", "test"):
        write_recordio(folder, f"cifar10_{split}", count=30, shape=(32, 32, 3), classes=10)
    return folder


def _damaged(cifar_like, tmp_path, split, how):
    folder = tmp_path / "data"
    shutil.copytree(cifar_like, folder)
    rec = folder / f"cifar10_{split}.rec"
    if how == "truncated":
        with open(rec, "r+b") as stream:
            stream.truncate(5000)
    else:
        write_recordio(folder, f"cifar10_{split}", count=30, shape=(32, 32, 3), classes=10, corrupt=17)
    return folder, rec


@pytest.mark.parametrize("how, message", [("truncated", "truncated"), ("corrupt", "record 17 does not decode")])
@pytest.mark.parametrize("tool, split, args", [
    ("simulate_quantization.py", "test", ["--symbol", f"{RESNET20}-symbol.json", "--dataset", "cifar10"]),
    ("simulate_quantization.py", "train", ["--symbol", f"{RESNET20}-symbol.json", "--dataset", "cifar10",
                                           "--calib-mode", "naive", "--num-sample", "2"]),
    ("train.py", "train", ["--model", "cifar_resnet20_v1", "--epochs", "1", "--batch-size", "8", "--out", "{out}"]),
    ("export_ncnn.py", "train", [f"{RESNET20}-symbol.json", "--num-sample", "2", "--out", "{out}"]),
], ids=["simulate-test", "simulate-calibration", "train", "export_ncnn"])
def test_damaged_recordio_is_one_line_not_a_crash(cifar_like, tmp_path, how, message, tool, split, args):
    folder, rec = _damaged(cifar_like, tmp_path, split, how)
    before = _digest(tmp_path)
    out = tmp_path / "new" / "out"
    result = _tool(tool, *[a.format(out=out) for a in args], "--data-dir", folder)
    _assert_refused(result, str(rec), message)
    assert _digest(tmp_path) == before and not (tmp_path / "new").exists()


@pytest.mark.parametrize("how, message", [("truncated", "truncated"), ("corrupt", "record 17 does not decode")])
def test_damaged_calibration_recordio_for_quantize_symbol(cifar_like, tmp_path, how, message):
    folder, rec = _damaged(cifar_like, tmp_path, "train", how)
    result = _tool("quantize_symbol.py", f"{RESNET20}-symbol.json", "--calib-mode", "naive", "--calib-data", rec,
                   "--out", tmp_path / "new" / "q")
    _assert_refused(result, str(rec), message)
    assert not (tmp_path / "new").exists()
    with pytest.raises(DataError, match=message):
        data.load_calibration_data(rec, (1, 3, 32, 32))


def test_damaged_evaluation_file_through_the_library(cifar_like, tmp_path):
    folder, rec = _damaged(cifar_like, tmp_path, "test", "corrupt")
    with pytest.raises(DataError, match=f"{rec}: record 17 does not decode"):
        data.eval_set("cifar10", folder)


# ---------------------------------------------------------------------- output folders and modes
def test_export_ncnn_makes_its_folder_and_writes_with_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        result = _tool("export_ncnn.py", f"{MNIST_CNN}-symbol.json", "--no-int8", "--out", tmp_path / "a" / "b" / "m")
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "a" / "b").iterdir())
    assert [p.name for p in written] == ["m.bin", "m.param"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in written)


def test_graph_dumps_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        result = _tool("quantize_symbol.py", f"{MNIST_CNN}-symbol.json", "--out", tmp_path / "q", "--dump-graph",
                       tmp_path / "dumps" / "here", "--dump-format", "svg")
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    dumps = sorted((tmp_path / "dumps" / "here").iterdir())
    assert dumps and all(p.stat().st_mode & 0o777 == 0o644 for p in dumps)
