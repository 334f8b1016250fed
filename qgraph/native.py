"""qgraph's fused operators for MXNet: C++ sources beside this module (qgraph/native/*.cc), built
with the system's C++ compiler on first use and registered with MXNet (MXLoadLib).

`qgraph_fake_quant` replaces the chain of scalar operators of an input quantizer with a baked
threshold (six passes over the activation forward, two backward) by one pass each way, with
the same float32 arithmetic and so the same values, ties included; `qgraph_fake_quant_online`
does the same for the evaluation form with the batch's threshold, `qgraph_fake_quant_learned`
for the training form with a learned (LSQ) threshold, its gradient included;
`qgraph_fake_quant_weight` computes a weight quantizer (a scale per group along the first axis)
in one pass instead of eleven operators; `qgraph_fingerprint`
gives a weighted sum of each input, which tells the evaluation form that weights changed. The
same library holds plain C functions over host arrays (`host()`: BatchNorm folding's products
and the finite check of loaded parameters, one GIL-free call per batch of arrays). The
library is cached per source, MXNet and CPU (it is built for the CPU it runs on) under
$QGRAPH_CACHE_DIR, else $XDG_CACHE_HOME/qgraph, else ~/.cache/qgraph. Without a compiler, or
with QGRAPH_NATIVE=0, `available()` is False and the quantizer emits the operator chains
instead: same values, slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call, mx_uint

log = logging.getLogger(__name__)

FAKE_QUANT_OP = "qgraph_fake_quant"
ONLINE_FAKE_QUANT_OP = "qgraph_fake_quant_online"
LEARNED_FAKE_QUANT_OP = "qgraph_fake_quant_learned"
WEIGHT_FAKE_QUANT_OP = "qgraph_fake_quant_weight"
FINGERPRINT_OP = "qgraph_fingerprint"
SOURCES = tuple(Path(__file__).resolve().parent / "native" / name for name in ("fake_quant.cc", "host_arrays.cc"))
_MXNET = Path(mx.__file__).resolve().parent
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17")

_state: dict = {}  # "loaded": bool once tried, "reason": why not, "path": the library loaded


def _disabled() -> bool:
    return os.environ.get("QGRAPH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the fused operators are loaded (building them first if needed). False when
    QGRAPH_NATIVE=0, or when building or loading failed (warned once, with the reason)."""
    if _disabled():
        return False
    if "loaded" not in _state:
        try:
            path = library_path()
            path = path if path.is_file() else build()
            _load(path)
            _state.update(loaded=True, path=path)
        except (OSError, subprocess.SubprocessError, mx.base.MXNetError) as err:
            _state.update(loaded=False, reason=str(err).strip().splitlines()[-1] if str(err).strip() else repr(err))
            warnings.warn(f"qgraph: fused operators unavailable ({_state['reason']}); "
                          "using MXNet operator chains (same values, slower)", RuntimeWarning, stacklevel=2)
    return _state["loaded"]


def _load(path: Path) -> None:
    """Register the library's operators with MXNet (usable in Symbol JSON, hence in every graph
    qgraph runs). mx.library.load does this and then regenerates the Python wrappers of all
    of MXNet's operators, which qgraph does not use and which cost 5 MB."""
    check_call(_LIB.MXLoadLib(ctypes.c_char_p(str(path).encode()), mx_uint(0)))


class HostArrays:
    """The library's functions over host float32 arrays (native/host_arrays.cc), as numpy calls.
    Each takes C-contiguous float32 arrays and releases the GIL for the whole batch."""

    def __init__(self, library: ctypes.CDLL):
        self._scale_rows = library.qgraph_scale_rows
        self._scale_rows.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 5
        self._scale_rows.restype = None
        self._find_nonfinite = library.qgraph_find_nonfinite
        self._find_nonfinite.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4
        self._find_nonfinite.restype = None

    def scale_rows(self, sources: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
                   scales: Sequence[np.ndarray]) -> Callable[[], None]:
        """A call (to make on any thread) writing outputs[i] = sources[i] * scales[i] per row of
        the first axis, one float32 multiply per element; it holds what it reads and writes."""
        arrays = [*sources, *outputs, *scales]
        if not all(a.dtype == np.float32 and a.flags.c_contiguous and a.ndim for a in arrays):
            raise ValueError("scale_rows takes C-contiguous float32 arrays of one or more axes")
        if not len(sources) == len(outputs) == len(scales) or any(
                o.shape != s.shape or c.size != s.shape[0] for s, o, c in zip(sources, outputs, scales)):
            raise ValueError("scale_rows: outputs shaped like sources, a scale per row")
        rows = np.array([s.shape[0] for s in sources], np.int64)
        row_len = np.array([s.size // s.shape[0] if s.shape[0] else 0 for s in sources], np.int64)
        pointers = [np.array([a.ctypes.data for a in group], np.uintp) for group in (sources, outputs, scales)]
        arguments = (len(sources), *(p.ctypes.data for p in pointers), rows.ctypes.data, row_len.ctypes.data)
        held = [arrays, pointers, rows, row_len]

        def call() -> None:
            if not held:
                raise RuntimeError("a scale_rows call runs once")  # its arrays are gone
            try:
                self._scale_rows(*arguments)
            finally:
                # before the caller hears it is done (an executor keeps its work, and this call,
                # a moment longer): from then on the arrays live exactly as long as the caller's
                held.clear()
        return call

    def nonfinite_scan(self, arrays: Sequence[np.ndarray]) -> "NonfiniteScan":
        """A NonfiniteScan of `arrays` (C-contiguous float32)."""
        if not all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays):
            raise ValueError("nonfinite_scan takes C-contiguous float32 arrays")
        return NonfiniteScan(self._find_nonfinite, arrays)


class NonfiniteScan:
    """Which of some arrays is the first to hold NaN or Inf. Calling the scan checks chunks
    (1 MB each) until none is left; any number of threads may call it at once, each taking the
    next unchecked chunk. `first()`, once every call has returned, gives the array's index or -1,
    and lets the arrays go."""

    CHUNK = 1 << 18  # elements

    def __init__(self, function, arrays: Sequence[np.ndarray]):
        flat = [a.reshape(-1) for a in arrays]
        chunks = [(k, a[start:start + self.CHUNK]) for k, a in enumerate(flat)
                  for start in range(0, a.size, self.CHUNK)]
        self._owner = [k for k, _ in chunks]
        self._pointers = np.array([c.ctypes.data for _, c in chunks], np.uintp)
        self._sizes = np.array([c.size for _, c in chunks], np.int64)
        self._state = np.array([0, len(chunks)], np.int64)  # the next chunk, the first bad one
        self._arguments = (len(chunks), self._pointers.ctypes.data, self._sizes.ctypes.data,
                           self._state.ctypes.data, self._state.ctypes.data + self._state.itemsize)
        self._function, self._arrays = function, list(arrays)

    def __call__(self) -> None:
        self._function(*self._arguments)

    def first(self) -> int:
        self._state[0] = len(self._owner)  # a later call finds nothing left to read
        self._arrays = []
        bad = int(self._state[1])
        return self._owner[bad] if bad < len(self._owner) else -1


def host() -> HostArrays | None:
    """The library's host-array functions when the library is loaded or already built (this never
    compiles it: loading a model should not wait seconds for a compiler; the first simulation
    builds it) and QGRAPH_NATIVE allows it; else None, and callers compute the same values
    with numpy."""
    if _disabled():
        return None
    if "host" not in _state:
        if "loaded" not in _state:
            if "probed" in _state:
                return None
            _state["probed"] = True
            if not library_path().is_file():
                return None
        if not available():
            return None
        _state["host"] = HostArrays(ctypes.CDLL(str(_state["path"])))
    return _state["host"]


def symbol(op: str, inputs, **attrs) -> mx.sym.Symbol:
    """A Symbol applying `op` to variables named `inputs` (qgraph registers its operators without
    MXNet's Python wrappers, so Symbols are built from JSON, as every qgraph graph is)."""
    nodes = [{"op": "null", "name": name, "inputs": []} for name in inputs]
    nodes.append({"op": op, "name": op, "attrs": {k: str(v) for k, v in attrs.items()},
                  "inputs": [[i, 0, 0] for i in range(len(inputs))]})
    return mx.sym.load_json(json.dumps({"nodes": nodes, "arg_nodes": list(range(len(inputs))),
                                        "heads": [[len(inputs), 0, 0]], "attrs": {"mxnet_version": ["int", 10901]}}))


def library_path() -> Path:
    """Where the library for these sources, this MXNet and this CPU is (or will be) cached."""
    digest = hashlib.sha256()
    for path in SOURCES + (_MXNET / "include" / "mxnet" / "lib_api.h", _MXNET / "src" / "lib_api.cc"):
        digest.update(path.read_bytes())
    digest.update(" ".join((mx.__version__, platform.machine(), _cpu_flags()) + _FLAGS).encode())
    root = os.environ.get("QGRAPH_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qgraph"
    return Path(root) / f"native-{digest.hexdigest()[:16]}" / "libqgraph_ops.so"


def build() -> Path:
    """Compile the sources into library_path() (written atomically: concurrent builds are safe)."""
    target = library_path()
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OSError("no C++ compiler (g++ or $CXX) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    command = [compiler, *_FLAGS, f"-I{_MXNET / 'include'}", *map(str, SOURCES), str(_MXNET / "src" / "lib_api.cc"),
               "-o", temporary]
    log.info("building qgraph's fused operators: %s", " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise OSError(f"{Path(compiler).name} failed: {last}")
        os.chmod(temporary, 0o755)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (the library is built with -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor()
