"""Shared pytest setup: MXNet downloads and caches go to a temporary folder, never ~/.mxnet,
and gluoncv's import-time DeprecationWarnings are ignored.

Also the shared model fixtures: tiny Symbol graphs built from stock MXNet operators, with
parameter values, built in code (no downloads, no data files). MXNET_HOME is set at import,
before anything imports MXNet, and again per session by the `mxnet_home` fixture.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

# tests/qgraph (a folder without __init__.py) must never shadow the qgraph package
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ["MXNET_HOME"] = tempfile.mkdtemp(prefix="qgraph-tests-mxnet-home-")
atexit.register(shutil.rmtree, os.environ["MXNET_HOME"], ignore_errors=True)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"mxnet(\..*)?")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:gluoncv.*")
    config.addinivalue_line("filterwarnings", "ignore::UserWarning:mxnet.*")
    config.addinivalue_line("markers", "slow: takes tens of seconds (deselect with -m 'not slow')")


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


# ---------------------------------------------------------------------- tiny models with params
class Model(NamedTuple):
    """A Symbol with parameter values: `params` maps bare names (no arg:/aux: prefix) to numpy."""

    symbol: mx.sym.Symbol
    params: dict
    input_shapes: dict
    aux_names: frozenset

    @property
    def json(self) -> str:
        return self.symbol.tojson()

    def inputs(self, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        return {k: rng.standard_normal(s).astype(np.float32) for k, s in self.input_shapes.items()}


def init_params(symbol, input_shapes: dict, seed: int = 0) -> dict:
    """Sensible, non-trivial values for every parameter and auxiliary state of `symbol`.

    Weights ~ N(0, 1/sqrt(fan_in)), biases and betas small, gammas around 1, BatchNorm
    running statistics random (mean != 0, var != 1), so a no-op BN would be noticed.
    """
    rng = np.random.default_rng(seed)
    arg_shapes, _, aux_shapes = symbol.infer_shape(**input_shapes)
    shapes = dict(zip(symbol.list_arguments(), arg_shapes))
    shapes.update(zip(symbol.list_auxiliary_states(), aux_shapes))
    params = {}
    for name, shape in shapes.items():
        if name in input_shapes:
            continue
        if name.endswith("_weight"):
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
            value = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
        elif name.endswith("_gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("_moving_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("_moving_mean"):
            value = rng.normal(0.0, 0.3, shape)
        else:  # biases, betas
            value = rng.normal(0.0, 0.1, shape)
        params[name] = value.astype(np.float32)
    return params


def make_model(symbol, input_shapes: dict, seed: int = 0) -> Model:
    return Model(symbol, init_params(symbol, input_shapes, seed), dict(input_shapes),
                 frozenset(symbol.list_auxiliary_states()))


def build_everything_symbol():
    """One of each operator shape the IR must round-trip: biased/unbiased, grouped and depthwise
    convolution, Deconvolution, FullyConnected, BatchNorm with fix_gamma True and False,
    Activation, Pooling, Concat, a two-output split whose outputs are read swapped, ops
    reading the same tensor twice, and graph heads in an order that is not topological."""
    S = mx.sym
    data = S.var("data")
    conv1 = S.Convolution(data, num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv1")
    bn1 = S.BatchNorm(conv1, fix_gamma=False, eps=1e-5, name="bn1")
    relu1 = S.Activation(bn1, act_type="relu", name="relu1")
    split = S.SliceChannel(relu1, num_outputs=2, axis=1, name="split")
    swapped = S.Concat(split[1], split[0], dim=1, name="swap")
    gconv = S.Convolution(swapped, num_filter=8, kernel=(3, 3), pad=(1, 1), num_group=2,
                          no_bias=True, name="gconv")
    bn2 = S.BatchNorm(gconv, fix_gamma=True, name="bn2")
    tanh2 = S.Activation(bn2, act_type="tanh", name="tanh2")
    dwconv = S.Convolution(tanh2, num_filter=8, kernel=(3, 3), pad=(1, 1), num_group=8, name="dwconv")
    square = S.broadcast_mul(dwconv, dwconv, name="square")
    doubled = S.elemwise_add(square, square, name="double")
    pool = S.Pooling(doubled, kernel=(2, 2), stride=(2, 2), pool_type="max", name="pool")
    deconv = S.Deconvolution(pool, num_filter=4, kernel=(2, 2), stride=(2, 2), name="deconv")
    bn3 = S.BatchNorm(deconv, fix_gamma=False, eps=1e-4, name="bn3")
    sig3 = S.Activation(bn3, act_type="sigmoid", name="sig3")
    gap = S.Pooling(sig3, kernel=(1, 1), global_pool=True, pool_type="avg", name="gap")
    fc = S.FullyConnected(gap, num_hidden=10, name="fc")
    # heads: not in topological order; the split's second output is a head as well
    return S.Group([fc, split[1], bn2, pool])


EVERYTHING_HEADS = (("fc", 0), ("split", 1), ("bn2", 0), ("pool", 0))


def build_small_symbol():
    """data -> conv -> bn -> relu -> fc: the smallest net with params, aux states and a BN."""
    S = mx.sym
    data = S.var("data")
    conv = S.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv0")
    bn = S.BatchNorm(conv, fix_gamma=False, name="bn0")
    relu = S.Activation(bn, act_type="relu", name="relu0")
    return S.FullyConnected(relu, num_hidden=5, name="fc0")


def build_tiny_symbol():
    """data -> conv (1x1, no bias) -> relu: the smallest graph for edit verbs."""
    S = mx.sym
    conv = S.Convolution(S.var("data"), num_filter=2, kernel=(1, 1), no_bias=True, name="c")
    return S.Activation(conv, act_type="relu", name="r")


@pytest.fixture(scope="session")
def everything() -> Model:
    return make_model(build_everything_symbol(), {"data": (2, 3, 8, 8)}, seed=1)


@pytest.fixture(scope="session")
def small() -> Model:
    return make_model(build_small_symbol(), {"data": (2, 3, 6, 6)}, seed=2)


@pytest.fixture(scope="session")
def tiny() -> Model:
    return make_model(build_tiny_symbol(), {"data": (1, 2, 3, 3)}, seed=3)


def graph_of(model: Model):
    """A qgraph Graph of `model` with its input shapes set."""
    from qgraph import Graph

    graph = Graph.from_json(model.json, model.params)
    graph.input_shapes = dict(model.input_shapes)
    return graph


@pytest.fixture
def small_graph(small):
    return graph_of(small)


@pytest.fixture
def everything_graph(everything):
    return graph_of(everything)


@pytest.fixture
def tiny_graph(tiny):
    return graph_of(tiny)


# ---------------------------------------------------------------------- running graphs with mx.nd
def run_symbol(symbol, params: dict, inputs: dict) -> list:
    """Forward `symbol` (inference mode) through a bound executor; numpy outputs."""
    aux_names = set(symbol.list_auxiliary_states())
    args = {k: mx.nd.array(v, dtype=v.dtype) for k, v in {**params, **inputs}.items() if k not in aux_names}
    aux = {k: mx.nd.array(v, dtype=v.dtype) for k, v in params.items() if k in aux_names}
    executor = symbol.bind(mx.cpu(), args=args, aux_states=aux, grad_req="null")
    return [o.asnumpy() for o in executor.forward(is_train=False)]


def run_block(block, inputs: dict, names) -> list:
    """Forward a (Symbol)Block on numpy inputs given in `names` order; always a list of numpy."""
    out = block(*[mx.nd.array(inputs[n]) for n in names])
    out = out if isinstance(out, (list, tuple)) else [out]
    return [o.asnumpy() for o in out]


def run_graph(graph, inputs: dict) -> list:
    """Forward a qgraph Graph through qgraph.to_block."""
    return run_block(graph.to_block(), inputs, graph.input_names)
