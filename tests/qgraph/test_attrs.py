"""qgraph.attrs: MXNet's string attributes parsed and written back, errors naming node and key."""
import pytest

from qgraph import GraphError
from qgraph import attrs as A


@pytest.mark.parametrize("text, value", [("True", True), ("1", True), (" false ", False), ("0", False)])
def test_booleans(text, value):
    assert A.get_bool({"k": text}, "k", not value) is value
    assert A.get_bool({}, "k", value) is value


@pytest.mark.parametrize("text, value", [("(3, 3)", (3, 3)), ("[1,2]", (1, 2)), ("5", (5,)), ("()", ())])
def test_tuples(text, value):
    assert A.get_tuple({"kernel": text}, "kernel", (9,)) == value
    assert A.format_tuple(value) in ("(3, 3)", "(1, 2)", "(5,)", "()")


def test_numbers_and_defaults():
    assert A.get_int({"n": " 16 "}, "n", 0) == 16 and A.get_int({}, "n", 7) == 7
    assert A.get_float({"eps": "1e-5"}, "eps", 0.0) == 1e-5 and A.get_float({}, "eps", 0.5) == 0.5


@pytest.mark.parametrize("getter, text", [(A.get_bool, "maybe"), (A.get_int, "3.5"), (A.get_float, "x"),
                                          (A.get_tuple, "(1, 'a')"), (A.get_tuple, "(1,")])
def test_bad_values_name_the_node_and_key(getter, text):
    with pytest.raises(GraphError, match=r"node 'conv1': attribute key="):
        getter({"key": text}, "key", None, "conv1")


def test_format_round_trips_through_mxnet_spellings():
    assert A.format_tuple((16,)) == "(16,)" and A.format_tuple([3, 3]) == "(3, 3)"
    assert A.format_bool(True) == "True" and A.format_bool(False) == "False"
    assert A.get_tuple({"k": A.format_tuple((2, 4, 6))}, "k", ()) == (2, 4, 6)
