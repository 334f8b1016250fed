"""Where models come from: the networks qgraph ships (models/ and BUNDLED), gluoncv's model zoo,
and exported files, all ending as a Graph.

`load_model(name=..., symbol=..., params=...)` is what every tool calls: an exported model
(`symbol`, with `params` or PREFIX-0000.params beside it), or a zoo name whose weights come
from `params` (an exported checkpoint or a save_parameters file, told apart by their keys),
from models/ when qgraph ships that model, or from the zoo's download (`pretrained`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mxnet as mx
from gluoncv.model_zoo import get_model, get_model_list
from gluoncv.nn import GroupNorm
from mxnet.gluon import nn

from .errors import ConfigError, GraphError, mxnet_error_line
from .graph import Graph
from .io import load, load_files, model_files, read_params

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parents[1] / "models"


def mnist_cnn(classes: int = 10):
    """A 28x28 digit classifier with the layer kinds quantization cares about: a first conv,
    a depthwise conv, a 1x1 conv, a 3x3 stride-1 conv (Winograd-eligible), BatchNorm after
    each, and a FullyConnected head."""
    net = nn.HybridSequential(prefix="mnistcnn_")
    with net.name_scope():
        net.add(nn.Conv2D(16, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                nn.MaxPool2D(2),
                nn.Conv2D(16, 3, padding=1, groups=16, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                nn.Conv2D(32, 1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                nn.MaxPool2D(2),
                nn.Conv2D(32, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                nn.GlobalAvgPool2D(), nn.Flatten(),
                nn.Dense(classes))
    return net


BUNDLED = {"mnist_cnn": mnist_cnn}


@dataclass(frozen=True)
class ZooOptions:
    """gluoncv constructor options the seed's tool exposed."""

    use_gn: bool = False
    batch_norm: bool = False
    use_se: bool = False
    last_gamma: bool = False


def model_names() -> list[str]:
    """Every name `build_network` accepts: qgraph's bundled networks, then gluoncv's zoo."""
    return sorted(BUNDLED) + list(get_model_list())


def build_network(name: str, classes: int, pretrained: bool = False, options: ZooOptions = ZooOptions()):
    """An uninitialised (or, with `pretrained`, downloaded) HybridBlock of `name`."""
    if name in BUNDLED:
        if pretrained:
            raise ConfigError(f"--pretrained: {name} is a qgraph model with no zoo weights; pass --params")
        return BUNDLED[name](classes=classes)
    if name not in get_model_list():
        raise ConfigError(f"--model {name}: not a model-zoo name (see --list-models); for an exported model "
                          "use --symbol")
    kwargs = {"classes": classes}
    if options.use_gn:
        kwargs["norm_layer"] = GroupNorm
    if name.startswith("vgg"):
        kwargs["batch_norm"] = options.batch_norm
    elif name.startswith("resnext"):
        kwargs["use_se"] = options.use_se
    if options.last_gamma:
        kwargs["last_gamma"] = True
    try:
        return get_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:  # gluoncv raises many kinds; a download failure is the usual one
        if not pretrained:
            raise ConfigError(f"--model {name}: gluoncv cannot build it with these options "
                              f"({type(err).__name__}: {err})") from None
        reason = str(err).split(" (Caused by")[0][:160]
        raise ConfigError(f"--pretrained: could not get the model zoo's weights for {name} "
                          f"(downloading needs network access; {type(err).__name__}: {reason}); "
                          "offline, pass --params FILE or --symbol FILE") from None


def trainable_network(name: str, classes: int, input_shape, ctx=(mx.cpu(),)):
    """A fresh HybridBlock of `name` to train on `ctx`: He-initialised for ReLU networks
    (MSRAPrelu over fan-in), hybridized, and shaped by one forward of zeros of `input_shape`,
    so that its parameters exist (a checkpoint can replace them)."""
    net = build_network(name, classes)
    net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0), ctx=list(ctx))
    net.hybridize()
    net(mx.nd.zeros(input_shape, ctx=ctx[0]))
    return net


def shipped_prefix(name: str, dataset: str | None = None) -> Path | None:
    """models/NAME_DATASET or models/NAME when qgraph ships that model."""
    for prefix in ([SHIPPED / f"{name}_{dataset}"] if dataset else []) + [SHIPPED / name]:
        if Path(f"{prefix}-symbol.json").is_file():
            return prefix
    return None


def load_model(name: str | None = None, symbol=None, params=None, input_shape=None, dataset: str | None = None,
               classes: int = 10, pretrained: bool = False, options: ZooOptions = ZooOptions()) -> Graph:
    """The Graph of an exported model (`symbol` [+ `params`]) or of a zoo/bundled network `name`
    (weights from `params`, models/, or `pretrained`), with `input_shape` set."""
    shapes = {"data": tuple(input_shape)} if input_shape else None
    if symbol is not None:
        if pretrained or options != ZooOptions():
            raise ConfigError("zoo options (--pretrained, --use-gn, --batch-norm, --use-se, --last-gamma) apply to "
                              "--model built from the model zoo, not to --symbol")
        return load_files(*model_files(symbol, params), input_shapes=shapes)
    if name is None:
        raise ConfigError("give a model name (--model) or an exported model (--symbol)")
    if params is None and not pretrained:
        shipped = shipped_prefix(name, dataset)
        if shipped is None:
            if name not in model_names():
                build_network(name, classes)  # the error says it is not a zoo name
            raise ConfigError(f"--model {name}: no weights; pass --params FILE (exported checkpoint or "
                              "save_parameters file), --symbol FILE-symbol.json, or --pretrained (needs network "
                              "access)")
        log.info("weights: %s-0000.params (shipped with qgraph)", shipped)
        return load_files(*model_files(shipped), input_shapes=shapes)
    block = build_network(name, classes, pretrained, options)
    if pretrained:
        return load(block, input_shape=input_shape)
    return _zoo_graph_with_params(block, Path(params), input_shape)


def _zoo_graph_with_params(block, params_path: Path, shape) -> Graph:
    """A zoo block's traced graph with the weights of `params_path`, either format."""
    stored = read_params(params_path)
    raw_keys = mx.nd.load(str(params_path)).keys()
    if any(key.startswith(("arg:", "aux:")) for key in raw_keys):
        block.initialize()
        graph = load(block, input_shape=shape)
        missing, extra = sorted(set(graph.params) - set(stored)), sorted(set(stored) - set(graph.params))
        if missing or extra:
            raise GraphError(f"{params_path}: does not fit --model (missing {missing[:3]}, extra {extra[:3]}); "
                             "an exported checkpoint needs its own -symbol.json: pass --symbol")
        for name, value in stored.items():
            if value.shape != graph.params[name].shape:
                raise GraphError(f"{params_path}: parameter '{name}' has shape {value.shape}, the model "
                                 f"needs {graph.params[name].shape}")
        return graph.set_params({name: stored[name] for name in graph.params})
    try:
        block.load_parameters(str(params_path))
    except (AssertionError, mx.base.MXNetError) as err:
        first = mxnet_error_line(err) if str(err).strip() else type(err).__name__
        raise GraphError(f"{params_path}: does not fit --model ({first[:300]})") from None
    return load(block, input_shape=shape)


def describe(graph: Graph) -> str:
    """One line per operator: op and name, in topological order."""
    return "\n".join(f"{graph.op(n):20s} {n}" for n in graph.nodes() if graph.op(n) != "null")
