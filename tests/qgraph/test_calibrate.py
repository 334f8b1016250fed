"""QuantizedNet.calibrate on the bundled trained model: every mode, determinism, checks against
statistics computed independently from copied activations, and clear errors."""
import json
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

import passes
import qgraph
from qgraph import observers
from qgraph.data import class_balanced_subset, mnist_split

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "mnist_cnn-symbol.json"
BATCH = 40


@pytest.fixture(scope="module")
def calibration_images():
    (x_train, y_train), _ = mnist_split()
    return x_train[class_balanced_subset(y_train, 12, seed=3)]


def _net(**fields):
    return passes.quantize(MODEL, qgraph.QuantConfig(online=False, quant_type="channel", **fields))


def _layer_inputs(net, images):
    """The float activations each quantized layer reads, copied out of a float network."""
    graph = qgraph.load(MODEL)
    internals = graph.to_symbol().get_internals()
    block = qgraph.to_block(graph)
    result = {}
    for spec in net.input_specs:
        ref = graph.inputs(spec.layer)[0]
        symbol = internals[f"{ref.node}_output"] if ref.node not in graph.input_names else internals[ref.node]
        tap = mx.gluon.SymbolBlock(symbol, [mx.sym.var("data")], params=block.collect_params())
        # the same batches as calibration: oneDNN's rounding depends on the batch size
        result[spec.layer] = np.concatenate([tap(mx.nd.array(images[i:i + BATCH])).asnumpy()
                                             for i in range(0, len(images), BATCH)])
    return result


@pytest.mark.parametrize("mode", ["naive", "kl", "entropy", "percentile", "mse"])
def test_every_mode_is_deterministic_and_switches_to_offline(mode, calibration_images):
    first = _net().calibrate(calibration_images, mode, batch_size=BATCH, progress=False)
    net = _net()
    second = net.calibrate(calibration_images, mode, batch_size=BATCH, progress=False)
    assert first == second
    assert all(v["method"] == mode and v["bits"] == 8 and v["threshold"] > 0 for v in second.values())
    assert net.mode.inputs and not net.mode.online
    _, (x_test, y_test) = mnist_split()
    from qgraph.evaluate import top1

    if mode != "kl":  # the seed's KL picks tiny thresholds on this model's spiky inputs
        assert top1(net, x_test, y_test) > 0.9


def test_naive_single_pass_single_batch_equals_the_batch_maximum(calibration_images):
    net = _net()
    batch = calibration_images[:64]
    result = net.calibrate(batch, "naive", calib_epoch=1, batch_size=64, progress=False)
    activations = _layer_inputs(net, batch)
    # the online quantizer is active during calibration, so only the first quantized layer
    # sees float inputs; its threshold is exactly that batch's maximum
    first = net.input_specs[0].layer
    assert result[first]["threshold"] == pytest.approx(float(activations[first].max()), rel=1e-6)


def test_naive_is_an_ema_started_from_the_first_batch(calibration_images):
    net = _net()
    net.calibrate(calibration_images[:40], "naive", calib_epoch=1, batch_size=BATCH, progress=False)
    one = net.thresholds()
    net.calibrate(calibration_images[:40], "naive", calib_epoch=3, batch_size=BATCH, progress=False)
    # the same batch three times: EMA of a constant from its first value stays that value
    for layer, value in net.thresholds().items():
        assert value == pytest.approx(one[layer], rel=1e-5)


def test_kl_thresholds_match_histograms_of_copied_activations(calibration_images):
    net = _net()
    result = net.calibrate(calibration_images, "kl", batch_size=BATCH, progress=False)
    checked = 0
    for layer, activations in _layer_inputs(net, calibration_images).items():
        values = np.maximum(activations.ravel(), 0)  # unsigned inputs: relu, zeros left out
        if values.size < 100000:
            # a few thousand values over 2048 bins: MXNet's float32 binning moves a handful of
            # values to a neighbouring bin and the seed's KL argmin jumps with them
            continue
        checked += 1
        hist, top = _one_pass_histogram(values, first_batch=values[:values.size * BATCH // len(activations)])
        expected = observers.kl_threshold(hist, top, 256)
        assert result[layer]["threshold"] == pytest.approx(expected, rel=1e-4), layer
    assert checked == 3


def _one_pass_histogram(values, first_batch, fine=64):
    """qgraph's one-pass rule, written out: a grid of 2048 * fine bins over the first batch's
    range (twice over), its first bin (exact zeros) dropped, merged j bins at a time with j the
    least covering the whole-set maximum. Returns (2048 counts, their upper end)."""
    width = float(first_batch.max()) / (2048 * fine)
    merge = int(np.ceil(values.max() / (2048 * width)))
    top = 2048 * merge * width
    kept = values[values >= width]
    return np.histogram(kept, bins=2048, range=(0, top))[0], top


def test_one_pass_range_covers_the_whole_set_within_one_part_in_64(calibration_images):
    net = _net()
    result = net.calibrate(calibration_images, "percentile", percentile=100.0, batch_size=BATCH, progress=False)
    for layer, activations in _layer_inputs(net, calibration_images).items():
        whole_set_max = float(np.maximum(activations, 0).max())
        # percentile 100 is the upper edge of the last occupied bin: at or above the maximum,
        # and above it by at most one bin of a range at most 1/64 wider than the maximum
        assert whole_set_max * (1 - 1e-6) <= result[layer]["threshold"] <= whole_set_max * (1 + 1 / 64) * (1 + 1 / 2048)


def test_signed_auto_inputs_use_absolute_values(calibration_images):
    net = _net(input_signed=True)
    result = net.calibrate(calibration_images, "percentile", batch_size=BATCH, progress=False)
    for layer, activations in _layer_inputs(net, calibration_images).items():
        values = np.abs(activations.ravel())
        assert result[layer]["signed"]
        hist, top = _one_pass_histogram(values, first_batch=values[:values.size * BATCH // len(activations)])
        # the first bin edge with at least 99.99 % of the values at or below it, within one bin:
        # MXNet bins in float32, so a value on an edge may land in the neighbouring bin
        expected = observers.percentile_threshold(hist, top, 99.99)
        assert abs(result[layer]["threshold"] - expected) <= top / 2048 * 1.001


@pytest.mark.parametrize("bad, message", [
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), "NaN or Inf"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x), "NaN or Inf"),
    (lambda x: x[:0], "empty"),
])
def test_bad_calibration_data_is_a_clear_error(bad, message, calibration_images):
    with pytest.raises(qgraph.QGraphError, match=message):
        _net().calibrate(bad(calibration_images), "kl", progress=False)


def test_unknown_mode_and_nothing_to_calibrate_are_errors(calibration_images):
    with pytest.raises(qgraph.ConfigError, match="not one of"):
        _net().calibrate(calibration_images, "minmax", progress=False)
    weights_only = passes.quantize(MODEL, qgraph.QuantConfig(quantize_input=False))
    with pytest.raises(qgraph.ConfigError, match="nothing to calibrate"):
        weights_only.calibrate(calibration_images, "naive", progress=False)


def test_class_balanced_subset_is_balanced_deterministic_and_checked():
    labels = np.repeat(np.arange(4), [5, 6, 7, 8])
    first = class_balanced_subset(labels, 5, seed=1)
    assert np.array_equal(first, class_balanced_subset(labels, 5, seed=1))
    assert np.bincount(labels[first]).tolist() == [5, 5, 5, 5]
    assert not np.array_equal(first, class_balanced_subset(labels, 5, seed=2))
    with pytest.raises(qgraph.ConfigError, match="class 0 has 5 samples"):
        class_balanced_subset(labels, 6)


def test_quantize_symbol_calibrates_and_writes_a_report(tmp_path, calibration_images, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import quantize_symbol

    labels = np.repeat(np.arange(10), len(calibration_images) // 10)
    np.savez(tmp_path / "calib.npz", data=calibration_images, label=labels)
    out, report = tmp_path / "q", tmp_path / "report.json"
    rc = quantize_symbol.main([str(MODEL), "--out", str(out), "--calib-mode", "kl", "--calib-data",
                               str(tmp_path / "calib.npz"), "--num-sample", "5", "--report", str(report),
                               "--quant-type", "channel"])
    assert rc == 0, capsys.readouterr().err
    thresholds = json.loads(report.read_text())["calibration"]
    assert len(thresholds) == 4 and all(v["method"] == "kl" for v in thresholds.values())
    reloaded = qgraph.QuantizedNet.load(str(out))
    assert not reloaded.mode.online
    assert reloaded.thresholds() == pytest.approx({k: v["threshold"] for k, v in thresholds.items()})
    plain = mx.gluon.SymbolBlock.imports(f"{out}-symbol.json", ["data"], f"{out}-0000.params")
    x = mx.nd.array(calibration_images[:16])
    assert np.array_equal(plain(x).asnumpy(), reloaded(x).asnumpy())


def test_a_tensor_outgrowing_its_grid_gets_an_exact_second_pass(calibration_images):
    images = calibration_images.copy()
    images[:BATCH] *= 0.05  # a faint first batch: later batches overflow the grid it fixes
    net = _net()
    result = net.calibrate(images, "kl", batch_size=BATCH, progress=False)
    first = net.input_specs[0].layer  # the first quantized layer reads float activations of the images
    values = np.maximum(_layer_inputs(net, images)[first].ravel(), 0)
    top = float(values.max())
    hist = np.histogram(values[values > 0], bins=2048, range=(0, top))[0]
    assert result[first]["threshold"] == pytest.approx(observers.kl_threshold(hist, top, 256), rel=1e-4)
