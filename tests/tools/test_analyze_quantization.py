"""tools/analyze_quantization.py: the report on the bundled model (index.md with its sections,
the JSON figures, a --layer-config file that the other tools read back, PNG plots), and one
line naming the field or layer for bad input, with nothing written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import analyze_quantization  # noqa: E402
import quantize_symbol  # noqa: E402

SMALL = ["--dataset", "mnist", "--num-sample", "10", "--holdout-per-class", "20", "--sensitivity-images", "100",
         "--num-eval", "200", "--weight-bits-width", "3", "--input-bits-width", "3", "--quant-type", "channel", "-q"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "new" / "report"
    rc = analyze_quantization.main([str(ROOT / "models" / "mnist_cnn"), *SMALL, "--calib-mode", "naive",
                                    "--candidates", "3,8,float", "--out", str(out)])
    assert rc == 0
    return out


def test_the_report_holds_its_sections_figures_and_plots(report):
    names = {p.name for p in report.iterdir()}
    assert {"index.md", "sensitivity.json", "search.json", "layer_config.json", "sensitivity.png", "sqnr.png",
            "top1_vs_bits.png", "weight_range_ratio.png", "inputs_1.png", "weight_ranges_1.png"} <= names
    index = (report / "index.md").read_text()
    for heading in ("## Test split", "## Per-layer sensitivity", "## Mixed precision", "## Quantized inputs",
                    "## Weight ranges before and after BatchNorm folding"):
        assert heading in index
    for name in names - {"index.md"}:
        if name.endswith(".png"):
            assert f"]({name})" in index and (report / name).read_bytes().startswith(b"\x89PNG")
    search = json.loads((report / "search.json").read_text())
    assert 100 * (search["fp32_top1"] - search["top1"]) <= 1.0
    assert "the chosen mix" in index and "test split" in index


def test_the_chosen_mix_reads_back_with_layer_config(report, tmp_path, capsys):
    layer_config = report / "layer_config.json"
    rc = quantize_symbol.main([str(ROOT / "models" / "mnist_cnn-symbol.json"), "--weight-bits-width", "3",
                               "--input-bits-width", "3", "--quant-type", "channel", "--layer-config",
                               str(layer_config), "--out", str(tmp_path / "mixed")])
    assert rc == 0
    out = capsys.readouterr().out
    for layer, entry in json.loads(layer_config.read_text()).items():
        assert (f"{layer}: kept in float" in out) if entry == "float" else (f"weight int{entry['weight_bits']}" in
                                                                              out.split(layer + ":")[-1])


@pytest.mark.parametrize("extra, fragments", [
    (["--max-drop", "-1"], ["max_drop=-1: cannot be met even with every layer in float"]),
    (["--layer-config", "{config}"], ["layer_overrides", "'no_such_layer' matches no Convolution"]),
    (["--calib-data", "x.npy"], ["--calib-data"]),
    (["--sweeps", "weights,everything"], ["sweeps: unknown 'everything'"]),
], ids=["max-drop", "layer-config", "calib-data", "sweeps"])
def test_bad_input_is_one_line_naming_it_and_writes_nothing(tmp_path, extra, fragments):
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"mnistcnn_conv1_fwd": {"weight_bits": 8}, "no_such_layer": "float"}))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "analyze_quantization.py"),
                             str(ROOT / "models" / "mnist_cnn"), *SMALL, "--out", str(out),
                             *[e.format(config=config) for e in extra]],
                            capture_output=True, text=True, timeout=600)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last.startswith("analyze_quantization.py: error:") and all(f in last for f in fragments), last
    assert not out.exists()
