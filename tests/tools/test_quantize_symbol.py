"""tools/quantize_symbol.py: the happy path and one clear line for every kind of bad input."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

import qgraph

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "quantize_symbol.py"

sys.path.insert(0, str(ROOT / "tools"))
import quantize_symbol  # noqa: E402


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(argv, capsys):
    rc = quantize_symbol.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_folds_bn_writes_outputs_and_prints_the_report(model, tmp_path, capsys):
    out = tmp_path / "out" / "folded"
    out.parent.mkdir()
    rc, stdout, _ = _run([f"{model}-symbol.json", "--passes", "fold_bn", "--out", out, "--dump-graph",
                          tmp_path / "dump"], capsys)
    assert rc == 0
    assert "fold_bn: 4 changed, 0 skipped" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded-0000.params", "folded-symbol.json"]
    assert (tmp_path / "dump" / "01_fold_bn.dot").exists()
    x = mx.nd.array(np.random.RandomState(0).normal(size=(8, 1, 28, 28)))
    before = qgraph.to_block(qgraph.load(f"{model}-symbol.json"))(x).asnumpy()
    after = qgraph.to_block(qgraph.load(f"{out}-symbol.json"))(x).asnumpy()
    assert np.abs(after - before).max() / np.abs(before).max() < 1e-4


def _damage_json(model, how):
    path = Path(f"{model}-symbol.json")
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "malformed": text.replace('"nodes"', '"nodes', 1),
                     "not_symbol": '{"hello": 1}',
                     "unknown_op": text.replace('"op": "Convolution"', '"op": "Convolution3000"', 1)}[how])


def _damage_params(model, how):
    path = f"{model}-0000.params"
    arrays = mx.nd.load(path)
    if how == "missing":
        del arrays["arg:mnistcnn_conv1_weight"]
    elif how == "extra":
        arrays["arg:stray_weight"] = mx.nd.zeros((3,))
    elif how == "wrong_shape":
        arrays["arg:mnistcnn_conv3_weight"] = mx.nd.zeros((32, 32, 1, 1))
    elif how == "garbage":
        Path(path).write_bytes(b"\x00garbage" * 100)
        return
    mx.nd.save(path, arrays)


@pytest.mark.parametrize("damage, expected", [
    (lambda m: _damage_json(m, "truncated"), "m-symbol.json: not valid JSON"),
    (lambda m: _damage_json(m, "malformed"), "m-symbol.json: not valid JSON"),
    (lambda m: _damage_json(m, "not_symbol"), "m-symbol.json: not a Symbol JSON"),
    (lambda m: _damage_json(m, "unknown_op"), "Convolution3000"),
    (lambda m: _damage_params(m, "missing"), "no value for parameter 'mnistcnn_conv1_weight'"),
    (lambda m: _damage_params(m, "extra"), "'stray_weight', which is not a variable"),
    (lambda m: _damage_params(m, "wrong_shape"), "'mnistcnn_conv3_weight' has shape (32, 32, 1, 1)"),
    (lambda m: _damage_params(m, "garbage"), "m-0000.params: not an MXNet params file"),
    (lambda m: os.remove(f"{m}-symbol.json"), "m-symbol.json: no such symbol file"),
    (lambda m: os.remove(f"{m}-0000.params"), "no params file beside it"),
], ids=["truncated", "malformed", "not_symbol", "unknown_op", "missing_param", "extra_param", "wrong_shape",
        "garbage_params", "no_symbol", "no_params"])
def test_bad_input_gives_one_line_and_no_output(model, tmp_path, capsys, damage, expected):
    damage(model)
    inputs_before = _digest(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rc, stdout, stderr = _run([f"{model}-symbol.json", "--out", out / "x"], capsys)
    assert rc == 2
    assert expected in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("quantize_symbol.py: error:")
    assert list(out.iterdir()) == []
    assert _digest(tmp_path) == inputs_before


@pytest.mark.parametrize("argv_tail, expected", [
    (["--passes", "fold_bn,frobnicate"], "unknown pass 'frobnicate'"),
    (["--out", "{tmp}/no/such/folder/x", "--exclude", "nothing_matches"], "matches no node"),
    (["--out", "{tmp}/m"], "would overwrite the input files"),
])
def test_bad_flags_are_named(model, tmp_path, capsys, argv_tail, expected):
    argv = [f"{model}-symbol.json"] + [a.format(tmp=tmp_path) for a in argv_tail]
    before = _digest(tmp_path)
    rc, _, stderr = _run(argv, capsys)
    assert rc == 2 and expected.format(tmp=tmp_path) in stderr
    assert _digest(tmp_path) == before


def test_a_missing_output_folder_is_made_when_the_files_are_written(model, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        rc, _, stderr = _run([f"{model}-symbol.json", "--out", tmp_path / "runs" / "r1" / "q"], capsys)
    finally:
        os.umask(old)
    assert rc == 0, stderr
    written = sorted(p.name for p in (tmp_path / "runs" / "r1").iterdir())
    assert written == ["q-0000.params", "q-symbol.json"]
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in (tmp_path / "runs" / "r1").iterdir())


def test_unwritable_output_leaves_nothing_behind(model, tmp_path, capsys):
    # root may write anywhere on a normal file system, so use one no one can write: procfs
    rc, _, stderr = _run([f"{model}-symbol.json", "--out", "/proc/qgraph-out"], capsys)
    assert rc == 2 and "/proc" in stderr and len(stderr.strip().splitlines()) == 1
    assert not any(Path("/proc").glob("*qgraph-out*"))


def test_cli_process_prints_no_traceback(model):
    _damage_json(model, "truncated")
    result = subprocess.run([sys.executable, str(TOOL), f"{model}-symbol.json"], capture_output=True, text=True,
                            cwd=model.parent, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("quantize_symbol.py: error:")


def test_default_pipeline_quantizes_and_reloads_as_plain_symbolblock(model, tmp_path, capsys):
    out = tmp_path / "q"
    rc, stdout, _ = _run([f"{model}-symbol.json", "--out", out, "--quant-type", "channel", "--input-signed", "auto",
                          "--dump-graph", tmp_path / "dump"], capsys)
    assert rc == 0
    assert "exclude: 1 changed" in stdout and "insert_fake_quant: 4 changed, 1 skipped" in stdout
    dot = (tmp_path / "dump" / "02_insert_fake_quant.dot").read_text()
    assert "mnistcnn_conv1_fwd_weight_fq" in dot and "#b7f0b1" in dot  # inserted nodes highlighted
    x = mx.nd.array(np.random.RandomState(1).normal(size=(4, 1, 28, 28)))
    plain = mx.gluon.SymbolBlock.imports(f"{out}-symbol.json", ["data"], f"{out}-0000.params")
    net = qgraph.QuantizedNet.load(str(out))
    assert np.array_equal(plain(x).asnumpy(), net(x).asnumpy())


@pytest.mark.parametrize("flag, value, message", [
    ("--weight-bits-width", "1", "outside 2..16"),
    ("--quant-type", "tensor", "invalid choice"),
    ("--input-signed", "maybe", "not true or false"),
])
def test_bad_quantization_flags_are_named(model, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        quantize_symbol.main([f"{model}-symbol.json", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err


def test_exclude_pattern_matching_nothing_is_an_error(model, tmp_path, capsys):
    rc, _, stderr = _run([f"{model}-symbol.json", "--out", tmp_path / "x", "--exclude", "no_such_layer.*"], capsys)
    assert rc == 2 and "no_such_layer" in stderr and "matches no node" in stderr


def test_help_explains_itself():
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--params", "--out", "--passes", "--dump-graph", "--input-shape"):
        assert flag in result.stdout


# ---------------------------------------------------------------------- per-layer settings and dumps
def test_layer_config_gives_layers_their_own_settings(model, tmp_path, capsys):
    config = tmp_path / "layers.json"
    config.write_text('{"mnistcnn_conv[12]_fwd": {"weight_bits": 4, "quant_type": "channel"}, '
                      '"mnistcnn_dense0_fwd": "float"}')
    rc, out, _ = _run([f"{model}-symbol.json", "--out", tmp_path / "q", "--layer-config", config], capsys)
    assert rc == 0
    specs = {(s.layer, s.kind): s for s in qgraph.QuantizedNet.load(tmp_path / "q").weight_specs}
    assert specs["mnistcnn_conv1_fwd", "weight"].bits == 4 and specs["mnistcnn_conv3_fwd", "weight"].bits == 8
    assert specs["mnistcnn_conv2_fwd", "weight"].granularity == "channel"
    assert ("mnistcnn_dense0_fwd", "weight") not in specs and "kept in float: layer_overrides: float" in out


@pytest.mark.parametrize("content, expected", [
    ('{"nothing_like_this": "float"}', "'nothing_like_this' matches no Convolution"),
    ('{"mnistcnn_conv1_fwd": {"weight_bits": 1}}', "layer_overrides['mnistcnn_conv1_fwd'].weight_bits=1"),
    ('["mnistcnn_conv1_fwd"]', "--layer-config"),
    ("{not json", "not JSON"),
    (None, "cannot read it"),
])
def test_a_bad_layer_config_is_named(model, tmp_path, capsys, content, expected):
    config = tmp_path / "layers.json"
    if content is not None:
        config.write_text(content)
    rc, _, err = _run([f"{model}-symbol.json", "--out", tmp_path / "q", "--layer-config", config], capsys)
    assert rc == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q-symbol.json").exists()


def test_dumps_collapse_fake_quant_subgraphs_and_show_calibrated_thresholds(model, tmp_path, capsys):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.RandomState(0).randn(8, 1, 28, 28).astype(np.float32))
    common = [f"{model}-symbol.json", "--calib-mode", "naive", "--calib-data", calib, "--dump-format", "svg", "-q"]
    assert _run(common + ["--out", tmp_path / "a", "--dump-graph", tmp_path / "d1"], capsys)[0] == 0
    assert _run(common + ["--out", tmp_path / "b", "--dump-graph", tmp_path / "d2", "--dump-detail", "full"],
                capsys)[0] == 0
    collapsed = (tmp_path / "d1" / "03_calibrated.dot").read_text()
    full = (tmp_path / "d2" / "03_calibrated.dot").read_text()
    assert '"mnistcnn_conv1_fwd_data_fq" [label="mnistcnn_conv1_fwd_data_fq\\nfake-quant input uint8 per tensor\\nT = ' \
        in collapsed
    assert "mnistcnn_conv1_fwd_weight_fq_copy" in full and "mnistcnn_conv1_fwd_weight_fq_copy" not in collapsed
    assert collapsed.count("[label=") * 3 < full.count("[label=")
