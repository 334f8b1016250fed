"""Parameter values written on qgraph's background thread: Graph.params waits for the job writing a
value (param_shape, names and membership do not), copies share the wait, a failed job's error
reaches the reader; fold_bn's background products and load's background finite check give what
the numpy paths give (on the shipped ResNet-20's trained weights), and errors name the same
parameter."""
from __future__ import annotations

import threading

import mxnet as mx
import numpy as np
import pytest
from helpers import RESNET20, graph_of

import passes
import qgraph
from qgraph import GraphError, background, native

F32 = np.float32


def _gated_write(array: np.ndarray, value: float):
    """A background job writing `value` into `array` once the returned gate is set."""
    gate = threading.Event()

    def write():
        assert gate.wait(30)
        array[...] = value
    return background.submit(write), gate


def _finishes(call, timeout: float = 10.0):
    """call() on a thread; its result, failing if it is still blocked after `timeout` seconds."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", call()))
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked on a pending parameter"
    return result["value"]


def test_reading_a_pending_value_waits_for_its_job_and_nothing_else_does(small_graph):
    name = "conv0_weight"
    array = np.zeros_like(small_graph.params[name])
    small_graph.set_param(name, array)
    job, gate = _gated_write(array, 7.0)
    small_graph.mark_pending([name], job)
    copy = small_graph.copy()
    # neither the shape, the names, membership nor another value waits for the job
    assert _finishes(lambda: small_graph.param_shape(name)) == array.shape
    assert _finishes(lambda: name in small_graph.params and len(list(small_graph.params)) == len(small_graph.params))
    assert _finishes(lambda: small_graph.params["fc0_weight"].shape) == small_graph.param_shape("fc0_weight")
    assert not job.done()
    threading.Timer(0.2, gate.set).start()
    assert np.all(small_graph.params[name] == 7.0)  # waited: the job had not written when asked
    assert np.all(copy.params[name] == 7.0)
    assert isinstance(small_graph.params, type(qgraph.Graph().params))  # nothing pending: the plain view


def test_a_replaced_value_is_not_waited_for_and_a_failed_job_raises_where_read(small_graph):
    name, other = "conv0_weight", "fc0_weight"
    job, gate = _gated_write(np.zeros(1, F32), 1.0)
    small_graph.mark_pending([name], job)
    small_graph.set_param(name, np.ones(small_graph.param_shape(name), F32))
    assert _finishes(lambda: float(small_graph.params[name].sum())) == float(np.prod(small_graph.param_shape(name)))
    gate.set()

    def fail():
        raise MemoryError("no room for the products")
    failed = background.submit(fail)
    small_graph.mark_pending([other], failed)
    with pytest.raises(MemoryError, match="no room"):
        small_graph.params[other]
    small_graph.mark_pending([other], failed)
    with pytest.raises(MemoryError):
        small_graph.copy().settle()
    with pytest.raises(GraphError, match="'nothing' is not a parameter"):
        small_graph.mark_pending(["nothing"], job)


def test_wait_all_waits_for_every_job():
    array = np.zeros(3, F32)
    job, gate = _gated_write(array, 2.0)
    threading.Timer(0.2, gate.set).start()
    background.wait_all()
    assert job.done() and np.all(array == 2.0)


def _fold(source, monkeypatch, native_on: bool):
    monkeypatch.setenv("QGRAPH_NATIVE", "1" if native_on else "0")
    submitted = []
    original = background.submit
    monkeypatch.setattr(background, "submit", lambda *a, **k: submitted.append(1) or original(*a, **k))
    folded, _ = qgraph.PassManager(passes.build_pipeline("fold_bn")).run(qgraph.load(source))
    values = {k: np.array(v) for k, v in folded.params.items()}
    return values, len(submitted)


@pytest.mark.skipif(not native.available(), reason="qgraph's native library is unavailable here (no C++ compiler?)")
def test_fold_bn_in_the_background_gives_the_numpy_fold_bit_for_bit(monkeypatch):
    """The shipped ResNet-20: the finite check and the products run on the background thread
    (two jobs), and every folded parameter has numpy's bits."""
    background_fold, jobs = _fold(RESNET20, monkeypatch, native_on=True)
    numpy_fold, numpy_jobs = _fold(RESNET20, monkeypatch, native_on=False)
    assert (jobs, numpy_jobs) == (2, 0)
    assert background_fold.keys() == numpy_fold.keys()
    for name, value in numpy_fold.items():
        assert value.dtype == background_fold[name].dtype
        assert np.array_equal(value.view(np.uint8), background_fold[name].view(np.uint8)), name


@pytest.mark.parametrize("native_on", [True, False], ids=["background", "numpy"])
def test_load_names_the_first_nonfinite_parameter_before_what_the_json_lacks(saved, small, monkeypatch, native_on):
    monkeypatch.setenv("QGRAPH_NATIVE", "1" if native_on else "0")
    arrays = mx.nd.load(f"{saved}-0000.params")
    weight = arrays["arg:fc0_weight"].asnumpy()
    weight.ravel()[-1] = np.nan
    arrays["arg:fc0_weight"] = mx.nd.array(weight)
    mx.nd.save(f"{saved}-0000.params", arrays)
    with pytest.raises(GraphError, match=r"model-0000.params: parameter 'fc0_weight' holds 1 NaN or Inf"):
        qgraph.load(saved)
    text = open(f"{saved}-symbol.json").read()
    open(f"{saved}-symbol.json", "w").write(text.replace('"Activation"', '"NoSuchOperator"'))
    with pytest.raises(GraphError, match="'fc0_weight' holds 1 NaN or Inf"):
        qgraph.load(saved)


@pytest.mark.parametrize("native_on", [True, False], ids=["background", "numpy"])
def test_finite_check_names_the_first_bad_parameter_across_dtypes(monkeypatch, native_on):
    monkeypatch.setenv("QGRAPH_NATIVE", "1" if native_on else "0")
    bad32, bad64 = np.array([1, np.nan], F32), np.array([np.inf, 1.0])
    for params, first in (({"a": bad64, "b": bad32}, "a"), ({"a": bad32, "b": bad64}, "a"),
                          ({"ok": np.ones(3, F32), "b": bad64[::-1]}, "b"),
                          ({"ok": np.ones((3, 3), F32).T, "c": bad32}, "c")):
        with pytest.raises(GraphError, match=f"parameter '{first}' holds 1 NaN"):
            qgraph.io.check_finite(params, "f.params")
        with pytest.raises(GraphError, match=f"parameter '{first}' holds 1 NaN"):
            qgraph.io.start_finite_check(params, "f.params")()
    qgraph.io.start_finite_check({"w": np.ones(5, F32), "v": np.ones(2)}, "f.params")()
