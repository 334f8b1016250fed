"""tools/train.py on the bundled MNIST data: data-parallel FP32 training over two CPU contexts,
QAT with fake BN, quantization delay, BN freeze and --fix-params; two workers with MXNet's dist
kvstore (qgraph.launch), which train exactly as one process over two contexts on the same
batches and calibrate the thresholds one process would; --resume continuing a run exactly; and
its one-line errors, none of which hangs."""
import socket
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from helpers import launch, worker_lines

import passes
import qgraph
from qgraph import calibrate, checkpoint, data, distributed, models, training

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
    (["--weight-range", "mse", "--out", "x"], "--weight-range mse is for --qat"),
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


MNIST_SYMBOL = ROOT / "models" / "mnist_cnn-symbol.json"
SHORT = ("--epochs", "2", "--steps-per-epoch", "3")
QAT = ("--qat", "--symbol", MNIST_SYMBOL, "--dataset", "mnist", "--weight-bits-width", "4", "--input-bits-width", "4",
       "--quant-type", "channel", "--input-signed", "auto", "--fake-bn", "--quant-delay", "2", "--freeze-bn-after", "4",
       "--num-sample", "10")


def _params(prefix) -> dict:
    return {k: v.asnumpy() for k, v in mx.nd.load(f"{prefix}-0000.params").items()}


def _max_difference(one: dict, two: dict) -> float:
    assert one.keys() == two.keys()
    return max(float(np.abs(one[k] - two[k]).max()) for k in one)


@pytest.mark.parametrize("mode", ["fp32", "qat", "qat_weight_range"])
def test_resume_continues_a_run_exactly(tmp_path, mode):
    """One epoch, then a resumed one, gives the weights of two epochs straight (QAT: the quant
    delay ends in the first epoch and BatchNorm freezes in the second; with --weight-range mse
    the resumed run keeps the ranges the run started with)."""
    flags = (*SHORT, *(("--model", "mnist_cnn") if mode == "fp32" else QAT),
             *(("--weight-range", "mse") if mode == "qat_weight_range" else ()))
    straight = _run(*flags, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    first = _run(*flags, "--stop-after", "1", "--out", tmp_path / "resumed")
    assert first.returncode == 0, first.stderr
    after_one = _params(tmp_path / "resumed")
    state = checkpoint.load(tmp_path / "resumed-checkpoint.npz")
    assert (state.epoch, state.step) == (1, 3)
    second = _run(*flags, "--resume", tmp_path / "resumed-checkpoint.npz", "--out", tmp_path / "resumed")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "after epoch 1 (step 3)" in second.stderr
    assert "epoch 1: test top-1" not in second.stderr and "epoch 2: test top-1" in second.stderr
    assert _max_difference(_params(tmp_path / "resumed"), _params(tmp_path / "straight")) <= 1e-6
    assert _max_difference(after_one, _params(tmp_path / "straight")) > 1e-3  # the second epoch did train
    assert checkpoint.load(tmp_path / "resumed-checkpoint.npz").epoch == 2


def _zero_codes(prefix) -> float:
    """The fraction of zero codes in the quantized (not the float first) layers of a -fixed graph."""
    fixed = qgraph.load(f"{prefix}-fixed-symbol.json")
    weights = [fixed.params[fixed.inputs(n)[1].node] for n in fixed.nodes(("Convolution", "FullyConnected"))
               if n != "mnistcnn_conv0_fwd"]
    codes = [w.reshape(w.shape[0], -1) / np.abs(w.reshape(w.shape[0], -1)).max(1, keepdims=True) for w in weights]
    return float(np.mean(np.concatenate([np.abs(c).ravel() < 0.5 for c in codes])))


def test_weight_range_mse_clips_2_bit_weights_so_fewer_round_to_zero(tmp_path):
    """At 2 bits the contract's max|W| step zeroes most weights; the least-squared-error ranges
    keep more of them, in the deployable graph too."""
    flags = (*QAT, "--weight-bits-width", "2", "--epochs", "1", "--steps-per-epoch", "2", "--fix-params")
    plain = _run(*flags, "--out", tmp_path / "max")
    clipped = _run(*flags, "--weight-range", "mse", "--out", tmp_path / "mse")
    assert plain.returncode == 0, plain.stderr
    assert clipped.returncode == 0, clipped.stderr
    assert "clipped" in clipped.stderr and "least-squared-error ranges" in clipped.stderr
    assert "before QAT: test top-1" in clipped.stderr
    assert "clipped" not in plain.stderr
    assert _zero_codes(tmp_path / "mse") < _zero_codes(tmp_path / "max") - 0.1


def test_learn_thresholds_trains_the_calibrated_thresholds(tmp_path):
    """--learn-thresholds starts from the thresholds plain QAT keeps (same calibration) and moves them."""
    fixed = _run(*QAT, *SHORT, "--out", tmp_path / "ste")
    learned = _run(*QAT, *SHORT, "--learn-thresholds", "--out", tmp_path / "lsq")
    assert fixed.returncode == 0 and learned.returncode == 0, fixed.stderr + learned.stderr
    assert "offline, learned (LSQ)" in learned.stdout + learned.stderr
    thresholds = [{k: v for k, v in _params(tmp_path / run).items() if k.endswith("_data_threshold")}
                  for run in ("ste", "lsq")]
    assert thresholds[0] and thresholds[0].keys() == thresholds[1].keys()
    assert _max_difference(*thresholds) > 1e-4
    assert all(float(v.min()) > 0 for v in thresholds[1].values())


def _one_process_over_two_contexts(batch_size: int, epochs: int, steps: int) -> dict:
    """What train.py's two dist_sync workers compute, in this process: each step's batch is
    worker 0's batch then worker 1's, split over two contexts, and BatchNorm's running
    statistics averaged over the contexts after every epoch."""
    shards = [data.train_shard("mnist", None, 2, part) for part in range(2)]

    def batches(epoch):
        for (x0, y0), (x1, y1) in zip(*(shard.batches(epoch, batch_size, 0) for shard in shards)):
            yield mx.nd.concat(x0, x1, dim=0), mx.nd.concat(y0, y1, dim=0)

    contexts = [mx.cpu(0), mx.cpu(1)]
    mx.random.seed(0)
    net = models.trainable_network("mnist_cnn", 10, (1, 1, 28, 28), contexts)
    trainer = training.Optimization("adam", 0.003, 1e-4, total_steps=epochs * steps).trainer(
        net.collect_params(), update_on_kvstore=False)
    alone = distributed.Workers()
    training.fit(net, trainer, batches, epochs, steps, contexts, progress=False,
                 after_epoch=lambda *_: alone.average_statistics(net.collect_params().values()))
    return {name: p.data().asnumpy() for name, p in net.collect_params().items()}


@pytest.mark.slow
def test_two_dist_sync_workers_train_as_one_process_over_two_contexts(tmp_path):
    out = tmp_path / "dist"
    job = launch(2, sys.executable, TOOL, "--kvstore", "dist_sync", "--model", "mnist_cnn", *SHORT,
                 "--batch-size", "32", "--out", out)
    assert job.returncode == 0, job.stderr
    rank0, rank1 = worker_lines(job.stderr, 0), worker_lines(job.stderr, 1)
    assert "epoch 1: test top-1" in " ".join(rank0) and "epoch 2: test top-1" in " ".join(rank0)
    assert rank1 == []  # rank 0 alone logs ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist-0000.params", "dist-checkpoint.npz",
                                                          "dist-symbol.json"]  # ... and writes
    assert checkpoint.load(f"{out}-checkpoint.npz").settings["workers"] == 2
    exported = {k.split(":", 1)[1]: v for k, v in _params(out).items()}
    reference = _one_process_over_two_contexts(32, 2, 3)
    assert _max_difference(exported, reference) <= 1e-6
    untrained = models.trainable_network("mnist_cnn", 10, (1, 1, 28, 28))
    assert _max_difference(exported, {n: p.data().asnumpy() for n, p in untrained.collect_params().items()}) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("kvstore", ["dist_sync", "dist_device_sync", "dist_async"])
def test_qat_over_dist_kvstores_keeps_the_thresholds_one_process_calibrates(tmp_path, kvstore):
    out = tmp_path / "qat"
    job = launch(2, sys.executable, TOOL, "--kvstore", kvstore, *QAT, *SHORT, "--batch-size", "32", "--out", out)
    assert job.returncode == 0, job.stderr
    assert worker_lines(job.stderr, 1) == []
    assert "calibrated 4 input thresholds (naive)" in job.stderr and "epoch 2: test top-1" in job.stderr
    exported = qgraph.QuantizedNet.load(out)
    single = passes.quantize(qgraph.load(MNIST_SYMBOL), qgraph.QuantConfig(
        weight_bits=4, input_bits=4, quant_type="channel", input_signed="auto", fake_bn=True, online=False))
    calibrate.Calibration("naive").run(single, data.calibration_subset("mnist", None, 10, 7), progress=False)
    assert exported.thresholds() == single.thresholds()  # calibrated on the same images, never trained
    trained = exported.parameter_values()
    assert _max_difference({n: trained[n] for n in single.float_graph.params},
                           {n: v for n, v in single.parameter_values().items()}) > 1e-3
    assert Path(f"{out}-checkpoint.npz").exists() == (kvstore != "dist_async")


def test_a_dist_kvstore_without_the_dmlc_environment_is_one_line():
    result = _run("--kvstore", "dist_sync", "--out", "x")
    assert result.returncode == 2
    assert result.stderr == ("train.py: error: --kvstore dist_sync needs a worker's DMLC environment (DMLC_ROLE, "
                             "DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER, DMLC_NUM_WORKER unset): start the "
                             "workers with python -m qgraph.launch -n WORKERS -s SERVERS -- COMMAND\n")


@pytest.mark.slow
def test_a_worker_count_that_does_not_divide_the_data_stops_the_job(tmp_path):
    job = launch(3, sys.executable, TOOL, "--kvstore", "dist_sync", *SHORT, "--out", tmp_path / "x", timeout=120)
    assert job.returncode == 2
    errors = [line for rank in range(3) for line in worker_lines(job.stderr, rank) if "error" in line]
    assert errors and all(line == "train.py: error: the 4000 mnist training images do not split evenly over 3 "
                                  "workers: use a worker count that divides 4000 (2, 4, 5, 8, 10, 16, ...)"
                          for line in errors)
    assert "exited with status 2; stopping the others" in job.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_model_is_one_line(tmp_path):
    fp32 = _run("--model", "mnist_cnn", "--epochs", "1", "--steps-per-epoch", "1", "--out", tmp_path / "fp32")
    assert fp32.returncode == 0, fp32.stderr
    result = _run(*QAT, *SHORT, "--resume", tmp_path / "fp32-checkpoint.npz", "--out", tmp_path / "qat")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line == (f"train.py: error: {tmp_path / 'fp32-checkpoint.npz'}: a checkpoint of another model "
                    "(mnist_cnn; this run trains mnist_cnn-symbol.json)")
    assert not (tmp_path / "qat-symbol.json").exists()


def test_a_launcher_port_in_use_is_one_line():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "qgraph.launch", "-n", "2", "-s", "1", "--port", str(port), "--",
                                 sys.executable, TOOL, "--kvstore", "dist_sync", "--out", "x"],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"qgraph.launch: error: --port {port} on 127.0.0.1 is in use: pick another or leave "
                             "--port out\n")
