"""Shared pytest setup: MXNet downloads and caches go to a temporary folder, never ~/.mxnet,
and gluoncv's import-time DeprecationWarnings are ignored.

Also the fixtures over tests/helpers.py's tiny models (Symbol graphs built from stock MXNet
operators, with parameter values, built in code: no downloads, no data files). MXNET_HOME is
set at import, before anything imports MXNet, and again per session by the `mxnet_home` fixture.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

# tests/qgraph (a folder without __init__.py) must never shadow the qgraph package
ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT), str(ROOT / "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

os.environ["MXNET_HOME"] = tempfile.mkdtemp(prefix="qgraph-tests-mxnet-home-")
atexit.register(shutil.rmtree, os.environ["MXNET_HOME"], ignore_errors=True)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"mxnet(\..*)?")

import mxnet as mx  # noqa: E402
import pytest  # noqa: E402
from helpers import (EVERYTHING_HEADS, Model, build_everything_symbol, build_small_symbol,  # noqa: E402,F401
                     build_tiny_symbol, graph_of, init_params, make_model, run_block, run_graph, run_symbol)


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:gluoncv.*")
    config.addinivalue_line("filterwarnings", "ignore::UserWarning:mxnet.*")
    config.addinivalue_line("markers", "slow: takes tens of seconds (deselect with -m 'not slow')")


@pytest.fixture(scope="session", autouse=True)
def fused_operators():
    """qgraph's fused operators, built (on a fresh machine: about 5 s of g++) before any test
    runs rather than in the middle of one, where the compile competes with timed work such as
    a dist kvstore job's workers."""
    from qgraph import native

    return native.available()


@pytest.fixture(scope="session", autouse=True)
def mxnet_home(tmp_path_factory):
    """MXNET_HOME points at a session temporary folder for every test."""
    folder = tmp_path_factory.mktemp("mxnet_home")
    old = os.environ.get("MXNET_HOME")
    os.environ["MXNET_HOME"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("MXNET_HOME", None)
    else:
        os.environ["MXNET_HOME"] = old


@pytest.fixture(scope="session")
def everything() -> Model:
    return make_model(build_everything_symbol(), {"data": (2, 3, 8, 8)}, seed=1)


@pytest.fixture(scope="session")
def small() -> Model:
    return make_model(build_small_symbol(), {"data": (2, 3, 6, 6)}, seed=2)


@pytest.fixture(scope="session")
def tiny() -> Model:
    return make_model(build_tiny_symbol(), {"data": (1, 2, 3, 3)}, seed=3)


@pytest.fixture
def saved(small, tmp_path):
    """The small model saved by MXNet's own writer as prefix-symbol.json + prefix-0000.params."""
    prefix = tmp_path / "model"
    small.symbol.save(f"{prefix}-symbol.json")
    arrays = {("aux:" if k in small.aux_names else "arg:") + k: mx.nd.array(v) for k, v in small.params.items()}
    mx.nd.save(f"{prefix}-0000.params", arrays)
    return prefix


@pytest.fixture
def small_graph(small):
    return graph_of(small)


@pytest.fixture
def everything_graph(everything):
    return graph_of(everything)


@pytest.fixture
def tiny_graph(tiny):
    return graph_of(tiny)




@pytest.fixture(params=["fused", "chain"])
def input_form(request, monkeypatch):
    """Runs a test with the input quantizers as qgraph's fused operators (qgraph.native) and as
    MXNet operator chains (QGRAPH_NATIVE=0): the two must agree everywhere."""
    if request.param == "fused":
        from qgraph import native

        if not native.available():
            if os.environ.get("CI"):
                pytest.fail("qgraph's fused operators did not build on CI (is g++ installed?)")
            pytest.skip("qgraph's fused operators are unavailable here (no C++ compiler?)")
    else:
        monkeypatch.setenv("QGRAPH_NATIVE", "0")
    return request.param
