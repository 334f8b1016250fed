"""tools/export_mxnet_int8.py: the int8 symbol + params with --verify on bundled MNIST, and one
clear line (exit 2, no output files, inputs untouched) for settings oneDNN's int8 cannot run."""
import re
import shutil
import sys
from pathlib import Path

import mxnet as mx
import pytest
from helpers import digest, int8_result

from qgraph.data import mnist_split

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import export_mxnet_int8  # noqa: E402


@pytest.fixture
def run(run_main):
    return lambda argv: run_main(export_mxnet_int8.main, argv)


def test_int8_export_and_verify_last_line(model, mnist_files, tmp_path, run):
    calib, test = mnist_files
    out = tmp_path / "out" / "mnist-int8"
    rc, stdout, _ = run([f"{model}-symbol.json", "--out", out, "--calib-data", calib, "--calib-mode", "naive",
                          "--verify", "--verify-data", test])
    assert rc == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist-int8-0000.params", "mnist-int8-symbol.json"]
    lines = stdout.strip().splitlines()
    mx_top1, sim_top1, agreement = int8_result(lines[-1], "mxnet")
    assert agreement >= 98.0 and abs(mx_top1 - sim_top1) <= 1.0
    assert re.fullmatch(r"fp32 MXNet executor \(oneDNN fusion\) vs Gluon: max relative difference \S+ over 16 "
                        r"images \(ok\)", lines[-2])
    assert any(line.startswith("note: mnistcnn_relu3_fwd: requantized by MXNet") for line in lines)
    # what MXNet users deploy: the files load with SymbolBlock.imports and give the reported top-1
    block = mx.gluon.SymbolBlock.imports(f"{out}-symbol.json", ["data"], f"{out}-0000.params")
    (_, _), (x_test, y_test) = mnist_split()
    top1 = 100 * (block(mx.nd.array(x_test[:200])).argmax(1).asnumpy() == y_test[:200]).mean()
    assert top1 == pytest.approx(mx_top1, abs=0.005)


CASES = {
    "signed_inputs": (["--input-signed", "true"], "--input-signed auto"),
    "layer_weights": (["--quant-type", "layer"], "--quant-type channel"),
    "winograd_full": (["--wino-quantize", "F43", "--wino-mode", "full"], "--wino-quantize"),
    "four_bits": (["--input-bits-width", "4"], "8-bit"),
    "verify_without_data": (["--verify"], "--verify-data"),
    "missing_calib_file": (["--calib-data", "MISSING"], "nothing.npy"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_no_output(case, model, mnist_files, tmp_path, run):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in list(Path(model).parent.glob("m-*")) + list(mnist_files):
        shutil.move(str(path), inputs / path.name)
    flags, expected = CASES[case]
    flags = ["--calib-data", inputs / "calib.npy"] + [tmp_path / "nothing.npy" if f == "MISSING" else f for f in flags]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = digest(inputs)
    rc, _, stderr = run([inputs / "m-symbol.json"] + flags + ["--out", out_dir / "x"])
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_mxnet_int8.py: error: "), stderr
    assert re.search(expected, lines[0]), lines[0]
    assert list(out_dir.iterdir()) == []
    assert digest(inputs) == before
