"""Move graphs in and out: HybridBlock / SymbolBlock / (prefix-symbol.json, .params) <-> Graph, and
the one atomic file writer every qgraph output goes through.

Files are written atomically (temporary files in the target folder, renamed once all are
written), get the mode an ordinary open() would give under the caller's umask, and their
folders are created only then, so a failed run leaves neither partial files nor new
folders. Input files are only ever read.
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Mapping, Union

import mxnet as mx
import numpy as np

from . import attrs as A
from . import background, native
from .errors import GraphError, mxnet_error_line
from .graph import Graph

log = logging.getLogger(__name__)

DEFAULT_INPUT_NAMES = ("data",)

# what write_files_atomic writes: text, bytes, or a function that writes the file at the path it is given
FileContent = Union[str, bytes, Callable[[str], None]]


# ---------------------------------------------------------------------- model files
def model_prefix(path) -> str:
    """`x-symbol.json` or `x` -> `x`; another `.json` name -> that name without `.json`."""
    text = str(path)
    if text.endswith("-symbol.json"):
        return text[: -len("-symbol.json")]
    return text[: -len(".json")] if text.endswith(".json") else text


def model_files(path, params=None) -> tuple[Path, Path]:
    """(symbol, params) files of an exported model given `PREFIX-symbol.json` or `PREFIX`, with
    `params` defaulting to PREFIX-0000.params. Raises GraphError naming the file looked for."""
    path = Path(path)
    symbol_path = path if path.name.endswith(".json") else Path(f"{path}-symbol.json")
    if not symbol_path.is_file():
        raise GraphError(f"{symbol_path}: no such symbol file")
    if params is not None:
        params_path = Path(params)
        if not params_path.is_file():
            raise GraphError(f"{params_path}: no such params file")
        return symbol_path, params_path
    params_path = Path(f"{model_prefix(symbol_path)}-0000.params")
    if not params_path.is_file():
        # without it every weight would silently become a graph input
        raise GraphError(f"{symbol_path}: no params file beside it ({params_path} does not exist); "
                         "pass the params file explicitly")
    return symbol_path, params_path


def read_params(path) -> dict[str, np.ndarray]:
    """A .params file (exported `arg:`/`aux:` keys or `save_parameters` names) as numpy arrays.
    NaN or Inf in any value is an error naming the parameter."""
    params = _read_params_unchecked(path)
    check_finite(params, str(path))
    return params


def _read_params_unchecked(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: no such params file")
    loaded = _read_dense_params(path)
    if loaded is None:
        try:
            loaded = mx.nd.load(str(path))
        except mx.base.MXNetError as err:
            raise GraphError(f"{path}: not an MXNet params file ({mxnet_error_line(err)})") from None
        if isinstance(loaded, dict):
            loaded = {key: value.asnumpy() for key, value in loaded.items()}
    if not isinstance(loaded, dict):
        raise GraphError(f"{path}: holds an unnamed list of arrays, not named parameters")
    params = {}
    for key, value in loaded.items():
        name = key.split(":", 1)[1] if key.startswith(("arg:", "aux:")) else key
        if name in params:
            raise GraphError(f"{path}: parameter '{name}' is stored twice")
        params[name] = value
    return params


# MXNet's NDArray file: u64 0x112, u64 0, u64 count, `count` arrays, u64 count, `count` names (u64
# length + UTF-8). A dense array: u32 magic (V2, or V3 with numpy shape semantics), i32 storage type
# 0, i32 ndim, i64 dims, i32 device type, i32 device id, i32 type flag, raw little-endian data.
_LIST_MAGIC = 0x112
_ARRAY_MAGICS = (0xF993FAC9, 0xF993FACA)
_TYPE_FLAGS = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}


def _read_dense_params(path: Path) -> dict[str, np.ndarray] | None:
    """The file's named dense arrays, read with numpy alone; None when the file is anything else
    (sparse or empty arrays, an older version, other types, an unnamed list, a damaged file),
    which mx.nd.load then reads or rejects.

    The arrays are views of a private (copy-on-write) memory map of the file, as safetensors and
    np.load(mmap_mode="c") give them: no copy is made, writing to an array never reaches the
    file, and pages the kernel has cached are mapped rather than read. Copying ResNet-18's 47 MB
    into fresh memory cost 16 ms, most of it page faults; mapping it, well under 1 ms. The
    caveat memory maps share: truncating or rewriting the file in place while its arrays live
    makes reading them fault (SIGBUS). qgraph's writers never do that (they write a temporary
    file and rename it over the old one, whose data stays mapped); MXNet's own save does."""
    try:
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size == 0:
                return None
            mapped = mmap.mmap(stream.fileno(), size, access=mmap.ACCESS_COPY)
        return _parse_dense(np.frombuffer(mapped, np.uint8))
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return None


def _parse_dense(buffer: np.ndarray) -> dict[str, np.ndarray] | None:
    offset = 0

    def header(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from(fmt, buffer, offset)
        offset += struct.calcsize(fmt)
        return values

    if header("<QQ")[0] != _LIST_MAGIC:
        return None
    arrays = []
    for _ in range(header("<Q")[0]):
        magic, storage, ndim = header("<Iii")
        if magic not in _ARRAY_MAGICS or storage != 0 or ndim <= 0:
            return None
        shape = header(f"<{ndim}q")
        dtype = _TYPE_FLAGS.get(header("<iii")[2])
        if dtype is None or min(shape) < 0:
            return None
        dtype = np.dtype(dtype).newbyteorder("<")
        nbytes = dtype.itemsize * math.prod(shape)
        if offset + nbytes > buffer.size:
            raise ValueError("truncated")
        array = buffer[offset:offset + nbytes].view(dtype).reshape(shape)
        arrays.append(array if array.flags.aligned else array.copy())
        offset += nbytes
    names = []
    for _ in range(header("<Q")[0]):
        (length,) = header("<Q")
        if offset + length > buffer.size:
            raise ValueError("truncated")
        names.append(buffer[offset:offset + length].tobytes().decode("utf-8"))
        offset += length
    if offset != buffer.size or len(names) != len(arrays) or not names or len(set(names)) != len(names):
        return None
    return dict(zip(names, arrays))


def check_finite(params: Mapping[str, np.ndarray], source: str) -> None:
    """GraphError naming the first parameter holding NaN or Inf."""
    start_finite_check(params, source, in_background=False)()


def start_finite_check(params: Mapping[str, np.ndarray], source: str,
                       in_background: bool = True) -> Callable[[], None]:
    """check_finite(params, source), begun on the background thread (qgraph.background) when the
    native library is there; the returned call helps finish it (its thread scans the chunks the
    background one has not reached) and raises its GraphError. Loading ResNet-18 checks its
    47 MB while its JSON is parsed and validated. Its load step (medians of 15 runs): 8.0-8.8 ms
    checked so, 11.1-11.3 with the background thread checking alone, 11.5-12.2 with the caller's
    thread checking after parsing. The mapped file's pages are faulted in as they are read,
    which is most of the check's time."""
    host = native.host()
    fast = [(name, value) for name, value in params.items()
            if host is not None and value.dtype == np.float32 and value.flags.c_contiguous and value.size]
    if not fast:
        return lambda: _raise_nonfinite(params, source, _first_nonfinite(params.items()))
    scan = host.nonfinite_scan([value for _, value in fast])
    job = background.submit(scan) if in_background else None
    fast_names = {name for name, _ in fast}

    def finish() -> None:
        scan()
        if job is not None and not job.cancel():  # not cancelled: it started, and may still read
            job.result()
        index = scan.first()
        bad = {fast[index][0] if index >= 0 else None,
               _first_nonfinite((k, v) for k, v in params.items() if k not in fast_names)}
        _raise_nonfinite(params, source, next((name for name in params if name in bad), None))
    return finish


def _first_nonfinite(items) -> str | None:
    """The name of the first floating-point value holding NaN or Inf (numpy), else None."""
    for name, value in items:
        if not np.issubdtype(value.dtype, np.floating):
            continue
        if value.dtype in (np.float32, np.float64) and value.size:
            # a sum of squares is finite only when every value is (a huge value may overflow it:
            # the exact check below then decides); BLAS takes it at memory speed, without the
            # temporary bool array of isfinite
            flat = value.reshape(-1)
            if np.isfinite(np.dot(flat, flat)):
                continue
        if not np.isfinite(value).all():
            return name
    return None


def _raise_nonfinite(params: Mapping[str, np.ndarray], source: str, name: str | None) -> None:
    if name is not None:
        bad = int(np.size(params[name]) - np.isfinite(params[name]).sum())
        raise GraphError(f"{source}: parameter '{name}' holds {bad} NaN or Inf value(s)")


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
    params = _read_params_unchecked(params_path) if params_path is not None else None
    finish_check = start_finite_check(params, str(params_path)) if params is not None else (lambda: None)
    try:
        graph = Graph.from_json(text, params, input_names=input_names if params is not None else None,
                                source=str(symbol_path), params_source=str(params_path))
    except Exception:
        finish_check()  # NaN or Inf in the params is reported before what the JSON is missing
        raise
    finish_check()
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
    """Graph from a Graph (copied), a HybridBlock/SymbolBlock, a `-symbol.json` path or a file prefix.

    `input_shape` is a tuple (single input) or a dict name -> shape; a block that was never
    run needs it so it can be traced.
    """
    if isinstance(source, Graph):
        graph = source.copy()
        if input_shape is not None:
            graph.input_shapes = _shape_dict(graph.input_names, input_shape)
        return graph
    if isinstance(source, mx.gluon.HybridBlock):
        return from_block(source, input_shape)
    if isinstance(source, (str, os.PathLike)):
        symbol_path, params_path = model_files(source, params)
        graph = load_files(symbol_path, params_path, input_names or DEFAULT_INPUT_NAMES)
        if input_shape is not None:
            graph.input_shapes = _shape_dict(graph.input_names, input_shape)
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
            params = _read_params_unchecked(f"{prefix}-0000.params")
        check_finite(params, type(block).__name__)
        graph = Graph.from_json(text, params, source=type(block).__name__)
    if input_shape is not None:
        graph.input_shapes = _shape_dict(graph.input_names, input_shape)
    return graph


def _prefixed_arrays(graph: Graph, symbol) -> dict:
    """The parameters as NDArrays keyed 'arg:name' / 'aux:name', as MXNet saves and loads them."""
    aux = graph.aux_names(symbol)
    return {("aux:" if k in aux else "arg:") + k: mx.nd.array(v, dtype=v.dtype) for k, v in graph.params.items()}


def to_block(graph: Graph, ctx=None, params: mx.gluon.ParameterDict | None = None):
    """A SymbolBlock computing `graph`. Without `params` its parameters are loaded from the
    graph on `ctx`; with a ParameterDict the block shares those Parameter objects instead
    (how QuantizedNet's emissions share one set of weights)."""
    symbol = graph.to_symbol()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = mx.gluon.SymbolBlock(symbol, [mx.sym.var(n) for n in graph.input_names], params=params)
    if params is None:
        block.collect_params().load_dict(_prefixed_arrays(graph, symbol), ctx=ctx or mx.cpu(), cast_dtype=True,
                                         dtype_source="saved")
    return block


def evaluate(graph: Graph, tensors) -> list[np.ndarray]:
    """The values of `tensors` (TensorRefs or node names) that depend on parameters only, such
    as quantized weights, computed by MXNet (inference mode) as the graph would compute them."""
    sub = graph.copy()
    sub.set_outputs(tensors).cleanup()
    needed = [n for n in sub.input_names if sub.consumers(n)]
    if needed:
        raise GraphError(f"cannot evaluate {list(tensors)[:3]}: they depend on the graph inputs {needed}")
    symbol = sub.to_symbol()
    aux = set(symbol.list_auxiliary_states())
    arrays = {k: mx.nd.array(v, dtype=v.dtype) for k, v in sub.params.items()}
    executor = symbol.bind(mx.cpu(), args={k: v for k, v in arrays.items() if k not in aux},
                           aux_states={k: v for k, v in arrays.items() if k in aux}, grad_req="null")
    return [out.asnumpy() for out in executor.forward(is_train=False)]


def save(graph: Graph, prefix, epoch: int = 0) -> tuple[Path, Path]:
    """Write `prefix-symbol.json` and `prefix-EEEE.params` atomically; returns both paths."""
    symbol_path = Path(f"{prefix}-symbol.json")
    params_path = Path(f"{prefix}-{epoch:04d}.params")
    text = graph.to_json()
    arrays = _prefixed_arrays(graph, graph.to_symbol())
    # the params file before the symbol: a reader never sees a new symbol with old params
    write_files_atomic({params_path: lambda tmp: mx.nd.save(tmp, arrays), symbol_path: text})
    return symbol_path, params_path


def export_block(block, prefix) -> tuple[Path, Path]:
    """HybridBlock.export, but atomic and with the caller's file mode."""
    targets = (Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params"))
    with tempfile.TemporaryDirectory(prefix="qgraph-export-") as staging:
        staged = os.path.join(staging, "block")
        block.export(staged)
        write_files_atomic({targets[1]: Path(f"{staged}-0000.params").read_bytes(),
                            targets[0]: Path(f"{staged}-symbol.json").read_text()})
    return targets


# ---------------------------------------------------------------------- atomic writes
def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, then put it back
    os.umask(mask)
    return mask


def check_output_prefix(prefix) -> None:
    """GraphError unless files `prefix*` could be written: the deepest existing folder on the
    way must be a writable folder. Creates nothing (write_files_atomic makes folders)."""
    folder = Path(prefix).parent if str(Path(prefix).parent) else Path(".")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GraphError(f"cannot write under '{folder}': '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GraphError(f"cannot write under '{folder}': '{existing}' is not writable")


def write_files_atomic(contents: Mapping[Path, FileContent]) -> tuple[Path, ...]:
    """Write every path -> content so that either all files are replaced or none is.

    Each goes to a temporary file in its folder first and the renames happen, in the given
    order, only once all are written. Missing folders are created at that point and removed
    again if anything fails. Files get mode 0666 minus the umask, as open() gives."""
    contents = {Path(p): c for p, c in contents.items()}
    for path in contents:
        check_output_prefix(path)
    created: list[Path] = []
    temps: dict[Path, str] = {}
    mode = 0o666 & ~_umask()
    try:
        for path in contents:
            created += _make_folders(path.parent)
        for path, content in contents.items():
            handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps[path] = tmp
            with os.fdopen(handle, "wb") as stream:
                if isinstance(content, (bytes, bytearray)):
                    stream.write(content)
                elif isinstance(content, str):
                    stream.write(content.encode())
            if callable(content):
                content(tmp)
            os.chmod(tmp, mode)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as err:
        raise GraphError(f"cannot write {', '.join(str(p) for p in contents)}: {err.strerror or err}") from None
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        if any(not p.exists() for p in contents):
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    break
    return tuple(contents)


def write_atomic(path, content: FileContent) -> Path:
    """write_files_atomic for one file."""
    return write_files_atomic({Path(path): content})[0]


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


# ---------------------------------------------------------------------- input shapes
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
