"""The one shared helper module of the tests: tiny models with parameter values (seeded random
weights that keep activations well-scaled), the bundled model's paths, forward passes, and
jobs of several worker processes started by qgraph.launch.

Tests import it directly (`from helpers import ...`); tests/conftest.py wraps some of it as
fixtures.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import mxnet as mx
import numpy as np

import qgraph

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MNIST_CNN = MODELS / "mnist_cnn"
RESNET20 = MODELS / "cifar_resnet20_v1"
MOBILENET = MODELS / "mobilenet0.5_cifar10"
F32 = np.float32


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


def init_params(symbol, input_shapes: dict, seed: int = 0, weight_gain: float = 1.0, weight_std: float | None = None,
                channel_spread: tuple | None = None, bias_std: float = 0.1, mean_std: float = 0.3,
                var_range: tuple = (0.5, 2.0), gamma_range: tuple = (0.5, 1.5)) -> dict:
    """Sensible, non-trivial float32 values for every parameter and auxiliary state of `symbol`:
    the one random-parameter initialiser of the tests.

    Weights ~ N(0, weight_gain / sqrt(fan_in)) (or N(0, weight_std)), each output channel
    scaled by U(channel_spread) when given (so per-channel scales differ); biases and betas
    N(0, bias_std); gammas U(gamma_range); BatchNorm running statistics random (mean
    N(0, mean_std), var U(var_range)), so a no-op BN would be noticed.
    """
    rng = np.random.default_rng(seed)
    arg_shapes, _, aux_shapes = symbol.infer_shape(**input_shapes)
    shapes = dict(zip(symbol.list_arguments(), arg_shapes))
    shapes.update(zip(symbol.list_auxiliary_states(), aux_shapes))
    params = {}
    for name, shape in shapes.items():
        if name in input_shapes:
            continue
        if name.endswith("weight"):
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
            std = weight_std if weight_std is not None else weight_gain / np.sqrt(max(fan_in, 1))
            value = rng.normal(0.0, std, shape)
            if channel_spread is not None:
                value = value * rng.uniform(*channel_spread, (shape[0],) + (1,) * (len(shape) - 1))
        elif name.endswith("gamma"):
            value = rng.uniform(*gamma_range, shape)
        elif name.endswith("moving_var"):
            value = rng.uniform(*var_range, shape)
        elif name.endswith("moving_mean"):
            value = rng.normal(0.0, mean_std, shape)
        else:  # biases, betas
            value = rng.normal(0.0, bias_std, shape)
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


def conv_deconv_graph():
    """data (1 channel) -> Convolution 'c' -> Deconvolution 'd', both with biases: a quantizable
    layer most deployment runtimes have no int8 kernel for."""
    S = mx.sym
    out = S.Deconvolution(S.Convolution(S.var("data"), num_filter=2, kernel=(1, 1), name="c"), num_filter=2,
                          kernel=(2, 2), no_bias=False, name="d")
    params = {"c_weight": np.ones((2, 1, 1, 1), F32), "c_bias": np.zeros(2, F32), "d_weight": np.ones((2, 2, 2, 2), F32),
              "d_bias": np.zeros(2, F32)}
    return qgraph.Graph.from_json(out.tojson(), params, input_names=["data"])


def graph_of(model: Model):
    """A qgraph Graph of `model` with its input shapes set."""
    graph = qgraph.Graph.from_json(model.json, model.params)
    graph.input_shapes = dict(model.input_shapes)
    return graph


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
    return run_block(qgraph.to_block(graph), inputs, graph.input_names)



def digest(folder) -> dict:
    """File name -> sha256 of every file in `folder`: inputs must come out of a failed run untouched."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def write_recordio(folder, name="set", count=6, corrupt=None, shape=(12, 10, 3), classes=3):
    """A small indexed RecordIO file NAME.rec + NAME.idx of random JPEGs labelled i % classes;
    record `corrupt` holds bytes that are no image. Returns the .rec path."""
    rng = np.random.RandomState(0)
    writer = mx.recordio.MXIndexedRecordIO(str(Path(folder) / f"{name}.idx"), str(Path(folder) / f"{name}.rec"), "w")
    for i in range(count):
        header = mx.recordio.IRHeader(0, float(i % classes), i, 0)
        if i == corrupt:
            writer.write_idx(i, mx.recordio.pack(header, b"not an image at all"))
        else:
            image = rng.randint(0, 256, shape).astype(np.uint8)
            writer.write_idx(i, mx.recordio.pack_img(header, image, quality=95, img_fmt=".jpg"))
    writer.close()
    return Path(folder) / f"{name}.rec"


# ---------------------------------------------------------------------- dist kvstore jobs
def launch(workers: int, *command, timeout: float = 300, **options) -> subprocess.CompletedProcess:
    """`python -m qgraph.launch -n WORKERS -s 1 -- COMMAND...` from the repository root, output
    captured as text with carriage returns kept (the launcher exits with the first failure's
    status, or 0)."""
    job = subprocess.run([sys.executable, "-m", "qgraph.launch", "-n", str(workers), "-s", "1", "--",
                          *map(str, command)], capture_output=True, cwd=ROOT, timeout=timeout,
                         env=dict(os.environ, **options.pop("env", {})), **options)
    return subprocess.CompletedProcess(job.args, job.returncode, job.stdout.decode(), job.stderr.decode())


def int8_result(line: str, runtime: str) -> tuple[float, float, float]:
    """(runtime top-1, simulated top-1, agreement %) from an exporter's last --verify line,
    `RUNTIME int8 top1 A, simulated top1 B, agreement C%` (qgraph.deploy.workflow.report)."""
    match = re.fullmatch(rf"{re.escape(runtime)} int8 top1 (\S+), simulated top1 (\S+), agreement (\S+)%", line)
    assert match, line
    return tuple(map(float, match.groups()))


MXNET_LOG_LINE = re.compile(r"\[\d\d:\d\d:\d\d\] \.\./(src|3rdparty)/")


def worker_lines(output: str, rank: int) -> list[str]:
    """The lines a launched worker printed, without their `[worker N] ` prefix, each as a terminal
    shows it (what follows its last carriage return: progress bars end with one); MXNet's own C++
    log lines (`[HH:MM:SS] ../src/...`, e.g. "Subgraph backend MKLDNN is activated") left out."""
    prefix = f"[worker {rank}] "
    lines = [line[len(prefix):].split("\r")[-1] for line in output.split("\n") if line.startswith(prefix)]
    return [line for line in lines if line.strip() and not MXNET_LOG_LINE.match(line)]
