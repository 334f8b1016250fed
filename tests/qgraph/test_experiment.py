"""qgraph.experiment: the seed's grids (rows, shared nets, tables) and one simulated evaluation with
evaluation after each calibration epoch, on the bundled MNIST model."""
import pytest
from helpers import MNIST_CNN

import passes
import qgraph
from qgraph import data, experiment
from qgraph.calibrate import Calibration


@pytest.fixture(scope="module")
def setup():
    graph = qgraph.load(f"{MNIST_CNN}-symbol.json", input_shape=(1, 1, 28, 28))
    return graph, data.eval_set("mnist", limit=60), data.calibration_subset("mnist", per_class=2)


def test_the_seed_rows():
    rows = experiment.int8_rows()
    assert len(rows) == 18 and len({r.variant for r in rows}) == 8  # 8 graphs for 18 rows
    assert rows[0].label == "uint8/online/int8 layer +1st-conv"
    lowbit = experiment.grid_rows("lowbit")
    assert [(r.weight_bits, r.offline) for r in lowbit[:3]] == [(6, "naive"), (6, "kl"), (6, "best")]
    assert len(lowbit) == 12 and len({r.variant for r in lowbit}) == 4
    assert experiment.grid_rows("int8", 4, 6)[0].weight_bits == 4


def test_a_grid_row_equals_the_same_configuration_run_alone(setup):
    graph, evalset, calib = setup
    rows = experiment.lowbit_rows()[:2]
    fp32, results = experiment.run_grid(graph, rows, qgraph.QuantConfig(), evalset, calib, Calibration(epochs=1),
                                        passes.quantize)
    table = experiment.format_lowbit_table(fp32, results)
    assert table.splitlines()[0].endswith("| Top1 Acc@naive | Top1 Acc@KL |")  # only the columns that ran
    assert table.splitlines()[3].startswith("| uint6 | int6 | channel | √ | √ |")
    alone = experiment.simulate(graph, qgraph.QuantConfig(weight_bits=6, input_bits=6, quant_type="channel",
                                                          merge_bn=True, online=False), evalset, passes.quantize,
                                Calibration("kl", epochs=1), calib)
    assert alone.accuracy.top1 == results[1][1].top1 and results[1][0].offline == "kl"


def test_evaluation_after_each_naive_epoch(setup):
    graph, evalset, calib = setup
    result = experiment.simulate(graph, qgraph.QuantConfig(online=False), evalset, passes.quantize,
                                 Calibration(epochs=2), calib, eval_per_calib=True)
    assert len(result.per_calibration) == 2 and result.accuracy == result.per_calibration[-1]
    once = experiment.simulate(graph, qgraph.QuantConfig(online=False), evalset, passes.quantize,
                               Calibration("entropy"), calib, eval_per_calib=True)
    assert len(once.per_calibration) == 1
