"""tools/train.py on the bundled MNIST data: data-parallel FP32 training over two CPU contexts,
QAT with fake BN, quantization delay, BN freeze and --fix-params, and its one-line errors."""
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

import qgraph

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "train.py")


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_fp32_training_is_data_parallel_over_two_cpu_contexts(tmp_path):
    out = tmp_path / "mnist"
    result = _run("--model", "mnist_cnn", "--epochs", "1", "--steps-per-epoch", "4", "--cpus", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "epoch 1: test top-1" in result.stderr
    block = mx.gluon.SymbolBlock.imports(f"{out}-symbol.json", ["data"], f"{out}-0000.params")
    assert block(mx.nd.zeros((2, 1, 28, 28))).shape == (2, 10)


def test_qat_with_fake_bn_exports_a_quantized_net_and_a_fixed_graph(tmp_path):
    out = tmp_path / "qat"
    result = _run("--qat", "--symbol", ROOT / "models" / "mnist_cnn-symbol.json", "--dataset", "mnist",
                  "--weight-bits-width", "4",
                  "--input-bits-width", "4", "--quant-type", "channel", "--input-signed", "auto", "--fake-bn",
                  "--epochs", "1", "--steps-per-epoch", "4", "--quant-delay", "1", "--freeze-bn-after", "3",
                  "--cpus", "2", "--num-sample", "10", "--fix-params", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "before QAT: test top-1" in result.stderr and "epoch 1: test top-1" in result.stderr
    assert "deployable graph (BN folded, weights fixed): test top-1" in result.stderr
    net = qgraph.QuantizedNet.load(out)
    assert net.weight_specs and net.input_specs
    fixed = qgraph.load(f"{out}-fixed-symbol.json")
    # every BatchNorm is folded, the float first conv's included, as a deployment does
    assert list(fixed.nodes("BatchNorm")) == []
    for layer in set(fixed.nodes("Convolution")) - {"mnistcnn_conv0_fwd"}:
        weight = fixed.params[fixed.inputs(layer)[1].node]
        scale = np.abs(weight).reshape(weight.shape[0], -1).max(1).reshape(-1, 1, 1, 1) / 7
        integers = weight / np.where(scale == 0, 1, scale)
        np.testing.assert_allclose(integers, np.round(integers), atol=1e-4, err_msg=layer)
    images = mx.nd.array(np.random.RandomState(0).rand(4, 1, 28, 28).astype(np.float32))
    fixed_block = mx.gluon.SymbolBlock.imports(f"{out}-fixed-symbol.json", ["data"], f"{out}-fixed-0000.params")
    np.testing.assert_allclose(fixed_block(images).asnumpy(), net(images).asnumpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--qat", "--out", "x"], "--qat needs --symbol"),
    (["--qat", "--symbol", "missing-symbol.json", "--out", "x"], "missing-symbol.json: no such symbol file"),
    (["--symbol", "m-symbol.json", "--out", "x"], "--symbol is for --qat"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()[-1]) < 300


def test_qat_calibrates_on_calib_data_when_given(tmp_path):
    from qgraph.data import mnist_split

    (images, labels), _ = mnist_split()
    np.savez(tmp_path / "calib.npz", data=images[:100], labels=labels[:100])
    out = tmp_path / "qat"
    result = _run("--qat", "--symbol", ROOT / "models" / "mnist_cnn-symbol.json", "--dataset", "mnist",
                  "--calib-data", tmp_path / "calib.npz", "--num-sample", "3", "--epochs", "1",
                  "--steps-per-epoch", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "calibrated 4 input thresholds (naive)" in result.stderr
    missing = _run("--qat", "--symbol", ROOT / "models" / "mnist_cnn-symbol.json", "--dataset", "mnist",
                   "--calib-data", tmp_path / "nope.npz", "--out", out)
    assert missing.returncode == 2 and "nope.npz: no such calibration data" in missing.stderr
