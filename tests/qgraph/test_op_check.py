"""qgraph.op_check: operator arity as MXNet composes it, and the attribute values that crash MXNet
refused with a GraphError naming the node."""
import pytest

from qgraph import GraphError
from qgraph.op_check import arity, check_node


@pytest.mark.parametrize("op, attrs, expected", [
    ("Convolution", {"kernel": "(3, 3)", "num_filter": "4"}, (3, 1)),
    ("Convolution", {"kernel": "(3, 3)", "num_filter": "4", "no_bias": "True"}, (2, 1)),
    ("BatchNorm", {}, (5, 3)),            # MXNet hides the batch mean and var outputs
    ("SliceChannel", {"num_outputs": "3"}, (1, 3)),
    ("FullyConnected", {"num_hidden": "2"}, (3, 1)),
    ("elemwise_add", {}, (2, 1)),
])
def test_arity(op, attrs, expected):
    assert arity(op, tuple(sorted(attrs.items()))) == expected


def test_check_node_counts_inputs_and_returns_outputs():
    assert check_node("c", "Convolution", {"kernel": "(1, 1)", "num_filter": "2"}, 3) == 1
    with pytest.raises(GraphError, match=r"node 'c' \(Convolution\) has 2 inputs; MXNet needs 3"):
        check_node("c", "Convolution", {"kernel": "(1, 1)", "num_filter": "2"}, 2)


@pytest.mark.parametrize("op, attrs, message", [
    ("Convolution", {"kernel": "(3, 3)", "num_filter": "4", "num_group": "0"}, "num_group=0 must be at least 1"),
    ("Convolution", {"kernel": "(0, 3)", "num_filter": "4"}, "kernel=.* must be at least 1 everywhere"),
    ("FullyConnected", {"num_hidden": "0"}, "num_hidden=0"),
    ("Pooling", {"kernel": "(2, 2)", "stride": "(0, 1)"}, "stride"),
])
def test_values_that_crash_mxnet_are_refused(op, attrs, message):
    with pytest.raises(GraphError, match=message):
        check_node("bad", op, attrs, 3)


def test_unknown_operators():
    with pytest.raises(GraphError, match="node 'x': operator NoSuchOp cannot be built"):
        check_node("x", "NoSuchOp", {}, 1)
    assert check_node("x", "NoSuchOp", {}, 1, unknown_ok=True) is None
