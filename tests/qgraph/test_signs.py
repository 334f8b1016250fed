"""qgraph.signs: which tensors are provably non-negative."""
import mxnet as mx
import numpy as np
import pytest

from qgraph import Graph, TensorRef
from qgraph.signs import is_non_negative

S = mx.sym


def _graph(symbol, params=None):
    return Graph.from_json(symbol.tojson(), params or {}, input_names=["data"])


@pytest.mark.parametrize("build, expected", [
    (lambda x: S.relu(x), True),
    (lambda x: S.Activation(x, act_type="relu"), True),
    (lambda x: S.Activation(x, act_type="tanh"), False),
    (lambda x: S.LeakyReLU(x, act_type="leaky", slope=0.0), True),
    (lambda x: S.LeakyReLU(x, act_type="leaky", slope=0.1), False),
    (lambda x: S.clip(x, a_min=0, a_max=6), True),
    (lambda x: S.clip(x, a_min=-1, a_max=6), False),
    (lambda x: S.Pooling(S.relu(x), kernel=(2, 2), pool_type="max"), True),
    (lambda x: S.Concat(S.relu(x), S.sigmoid(x), dim=1), True),
    (lambda x: S.Concat(S.relu(x), x, dim=1), False),
    (lambda x: S.elemwise_add(S.relu(x), S.abs(x)), True),
    (lambda x: S.elemwise_sub(S.relu(x), S.abs(x)), False),
    (lambda x: S.relu(x) * 2.0, True),
    (lambda x: S.relu(x) * -2.0, False),
    (lambda x: S.BatchNorm(S.relu(x), name="bn"), False),
    (lambda x: x, False),
])
def test_producers(build, expected):
    symbol = build(S.var("data"))
    shapes = dict(zip(symbol.list_arguments() + symbol.list_auxiliary_states(),
                      sum(symbol.infer_shape(data=(1, 2, 4, 4))[::2], [])))
    graph = _graph(symbol, {n: np.ones(s, np.float32) for n, s in shapes.items() if n != "data"})
    assert is_non_negative(graph, graph.outputs[0]) is expected


def test_parameters_count_by_their_values():
    symbol = S.elemwise_add(S.relu(S.var("data")), S.var("offset"))
    for value, expected in ((np.array([0.0, 2.0]), True), (np.array([0.5, -1.0]), False)):
        graph = _graph(symbol, {"offset": value.astype(np.float32)})
        assert is_non_negative(graph, TensorRef(graph.outputs[0].node)) is expected


def test_memo_is_shared():
    graph = _graph(S.relu(S.var("data"), name="r"))
    memo = {}
    assert is_non_negative(graph, TensorRef("r"), memo) and memo == {"r": True}
