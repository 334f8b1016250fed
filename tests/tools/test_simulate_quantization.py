"""tools/simulate_quantization.py: the seed's flags and defaults, model loading, a run, --grid and --report."""
import json
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

import passes
import qgraph
from qgraph import data, experiment
from qgraph.data import class_balanced_subset, mnist_split
from qgraph.evaluate import top1

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "simulate_quantization.py"
MODEL = ROOT / "models" / "mnist_cnn"

sys.path.insert(0, str(ROOT / "tools"))
import simulate_quantization as sq  # noqa: E402

SEED_DEFAULTS = {  # examples/simulate_quantization.py of hey-yahei/Quantization.MXNet
    "model": None, "print_model": False, "list_models": False, "use_gpu": -1, "use_gn": False,
    "batch_norm": False, "use_se": False, "last_gamma": False, "merge_bn": False, "weight_bits_width": 8,
    "input_signed": False, "input_bits_width": 8, "quant_type": "layer", "num_workers": 4, "batch_size": 128,
    "quantize_input_offline": False, "calib_epoch": 3, "disable_cudnn_autotune": False, "eval_per_calib": False,
    "exclude_first_conv": True, "fixed_random_seed": 7,
}


def _run(argv, capsys):
    rc = sq.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_every_seed_flag_parses_with_the_seed_default():
    args = sq.build_parser().parse_args([])
    for name, default in SEED_DEFAULTS.items():
        assert getattr(args, name) == default, name
    assert args.calib_mode is None and args.num_sample is None  # resolved to naive / 5 per class when used
    assert len(sq.calibration_images(args, "mnist")) == 5 * 10  # the seed's 5 per class


def test_seed_flags_take_the_seed_spellings():
    args = sq.build_parser().parse_args([
        "--model", "cifar_resnet20_v1", "--print-model", "--use-gpu", "1", "--dataset", "cifar10", "--use-gn",
        "--batch-norm", "--use-se", "--last-gamma", "--merge-bn", "--weight-bits-width", "4", "--input-signed",
        "true", "--input-bits-width", "6", "--quant-type", "channel", "-j", "2", "--batch-size", "64",
        "--num-sample", "10", "--quantize-input-offline", "--calib-mode", "kl", "--calib-epoch", "2",
        "--disable-cudnn-autotune", "--eval-per-calib", "--exclude-first-conv", "false",
        "--fixed-random-seed", "3"])
    assert (args.use_gpu, args.weight_bits_width, args.input_bits_width, args.num_workers) == (1, 4, 6, 2)
    assert (args.input_signed, args.quant_type, args.exclude_first_conv, args.calib_mode) == (True, "channel",
                                                                                               False, "kl")
    assert sq.build_parser().parse_args(["--input-signed", "auto"]).input_signed == "auto"
    assert sq.build_parser().parse_args(["--grid"]).grid == "int8"
    assert sq.build_parser().parse_args(["--grid", "lowbit"]).grid == "lowbit"


@pytest.mark.parametrize("argv", [[], ["--dataset", "mnist"]])
def test_missing_model_prints_usage_and_fails(argv, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    assert err.startswith("usage: simulate_quantization.py")
    assert "error: --model is required" in err
    assert out == ""


def test_missing_model_from_the_command_line_exits_non_zero():
    done = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "usage:" in done.stderr and "--model is required" in done.stderr


def test_pretrained_without_network_says_so(capsys, monkeypatch):
    import gluoncv.model_zoo as zoo

    def offline(*args, **kwargs):  # what gluoncv's downloader raises with no route to the zoo
        raise ConnectionError("Failed to establish a new connection: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(zoo.model_store, "download", offline)
    rc, out, err = _run(["--model", "cifar_resnet20_v1", "--dataset", "cifar10", "--pretrained"], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "--pretrained" in lines[0] and "network access" in lines[0] and "--params" in lines[0]


def test_unknown_model_and_model_without_weights_are_clear_errors(capsys):
    rc, _, err = _run(["--model", "no_such_net"], capsys)
    assert rc == 2 and "--model no_such_net: not a model-zoo name" in err
    rc, _, err = _run(["--model", "resnet18_v1", "--dataset", "mnist"], capsys)
    assert rc == 2 and "no weights" in err and "--pretrained" in err


def test_list_models_includes_zoo_and_bundled_names(capsys):
    rc, out, _ = _run(["--list-models"], capsys)
    names = out.split()
    assert rc == 0 and "mnist_cnn" in names and "mobilenet0.5" in names and "cifar_resnet20_v1" in names


@pytest.fixture(scope="module")
def mnist():
    return mnist_split()


def test_run_on_the_bundled_model_matches_the_library(mnist, tmp_path, capsys):
    """The tool's figure equals qgraph.quantize + calibrate + top1 done by hand on the same data."""
    report = tmp_path / "out" / "r.json"
    rc, out, _ = _run(["--symbol", f"{MODEL}-symbol.json", "--quant-type", "channel", "--calib-mode", "naive",
                       "--num-sample", "5", "--report", report, "-q"], capsys)
    assert rc == 0
    (train_x, train_y), (test_x, test_y) = mnist
    net = passes.quantize(str(MODEL), qgraph.QuantConfig(quant_type="channel", online=False))
    net.calibrate(train_x[class_balanced_subset(train_y, 5, seed=7)], "naive", calib_epoch=3, progress=False)
    expected = top1(net, test_x, test_y, batch_size=128)
    assert f"acc     : {100 * expected:.2f}%" in out
    data = json.loads(report.read_text())
    assert data["result"]["top1"] == pytest.approx(expected, abs=1e-12)
    assert data["result"]["images"] == 1000 and data["calibration_images"] == 50
    assert data["calibration"]["mode"] == "naive"
    assert data["calibration"]["thresholds"] == pytest.approx(net.thresholds())
    assert data["config"]["quant_type"] == "channel" and data["config"]["online"] is False
    assert sorted(p.name for p in report.parent.iterdir()) == ["r.json"]


def test_online_run_by_model_name_uses_the_shipped_weights(mnist, capsys):
    rc, out, _ = _run(["--model", "mnist_cnn", "--weight-bits-width", "4", "--num-eval", "300", "-q"], capsys)
    assert rc == 0
    _, (test_x, test_y) = mnist
    net = passes.quantize(str(MODEL), qgraph.QuantConfig(weight_bits=4))
    keep = np.arange(300) * 1000 // 300  # spread over the split, which is sorted by class
    assert len(set(test_y[keep])) == 10
    expected = top1(net, test_x[keep], test_y[keep], batch_size=128)
    assert "result: 300 images" in out and f"acc     : {100 * expected:.2f}%" in out


def test_eval_per_calib_ends_where_a_plain_calibration_ends(tmp_path, capsys):
    common = ["--symbol", f"{MODEL}-symbol.json", "--quantize-input-offline", "--num-sample", "3",
              "--calib-epoch", "2", "--num-eval", "200", "-q"]
    rc, out, _ = _run(common + ["--eval-per-calib", "--report", tmp_path / "per.json"], capsys)
    assert rc == 0 and out.count("acc     :") == 2
    rc, out_plain, _ = _run(common + ["--report", tmp_path / "plain.json"], capsys)
    per, plain = (json.loads((tmp_path / f).read_text()) for f in ("per.json", "plain.json"))
    assert len(per["per_calib"]) == 2
    assert per["result"]["top1"] == plain["result"]["top1"]
    assert per["calibration"]["thresholds"] == pytest.approx(plain["calibration"]["thresholds"], rel=1e-6)


def test_params_file_for_a_zoo_name_in_both_formats(mnist, tmp_path, capsys):
    """--model NAME --params: an exported checkpoint, and a save_parameters file of the same weights."""
    _, (test_x, test_y) = mnist
    common = ["--model", "mnist_cnn", "--no-quantize-input", "--weight-bits-width", "16", "--num-eval", "200", "-q"]
    rc, out_exported, _ = _run(common + ["--params", f"{MODEL}-0000.params"], capsys)
    assert rc == 0
    from qgraph.models import mnist_cnn

    block = mnist_cnn()
    block.initialize()
    block(mx.nd.zeros((1, 1, 28, 28)))
    stored = mx.nd.load(f"{MODEL}-0000.params")
    for name, param in block.collect_params().items():
        param.set_data(stored[("aux:" if "running" in name else "arg:") + name])
    block.save_parameters(str(tmp_path / "saved.params"))
    rc, out_saved, _ = _run(common + ["--params", tmp_path / "saved.params"], capsys)
    assert rc == 0
    assert out_saved == out_exported
    keep = np.arange(200) * 1000 // 200
    expected = top1(qgraph.to_block(qgraph.load(str(MODEL))), test_x[keep], test_y[keep])
    assert f"acc     : {100 * expected:.2f}%" in out_exported  # 16-bit weights, float inputs: the float figure
    (tmp_path / "bad.params").write_bytes(b"\x00garbage" * 10)
    rc, _, err = _run(common + ["--params", tmp_path / "bad.params"], capsys)
    assert rc == 2 and "bad.params" in err and len(err.strip().splitlines()) == 1


def test_symbol_flags_conflicting_with_a_file_model_are_errors(capsys):
    rc, _, err = _run(["--symbol", f"{MODEL}-symbol.json", "--use-gn"], capsys)
    assert rc == 2 and "--use-gn" in err and "apply to --model" in err
    rc, _, err = _run(["--symbol", "/nonexistent/x-symbol.json"], capsys)
    assert rc == 2 and "x-symbol.json" in err


def _table(out: str) -> list:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]


def test_int8_grid_prints_the_seed_table_and_reports_it(mnist, tmp_path, capsys):
    report = tmp_path / "grid.json"
    rc, out, _ = _run(["--symbol", f"{MODEL}-symbol.json", "--grid", "--num-eval", "100", "--num-sample", "2",
                       "--calib-epoch", "1", "--report", report, "-q"], capsys)
    assert rc == 0
    table = _table(out)
    assert table[0] == ["IN dtype", "IN offline", "WT dtype", "WT qtype", "Merge BN", "w/o 1st conv", "Top1 Acc"]
    body = table[2:]
    assert len(body) == 19 and body[0][:4] == ["float32", "/", "float32", "/"]
    expected = [(r.signed, r.offline, r.quant_type, r.merge_bn, r.exclude_first_conv) for r in experiment.int8_rows()]
    got = [(row[0] == "int8", {"x": None, "naive": "naive", "KL": "kl"}[row[1]], row[3], row[4] == "√",
             row[5] == "√") for row in body[1:]]
    assert got == expected
    assert {row[2] for row in body[1:]} == {"int8"}
    data = json.loads(report.read_text())
    assert data["grid"] == "int8" and data["fp32"]["images"] == 100 and len(data["rows"]) == 18
    assert [f"{100 * r['top1']:.2f}%" for r in data["rows"]] == [row[6] for row in body[1:]]
    _, (test_x, test_y) = mnist
    keep = np.arange(100) * 1000 // 100
    fp32 = top1(qgraph.to_block(qgraph.load(str(MODEL))), test_x[keep], test_y[keep])
    assert data["fp32"]["top1"] == pytest.approx(fp32)
    # a row evaluated on its own gives the grid's figure (the grid shares nets between rows)
    row = next(r for r in data["rows"] if r["offline"] == "kl" and r["merge_bn"] and r["quant_type"] == "channel")
    rc, out, _ = _run(["--symbol", f"{MODEL}-symbol.json", "--num-eval", "100", "--num-sample", "2",
                       "--calib-mode", "kl", "--input-signed", "true", "--merge-bn", "--quant-type", "channel",
                       "-q"], capsys)
    assert f"acc     : {100 * row['top1']:.2f}%" in out


def test_lowbit_grid_has_naive_kl_and_best_columns(capsys):
    rc, out, _ = _run(["--symbol", f"{MODEL}-symbol.json", "--grid", "lowbit", "--num-eval", "50",
                       "--num-sample", "2", "--calib-epoch", "1", "-q"], capsys)
    assert rc == 0
    table = _table(out)
    assert table[0][-3:] == ["Top1 Acc@naive", "Top1 Acc@KL", "Top1 Acc@best"]
    assert [row[:2] for row in table[2:]] == [["float32", "float32"], ["uint6", "int6"], ["uint5", "int5"],
                                               ["uint4", "int4"], ["uint3", "int3"]]
    assert all(row[2:5] == ["channel", "√", "√"] for row in table[3:])


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """train.rec/val.rec of 12 JPEGs each (3 classes, odd sizes) and a tiny 224x224 1000-class model."""
    from mxnet.gluon import nn

    from qgraph.io import export_block

    folder = tmp_path_factory.mktemp("imagenet")
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        writer = mx.recordio.MXIndexedRecordIO(str(folder / f"{split}.idx"), str(folder / f"{split}.rec"), "w")
        for i in range(12):
            image = rng.randint(0, 256, (rng.randint(230, 300), rng.randint(230, 320), 3)).astype(np.uint8)
            writer.write_idx(i, mx.recordio.pack_img(mx.recordio.IRHeader(0, float(i % 3), i, 0), image,
                                                     quality=95, img_fmt=".jpg"))
        writer.close()
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 7, strides=8), nn.Activation("relu"), nn.Conv2D(8, 3), nn.Activation("relu"),
            nn.GlobalAvgPool2D(), nn.Dense(1000))
    mx.random.seed(0)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 224, 224)))
    export_block(net, folder / "tiny")
    return folder


def test_imagenet_recordio_path_matches_a_hand_computation(imagenet_like, capsys):
    """Resize 256 + centre crop 224 through RecordIO, a partial last batch, class-balanced calibration."""
    rc, out, _ = _run(["--symbol", imagenet_like / "tiny-symbol.json", "--dataset", "imagenet", "--data-dir",
                       imagenet_like, "--calib-mode", "kl", "--num-sample", "2", "--batch-size", "5",
                       "--quant-type", "channel", "-q"], capsys)
    assert rc == 0 and "result: 12 images" in out
    train, val = imagenet_like / "train.rec", imagenet_like / "val.rec"
    keep = class_balanced_subset(data.record_labels(train), 2, seed=7)
    net = passes.quantize(str(imagenet_like / "tiny"), qgraph.QuantConfig(quant_type="channel", online=False))
    net.calibrate(data.read_records(train, keep, "imagenet"), "kl", progress=False)
    images, labels = data.read_records(val, range(12), "imagenet"), data.record_labels(val)
    assert labels.tolist() == [0, 1, 2] * 4
    expected = top1(net, images, labels, batch_size=5)
    assert f"acc     : {100 * expected:.2f}%" in out
    evalset = data.eval_set("imagenet", imagenet_like)
    streamed = np.concatenate([x for x, _ in evalset.batches(5)])
    np.testing.assert_allclose(streamed, images, atol=1e-5)
