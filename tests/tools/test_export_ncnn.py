"""tools/export_ncnn.py: FP32 and int8 export with --verify on bundled MNIST, and one clear line
(exit 2, no output files, inputs untouched) for bad input."""
import re
import shutil
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from helpers import digest, int8_result

from qgraph.data import mnist_split
from qgraph.deploy import ncnn as deploy

pytest.importorskip("ncnn")

ROOT = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(ROOT / "tools"))
import export_ncnn  # noqa: E402


@pytest.fixture
def run(run_main):
    return lambda argv: run_main(export_ncnn.main, argv)


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_ncnn.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--verify" in text and "--calib-mode" in text


def test_fp32_export_verifies_against_mxnet(model, tmp_path, run):
    out = tmp_path / "out" / "mnist"
    out.parent.mkdir()
    rc, stdout, _ = run([f"{model}-symbol.json", "--out", out, "--no-int8", "--verify"])
    assert rc == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist.bin", "mnist.param"]
    match = re.search(r"fp32 ncnn vs MXNet: max relative difference (\S+) over 16 images \(ok\)", stdout)
    assert match and float(match.group(1)) <= 1e-4


def test_int8_export_and_verify_last_line(model, mnist_files, tmp_path, run):
    calib, test = mnist_files
    out = tmp_path / "out" / "mnist"
    out.parent.mkdir()
    rc, stdout, _ = run([f"{model}-symbol.json", "--out", out, "--calib-data", calib, "--calib-mode", "naive",
                          "--verify", "--verify-data", test, "-q"])
    assert rc == 0
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["mnist-int8.bin", "mnist-int8.param", "mnist.bin", "mnist.param", "mnist.table"]
    last = stdout.strip().splitlines()[-1]
    ncnn_top1, sim_top1, agreement = int8_result(last, "ncnn")
    assert agreement >= 98.0 and abs(ncnn_top1 - sim_top1) <= 1.0
    # the reported ncnn accuracy is the int8 files' accuracy, recomputed here independently
    (_, _), (x_test, y_test) = mnist_split()
    model_int8 = deploy.NcnnRunner(f"{out}-int8.param", f"{out}-int8.bin",
                                   output_name="mnistcnn_dense0_fwd",
                                   options=dict(deploy.FLOAT32_OPTIONS, use_int8_inference=True))
    top1 = 100 * (model_int8(x_test[:200]).argmax(1) == y_test[:200]).mean()
    assert top1 == pytest.approx(ncnn_top1, abs=0.005)
    # the first conv is int8 by default, as ncnn2table would have it
    table = deploy.Table.load(f"{out}.table")
    assert "mnistcnn_conv0_fwd" in table.inputs and len(table.inputs) == len(table.weights) == 5
    assert "8=2" in Path(f"{out}-int8.param").read_text()


def test_exclude_first_conv_leaves_it_out_of_the_table(model, mnist_files, tmp_path, run):
    calib, _ = mnist_files
    rc, _, _ = run([f"{model}-symbol.json", "--out", tmp_path / "m8", "--calib-data", calib,
                     "--exclude-first-conv", "true", "-q"])
    assert rc == 0
    table = deploy.Table.load(tmp_path / "m8.table")
    assert "mnistcnn_conv0_fwd" not in table.inputs and len(table.inputs) == 4


def _unsupported_model(folder: Path) -> Path:
    data = mx.sym.var("data")
    conv = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), name="conv")
    out = mx.sym.Deconvolution(conv, num_filter=2, kernel=(2, 2), name="up")
    rng = np.random.default_rng(0)
    out.save(str(folder / "bad-symbol.json"))
    mx.nd.save(str(folder / "bad-0000.params"),
               {"arg:conv_weight": mx.nd.array(rng.standard_normal((4, 3, 3, 3))),
                "arg:conv_bias": mx.nd.zeros(4),
                "arg:up_weight": mx.nd.array(rng.standard_normal((4, 2, 2, 2)))})
    return folder / "bad"


@pytest.mark.parametrize("case", ["unsupported_op", "unsigned_inputs", "four_bits", "missing_symbol",
                                  "no_calibration_data", "verify_without_data", "missing_calib_file"])
def test_bad_input_is_one_line_exit_2_and_no_output(case, model, tmp_path, run):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in Path(model).parent.glob("m-*"):
        shutil.move(str(path), inputs / path.name)
    model = inputs / "m"
    bad = _unsupported_model(inputs)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x"
    argv = {
        "unsupported_op": [f"{bad}-symbol.json", "--input-shape", "1,3,8,8", "--no-int8"],
        "unsigned_inputs": [f"{model}-symbol.json", "--input-signed", "false", "--calib-data", "nothing.npy"],
        "four_bits": [f"{model}-symbol.json", "--weight-bits-width", "4", "--calib-data", "nothing.npy"],
        "missing_symbol": [inputs / "nothing-symbol.json", "--no-int8"],
        "no_calibration_data": [f"{model}-symbol.json"],
        "verify_without_data": [f"{model}-symbol.json", "--calib-data", "nothing.npy", "--verify"],
        "missing_calib_file": [f"{model}-symbol.json", "--calib-data", tmp_path / "nothing.npy"],
    }[case]
    before = digest(inputs)
    rc, stdout, stderr = run(argv + ["--out", out])
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_ncnn.py: error: ")
    expected = {"unsupported_op": r"node 'up': op Deconvolution", "unsigned_inputs": "--input-signed true",
                "four_bits": "8-bit", "missing_symbol": "nothing-symbol.json", "no_calibration_data": "--calib-data",
                "verify_without_data": "--verify-data", "missing_calib_file": "nothing.npy"}[case]
    assert re.search(expected, lines[0]), lines[0]
    assert list(out_dir.iterdir()) == []
    assert digest(inputs) == before
