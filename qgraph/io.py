"""Move graphs in and out: HybridBlock / SymbolBlock / (prefix-symbol.json, .params) <-> Graph.

Files are written atomically (temporary file in the target folder, then rename)
and input files are only ever read.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .errors import GraphError
from .graph import Graph, mxnet_error_line

log = logging.getLogger(__name__)

DEFAULT_INPUT_NAMES = ("data",)


def symbol_and_params_paths(path, params=None) -> tuple[Path, Path | None]:
    """`x-symbol.json` -> (that, x-0000.params if present); a bare prefix works too."""
    path = Path(path)
    if path.name.endswith(".json"):
        symbol_path = path
        prefix = str(path)[: -len("-symbol.json")] if path.name.endswith("-symbol.json") else None
    else:
        symbol_path, prefix = Path(f"{path}-symbol.json"), str(path)
    if params is not None:
        return symbol_path, Path(params)
    if prefix is not None and Path(f"{prefix}-0000.params").exists():
        return symbol_path, Path(f"{prefix}-0000.params")
    return symbol_path, None


def read_params(path) -> dict[str, np.ndarray]:
    """A .params file (exported `arg:`/`aux:` keys or `save_parameters` names) as numpy arrays."""
    import mxnet as mx

    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: no such params file")
    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as err:
        raise GraphError(f"{path}: not an MXNet params file ({mxnet_error_line(err)})") from None
    if not isinstance(loaded, dict):
        raise GraphError(f"{path}: holds an unnamed list of arrays, not named parameters")
    params = {}
    for key, value in loaded.items():
        name = key.split(":", 1)[1] if key.startswith(("arg:", "aux:")) else key
        if name in params:
            raise GraphError(f"{path}: parameter '{name}' is stored twice")
        params[name] = value.asnumpy()
    return params


def load_files(symbol_path, params_path=None, input_names=DEFAULT_INPUT_NAMES,
               input_shapes: dict | None = None) -> Graph:
    """Graph from `prefix-symbol.json` (+ `.params`); missing, extra or mis-shaped params are errors."""
    symbol_path = Path(symbol_path)
    if not symbol_path.is_file():
        raise GraphError(f"{symbol_path}: no such symbol file")
    try:
        text = symbol_path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise GraphError(f"{symbol_path}: cannot read ({err})") from None
    params = read_params(params_path) if params_path is not None else None
    graph = Graph.from_json(text, params, input_names=input_names if params is not None else None,
                            source=str(symbol_path), params_source=str(params_path))
    graph.input_shapes = dict(input_shapes or {})
    if graph.input_shapes and params is not None:
        _check_shapes(graph, params_path)
    return graph


def _check_shapes(graph: Graph, source) -> None:
    """Every parameter has the shape the input shapes imply; the error names the file."""
    try:
        graph.verify()
    except GraphError as err:
        raise GraphError(f"{source}: {err}") from None


def load(source, input_shape=None, params=None, input_names=None) -> Graph:
    """Graph from a Graph, a HybridBlock/SymbolBlock, a `-symbol.json` path or a file prefix.

    `input_shape` is a tuple (single input) or a dict name -> shape; a block that was never
    run needs it so it can be traced.
    """
    import mxnet as mx

    if isinstance(source, Graph):
        return source.copy()
    if isinstance(source, mx.gluon.HybridBlock):
        return from_block(source, input_shape)
    if isinstance(source, (str, os.PathLike)):
        symbol_path, params_path = symbol_and_params_paths(source, params)
        if params_path is None and symbol_path.is_file():
            # without it every weight would silently become a graph input
            raise GraphError(f"{symbol_path}: no PREFIX-0000.params beside it; pass params=")
        graph = load_files(symbol_path, params_path, input_names or DEFAULT_INPUT_NAMES)
        if input_shape is not None:
            graph.input_shapes = _shape_dict(graph.input_names, input_shape)
            if params_path is not None:
                _check_shapes(graph, params_path)
        return graph
    raise GraphError(f"cannot load a graph from {type(source).__name__}; "
                     "give a HybridBlock, a SymbolBlock, a Graph or a -symbol.json path")


def _shape_dict(names, input_shape) -> dict:
    if isinstance(input_shape, dict):
        return {k: tuple(v) for k, v in input_shape.items()}
    if len(names) != 1:
        raise GraphError(f"graph has inputs {names}; give input_shape as a dict name -> shape")
    return {names[0]: tuple(input_shape)}


def from_block(block, input_shape=None) -> Graph:
    """Export a HybridBlock (tracing it with zeros of `input_shape` if never run) into a Graph."""
    import mxnet as mx

    with tempfile.TemporaryDirectory(prefix="qgraph-") as folder:
        prefix = os.path.join(folder, "block")
        try:
            block.export(prefix)
        except RuntimeError:
            if input_shape is None:
                raise GraphError(f"{type(block).__name__} has not been run hybridized; "
                                 "pass input_shape so qgraph can trace it") from None
            shapes = list(input_shape.values()) if isinstance(input_shape, dict) else [input_shape]
            block.hybridize()
            block(*[mx.nd.zeros(tuple(s)) for s in shapes])
            block.export(prefix)
        text = Path(f"{prefix}-symbol.json").read_text()
        if isinstance(block, mx.gluon.SymbolBlock):
            # a SymbolBlock keeps its parameters outside the registry export() walks, so
            # until it has run, export() writes none of them: read them from the block
            variables = set(mx.sym.load_json(text).list_inputs())
            params = {name: p.data().asnumpy() for name, p in block.collect_params().items() if name in variables}
        else:
            params = read_params(f"{prefix}-0000.params")
        graph = Graph.from_json(text, params, source=type(block).__name__)
    if input_shape is not None:
        graph.input_shapes = _shape_dict(graph.input_names, input_shape)
    return graph


def _prefixed_arrays(graph: Graph, symbol) -> dict:
    """The parameters as NDArrays keyed 'arg:name' / 'aux:name', as MXNet saves and loads them."""
    import mxnet as mx

    aux = graph.aux_names(symbol)
    return {("aux:" if k in aux else "arg:") + k: mx.nd.array(v, dtype=v.dtype) for k, v in graph.params.items()}


def to_block(graph: Graph, ctx=None):
    """A SymbolBlock computing `graph`, with its parameters loaded on `ctx`."""
    import mxnet as mx

    ctx = ctx or mx.cpu()
    symbol = graph.to_symbol()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = mx.gluon.SymbolBlock(symbol, [mx.sym.var(n) for n in graph.input_names])
    arrays = _prefixed_arrays(graph, symbol)
    block.collect_params().load_dict(arrays, ctx=ctx, cast_dtype=True, dtype_source="saved")
    return block


def ensure_writable_folder(prefix) -> Path:
    folder = Path(prefix).parent if str(Path(prefix).parent) else Path(".")
    if not folder.is_dir():
        raise GraphError(f"output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GraphError(f"output folder '{folder}' is not writable")
    return folder


def write_text_atomic(path, text: str) -> None:
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(graph: Graph, prefix, epoch: int = 0) -> tuple[Path, Path]:
    """Write `prefix-symbol.json` and `prefix-EEEE.params` atomically; returns both paths."""
    import mxnet as mx

    ensure_writable_folder(prefix)
    symbol_path = Path(f"{prefix}-symbol.json")
    params_path = Path(f"{prefix}-{epoch:04d}.params")
    text = graph.to_json()
    arrays = _prefixed_arrays(graph, graph.to_symbol())
    temps = []
    try:
        for target in (symbol_path, params_path):
            handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(handle)
            temps.append(tmp)
        Path(temps[0]).write_text(text)
        mx.nd.save(temps[1], arrays)
        os.replace(temps[1], params_path)
        os.replace(temps[0], symbol_path)
    except OSError as err:
        raise GraphError(f"cannot write {symbol_path} and {params_path.name}: {err.strerror or err}") from None
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return symbol_path, params_path


_SPATIAL_GUESSES = (224, 32, 28, 299, 64, 96, 112, 128, 256, 331)


def _first_weighted_consumer(graph: Graph, name: str, depth: int = 6):
    """The first Convolution/FullyConnected reached from input `name` through data slots."""
    frontier = [name]
    for _ in range(depth):
        following = []
        for node in frontier:
            for consumer, slot in graph.consumers(node):
                if graph.op(consumer) in ("Convolution", "FullyConnected") and slot == 0:
                    return consumer
                if slot == 0:
                    following.append(consumer)
        frontier = following
    return None


def guess_input_shapes(graph: Graph) -> dict:
    """Input shapes under which every parameter has its stored shape, for a graph that
    declares none: channels from the first layer's weight, spatial sizes tried in turn.
    Returns {} when nothing can be guessed; raises GraphError naming the parameter when
    no guess fits the stored parameters."""
    from . import attrs as A

    if len(graph.input_names) != 1:
        return {}
    name = graph.input_names[0]
    layer = _first_weighted_consumer(graph, name)
    if layer is None or not graph.is_param(graph.inputs(layer)[1].node):
        return {}
    weight = graph.params[graph.inputs(layer)[1].node]
    if graph.op(layer) == "FullyConnected":
        candidates = [(1, weight.shape[1])]
    else:
        kernel = A.get_tuple(graph.attrs(layer), "kernel", (), layer)
        channels = weight.shape[1] * A.get_int(graph.attrs(layer), "num_group", 1, layer)
        candidates = [(1, channels) + (size,) * len(kernel) for size in _SPATIAL_GUESSES]
    best = None
    for candidate in candidates:
        try:
            inferred = graph.infer_shapes({name: candidate})
        except GraphError:
            continue
        wrong = [p for p, v in graph.params.items() if inferred.get(p) != tuple(v.shape)]
        if not wrong:
            return {name: candidate}
        if best is None or len(wrong) < len(best[1]):
            best = (candidate, wrong, inferred)
    if best is None:
        return {}
    candidate, wrong, inferred = best
    param = wrong[0]
    users = sorted({c for c, _ in graph.consumers(param)})
    raise GraphError(f"parameter '{param}' has shape {tuple(graph.params[param].shape)} but {users[:2]} "
                     f"needs {inferred.get(param)} (input shape guessed as {candidate}; "
                     "pass the real input shape (--input-shape) if that is wrong)")


def export_block(block, prefix) -> tuple[Path, Path]:
    """HybridBlock.export, but atomic: export beside the target, then rename both files."""
    folder = ensure_writable_folder(prefix)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as staging:
        staged = os.path.join(staging, "block")
        block.export(staged)
        targets = (Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params"))
        os.replace(f"{staged}-0000.params", targets[1])
        os.replace(f"{staged}-symbol.json", targets[0])
    return targets
