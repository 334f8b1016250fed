"""The recovery flags of the tools on the bundled MNIST model: --equalize on every tool that
quantizes, --calib-mode best, --adaround and --bias-correction in simulate_quantization,
quantize_symbol and export_ncnn (whose int8 model then carries the learned integers and still
agrees with the simulation), and one clear line, exit 2, for each misuse."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import int8_result

import qgraph

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import export_ncnn  # noqa: E402
import export_onnx  # noqa: E402
import quantize_symbol  # noqa: E402
import simulate_quantization  # noqa: E402


def _run(tool, argv, capsys):
    rc = tool.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("tool", ["simulate_quantization.py", "quantize_symbol.py", "export_ncnn.py", "train.py"])
def test_every_quantizing_tool_takes_equalize(tool):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "--equalize" in result.stdout, result.stderr[-500:]


def test_simulate_with_equalize_best_adaround_and_bias_correction(model, tmp_path, capsys):
    report = tmp_path / "r.json"
    rc, out, err = _run(simulate_quantization, [
        "--symbol", f"{model}-symbol.json", "--dataset", "mnist", "--num-eval", "200", "--merge-bn", "--equalize",
        "--weight-bits-width", "4", "--quant-type", "channel", "--calib-mode", "best", "--num-sample", "10",
        "--adaround", "--adaround-iterations", "30", "--bias-correction", "--report", report, "-q"], capsys)
    assert rc == 0, err
    assert re.search(r"adaround: [\d.]+ s on 100 calibration images", out)
    assert re.search(r"bias_correction: [\d.]+ s", out) and "acc" in out
    written = json.loads(report.read_text())
    assert set(written["recovery"]) == {"adaround", "bias_correction"} and written["config"]["equalize"] is True
    assert set(written["calibration"]["thresholds"])


def test_quantize_symbol_writes_the_recovered_net(model, mnist_files, tmp_path, capsys):
    out = tmp_path / "q"
    rc, stdout, err = _run(quantize_symbol, [
        f"{model}-symbol.json", "--merge-bn", "--equalize", "--quant-type", "channel", "--weight-bits-width", "4",
        "--calib-mode", "naive", "--calib-data", mnist_files[0], "--adaround", "--adaround-iterations", "20",
        "--bias-correction", "--out", out], capsys)
    assert rc == 0, err
    assert "equalize:" in stdout and re.search(r"adaround: \d+ layers", stdout)
    net = qgraph.QuantizedNet.load(out)
    assert net.weight_specs and all(s.offsets for s in net.weight_specs)


@pytest.mark.parametrize("tool, runtime", [(export_ncnn, "ncnn"), (export_onnx, "onnxruntime")])
def test_exports_with_adaround_verify(tool, runtime, model, mnist_files, tmp_path, capsys):
    out = tmp_path / "m"
    rc, stdout, err = _run(tool, [
        f"{model}-symbol.json", "--out", out, "--calib-data", mnist_files[0], "--calib-mode", "naive", "--adaround",
        "--adaround-iterations", "20", "--verify", "--verify-data", mnist_files[1], "-q"], capsys)
    assert rc == 0, err
    assert int8_result(stdout.strip().splitlines()[-1], runtime)[2] >= 98.0


@pytest.mark.parametrize("tool, argv, message", [
    (simulate_quantization, ["--symbol", "{model}-symbol.json", "--dataset", "mnist", "--equalize"],
     "QuantConfig.equalize=True requires merge_bn=True"),
    (quantize_symbol, ["{model}-symbol.json", "--equalize", "--out", "{out}"], "requires merge_bn=True"),
    (quantize_symbol, ["{model}-symbol.json", "--adaround", "--out", "{out}"], "--adaround/--bias-correction needs "
                                                                              "--calib-data"),
    (simulate_quantization, ["--symbol", "{model}-symbol.json", "--dataset", "mnist", "--adaround", "--num-eval",
                             "10"], "adaround: 'mnistcnn_conv1_fwd' is followed by BatchNorm"),
    (simulate_quantization, ["--symbol", "{model}-symbol.json", "--dataset", "mnist", "--grid", "--adaround"],
     "not to --grid"),
])
def test_misuse_is_one_line_and_exit_2(tool, argv, message, model, tmp_path, capsys):
    rc, _, err = _run(tool, [a.format(model=model, out=tmp_path / "o") for a in argv], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and lines and message in lines[-1], err
    assert not list(tmp_path.glob("o*"))
