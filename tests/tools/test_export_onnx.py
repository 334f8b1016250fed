"""tools/export_onnx.py: FP32 and int8 QDQ export with --verify on bundled MNIST, and one clear
line (exit 2, no output files, inputs untouched) for bad input: an op with no ONNX mapping,
Winograd full mode, missing onnxruntime, and the other flags QDQ cannot state."""
import re
import shutil
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from helpers import digest, int8_result

from qgraph.data import mnist_split
from qgraph.deploy import onnx as deploy

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import export_onnx  # noqa: E402


@pytest.fixture
def run(run_main):
    return lambda argv: run_main(export_onnx.main, argv)


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--verify" in text and "--calib-mode" in text and "qdqisint8allowed" in text


def test_fp32_export_verifies_against_mxnet(model, tmp_path, run):
    out = tmp_path / "out" / "mnist"
    rc, stdout, _ = run([f"{model}-symbol.json", "--out", out, "--no-int8", "--verify"])
    assert rc == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist-fp32.onnx"]
    match = re.search(r"fp32 onnxruntime vs MXNet: max relative difference (\S+) over 16 images \(ok\)", stdout)
    assert match and float(match.group(1)) <= 1e-4


def test_int8_export_and_verify_last_line(model, mnist_files, tmp_path, run):
    calib, test = mnist_files
    out = tmp_path / "out" / "mnist"
    rc, stdout, _ = run([f"{model}-symbol.json", "--out", out, "--calib-data", calib, "--calib-mode", "naive",
                          "--verify", "--verify-data", test, "-q"])
    assert rc == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist-fp32.onnx", "mnist.onnx"]
    lines = stdout.strip().splitlines()
    ort_top1, sim_top1, agreement = int8_result(lines[-1], "onnxruntime")
    assert agreement >= 99.0 and abs(ort_top1 - sim_top1) <= 0.5
    assert re.fullmatch(r"QLinearConv [1-4] of 4 convolutions, QGemm 1 of 1 fully connected", lines[-2]), lines[-2]
    # the reported accuracy is the written file's, recomputed here independently
    (_, _), (x_test, y_test) = mnist_split()
    logits = deploy.run(deploy.session(f"{out}.onnx", int8_activations=True), x_test[:200])[0]
    assert 100 * (logits.argmax(1) == y_test[:200]).mean() == pytest.approx(ort_top1, abs=0.005)
    model_proto = onnx.load(f"{out}.onnx")
    onnx.checker.check_model(model_proto, full_check=True)
    ops = {n.op_type for n in model_proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in model_proto.graph.initializer}
    assert scales["mnistcnn_conv0_fwd_bias_quantized"].dtype == np.int32


def _unsupported_model(folder: Path) -> Path:
    data = mx.sym.var("data")
    conv = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), name="conv")
    out = mx.sym.FullyConnected(mx.sym.softsign(conv, name="soft"), num_hidden=2, name="fc")
    rng = np.random.default_rng(0)
    out.save(str(folder / "bad-symbol.json"))
    mx.nd.save(str(folder / "bad-0000.params"),
               {"arg:conv_weight": mx.nd.array(rng.standard_normal((4, 3, 3, 3))), "arg:conv_bias": mx.nd.zeros(4),
                "arg:fc_weight": mx.nd.array(rng.standard_normal((2, 144))), "arg:fc_bias": mx.nd.zeros(2)})
    return folder / "bad"


CASES = {
    "unsupported_op": (["--input-shape", "1,3,8,8", "--no-int8"], r"node 'soft': op softsign has no ONNX mapping"),
    "unsupported_op_int8": (["--input-shape", "1,3,8,8", "--calib-data", "CALIB"], r"node 'soft': op softsign"),
    "winograd_full": (["--wino-quantize", "F43", "--wino-mode", "full", "--calib-data", "CALIB"],
                      r"--wino-mode full.*no QuantizeLinear/DequantizeLinear equivalent"),
    "winograd_weight": (["--wino-quantize", "F23", "--calib-data", "CALIB"], r"--wino-quantize"),
    "missing_onnxruntime": (["--calib-data", "CALIB", "--verify", "--verify-data", "TEST"],
                            r"--verify runs ONNX Runtime: onnxruntime is not installed \(pip install"),
    "four_bits": (["--weight-bits-width", "4", "--calib-data", "CALIB"], "8-bit"),
    "half_away": (["--rounding", "half_away", "--calib-data", "CALIB"], "--rounding half_even"),
    "missing_symbol": (["--no-int8"], "nothing-symbol.json"),
    "no_calibration_data": ([], "--calib-data"),
    "verify_without_data": (["--calib-data", "CALIB", "--verify"], "--verify-data"),
    "missing_calib_file": (["--calib-data", "MISSING"], "nothing.npy"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_no_output(case, model, mnist_files, tmp_path, run, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in list(Path(model).parent.glob("m-*")) + list(mnist_files):
        shutil.move(str(path), inputs / path.name)
    bad = _unsupported_model(inputs)
    symbol = {"unsupported_op": f"{bad}-symbol.json", "unsupported_op_int8": f"{bad}-symbol.json",
              "missing_symbol": inputs / "nothing-symbol.json"}.get(case, inputs / "m-symbol.json")
    flags, expected = CASES[case]
    names = {"CALIB": inputs / "calib.npy", "TEST": inputs / "test.npz", "MISSING": tmp_path / "nothing.npy"}
    np.save(inputs / "calib8.npy", np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype("f4"))
    if case == "unsupported_op_int8":
        names["CALIB"] = inputs / "calib8.npy"
    if case == "missing_onnxruntime":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = digest(inputs)
    rc, _, stderr = run([symbol] + [names.get(f, f) for f in flags] + ["--out", out_dir / "x"])
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_onnx.py: error: "), stderr
    assert re.search(expected, lines[0]), lines[0]
    assert list(out_dir.iterdir()) == []
    assert digest(inputs) == before
