"""qgraph.sensitivity: the sweeps' figures are the top-1 and SQNR of the configurations they
name, the table ranks the most costly layer first, the result renders as markdown, JSON and
PNGs, and bad input is named."""
import json

import numpy as np
import pytest
from helpers import MNIST_CNN

import passes
import qgraph
from qgraph import ConfigError, DataError, QuantConfig
from qgraph.analysis import sensitivity_of
from qgraph.analysis.variants import Variants
from qgraph.data import mnist_split

(_, _), (TEST_X, TEST_Y) = mnist_split()
IMAGES, LABELS = TEST_X[::5].copy(), TEST_Y[::5].copy()   # 200 held-out digits
CONFIG = QuantConfig(weight_bits=3, input_bits=3, quant_type="channel", online=False)


@pytest.fixture(scope="module")
def result():
    return qgraph.sensitivity(MNIST_CNN, CONFIG, IMAGES, LABELS, quantize=passes.quantize, calib_data=IMAGES[:50],
                              batch_size=100)


def _top1(logits):
    return float(np.mean(logits.argmax(axis=1) == LABELS))


def test_every_figure_is_the_configuration_it_names(result):
    net = passes.quantize(MNIST_CNN, CONFIG)
    qgraph.calibrate.Calibration().run(net, IMAGES[:50], progress=False)
    variants = Variants(net, IMAGES, batch_size=100)
    weights, inputs = variants.weight_specs, variants.input_specs
    fp32 = _top1(variants.logits())
    assert result.fp32_top1 == fp32 and result.images == 200
    assert result.quantized_top1 == _top1(variants.logits(list(weights.values()), list(inputs.values())))
    rows = {r.layer: r for r in result.rows}
    assert list(rows) == variants.layers   # network order
    for layer, row in rows.items():
        assert row.drop_weights == pytest.approx(100 * (fp32 - _top1(variants.logits([weights[layer]]))))
        assert row.drop_input == pytest.approx(100 * (fp32 - _top1(variants.logits([], [inputs[layer]]))))
        others = variants.logits([s for s in weights.values() if s.layer != layer],
                                 [s for s in inputs.values() if s.layer != layer])
        assert row.gain_float == pytest.approx(100 * (_top1(others) - result.quantized_top1))
        assert row.weight_quantizer == "int3 per channel" and row.input_quantizer == "uint3"
        assert np.isfinite(row.sqnr_layer) and np.isfinite(row.sqnr_layer_in_net)
    assert rows["mnistcnn_conv3_fwd"].weights == 32 * 32 * 9


def test_the_table_ranks_the_most_costly_layer_first(result):
    ranked = result.ranked()
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)
    assert ranked[0].score == max(max(r.drop_weights, r.drop_input, r.gain_float) for r in result.rows)
    table = result.to_markdown()
    assert table.index(f"`{ranked[0].layer}`") < table.index(f"`{ranked[-1].layer}`")
    assert f"FP32 {100 * result.fp32_top1:.2f}%" in table


def test_json_and_plots(result, tmp_path):
    data = json.loads(result.to_json())
    assert data["ranking"] == [r.layer for r in result.ranked()]
    assert data["config"]["weight_bits"] == 3 and len(data["layers"]) == len(result.rows)
    written = result.plot(tmp_path / "new" / "plots")
    assert sorted(p.name for p in written) == ["sensitivity.png", "sqnr.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_without_labels_only_sqnr_is_measured_and_ranks():
    net = passes.quantize(MNIST_CNN, CONFIG.replace(online=True))
    result = sensitivity_of(net, IMAGES[:60], sweeps=("weights", "inputs"), batch_size=60)
    assert result.fp32_top1 is None and all(r.drop_weights is None and r.gain_float is None for r in result.rows)
    worst = min(min(r.sqnr_output_weights, r.sqnr_output_input) for r in result.rows)
    assert result.ranked()[0].score == -worst
    assert all(r.sqnr_layer is None for r in result.rows)        # the sqnr sweep was not asked for
    assert list(result.figures()) == ["sqnr.png"]


def test_bad_input_is_named():
    with pytest.raises(DataError, match="labels: 199 labels for 200 images in data"):
        qgraph.sensitivity(MNIST_CNN, CONFIG, IMAGES, LABELS[:-1], quantize=passes.quantize)
    with pytest.raises(ConfigError, match="sweeps: unknown 'everything'"):
        sensitivity_of(passes.quantize(MNIST_CNN, QuantConfig()), IMAGES, sweeps=("everything",))
    with pytest.raises(ConfigError, match="fake_bn"):
        qgraph.sensitivity(MNIST_CNN, CONFIG.replace(fake_bn=True), IMAGES, quantize=passes.quantize)
    with pytest.raises(qgraph.PassError, match="'nope' matches no Convolution"):
        qgraph.sensitivity(MNIST_CNN, CONFIG.replace(layer_overrides={"nope": "float"}), IMAGES,
                           quantize=passes.quantize)
