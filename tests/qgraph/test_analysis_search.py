"""qgraph.search_precision: the config it returns meets max_drop on the held-out images when
built and calibrated as a user would, names only layers of the model, spends fewer bits than
int8 when it can; every layer stays at the lowest width when the target allows it; an
unreachable target and mismatched labels are errors naming the field."""
import json

import numpy as np
import pytest
from helpers import MNIST_CNN

import passes
import qgraph
from qgraph import ConfigError, DataError, QuantConfig
from qgraph.analysis import run_precision_search, weight_bits
from qgraph.data import holdout_subset, mnist_split
from qgraph.evaluate import predict

CALIB = mnist_split()[0][0][:100].copy()
VAL_X, VAL_Y = holdout_subset("mnist", per_class=20, calib_per_class=10)
CONFIG = QuantConfig(weight_bits=3, input_bits=3, quant_type="channel", online=False)
LAYERS = ["mnistcnn_conv1_fwd", "mnistcnn_conv2_fwd", "mnistcnn_conv3_fwd", "mnistcnn_dense0_fwd"]


@pytest.fixture(scope="module")
def search():
    return run_precision_search(MNIST_CNN, CONFIG, CALIB, VAL_X, VAL_Y, max_drop=1.0, candidates=(3, 8, None),
                                quantize=passes.quantize, batch_size=100)


def test_the_chosen_config_meets_the_target_when_built(search):
    net = passes.quantize(MNIST_CNN, search.config)
    qgraph.calibrate.Calibration().run(net, CALIB, progress=False)
    top1 = float(np.mean(predict(net, VAL_X, 100) == VAL_Y))
    assert top1 == search.top1
    assert 100 * (search.fp32_top1 - top1) <= 1.0
    assert search.steps[-1].action == "chosen mix, built and calibrated" and search.steps[-1].kept


def test_the_config_is_the_levels_as_overrides(search):
    levels = dict(search.levels)
    assert list(levels) == LAYERS
    overrides = search.config.overrides_json()
    assert set(overrides) == {layer for layer, bits in levels.items() if bits != 3}
    for layer, entry in overrides.items():
        assert entry == ("float" if levels[layer] is None else {"weight_bits": levels[layer],
                                                                 "input_bits": levels[layer]})
    net = passes.quantize(MNIST_CNN, search.config)
    assert {s.layer: s.bits for s in net.weight_specs} == {k: v for k, v in levels.items() if v is not None}
    assert (search.config.weight_bits, search.config.input_bits) == (3, 3)


def test_bits_are_counted_against_int8(search):
    graph = qgraph.load(MNIST_CNN)
    assert search.weight_bits == weight_bits(graph, dict(search.levels))
    assert search.int8_weight_bits == weight_bits(graph, dict.fromkeys(LAYERS, 8))
    assert weight_bits(graph, {}) == 32 * sum(n for _, n in search.weights)
    assert sum(search.share_at(b) for b in (3, 8, None)) == pytest.approx(1.0)
    data = json.loads(search.to_json())
    assert data["weight_bits"] == search.weight_bits and data["layer_overrides"] == search.config.overrides_json()
    assert "weight size" in search.to_markdown()


def test_a_loose_target_keeps_every_layer_at_the_lowest_width():
    config = qgraph.search_precision(MNIST_CNN, CONFIG.replace(weight_bits=8, input_bits=8), CALIB, VAL_X, VAL_Y,
                                     max_drop=50, candidates=(8, 4), quantize=passes.quantize)
    assert config.layer_overrides == () and config.weight_bits == 4


@pytest.mark.parametrize("candidates, where", [((3, None), "in float"), ((3, 8), "at 8 bits")])
def test_an_unreachable_target_is_named(candidates, where):
    with pytest.raises(ConfigError, match=f"max_drop=-1: cannot be met even with every layer {where}"):
        qgraph.search_precision(MNIST_CNN, CONFIG, CALIB, VAL_X, VAL_Y, max_drop=-1, candidates=candidates,
                                quantize=passes.quantize)


def test_bad_input_is_named():
    with pytest.raises(DataError, match="val_labels: 199 labels for 200 images in val_data"):
        qgraph.search_precision(MNIST_CNN, CONFIG, CALIB, VAL_X, VAL_Y[:-1], quantize=passes.quantize)
    with pytest.raises(ConfigError, match="candidates="):
        qgraph.search_precision(MNIST_CNN, CONFIG, CALIB, VAL_X, VAL_Y, candidates=(None,), quantize=passes.quantize)
    with pytest.raises(ConfigError, match="max_drop='1'"):
        qgraph.search_precision(MNIST_CNN, CONFIG, CALIB, VAL_X, VAL_Y, max_drop="1", quantize=passes.quantize)
