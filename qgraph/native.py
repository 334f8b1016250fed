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

import mxnet as mx
from mxnet.base import _LIB, check_call, mx_uint

log = logging.getLogger(__name__)

FAKE_QUANT_OP = "qgraph_fake_quant"
ONLINE_FAKE_QUANT_OP = "qgraph_fake_quant_online"
LEARNED_FAKE_QUANT_OP = "qgraph_fake_quant_learned"
WEIGHT_FAKE_QUANT_OP = "qgraph_fake_quant_weight"
FINGERPRINT_OP = "qgraph_fingerprint"
SOURCES = (Path(__file__).resolve().parent / "native" / "fake_quant.cc",)
_MXNET = Path(mx.__file__).resolve().parent
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17")

_state: dict = {}  # "loaded": bool once tried, "reason": why not


def available() -> bool:
    """Whether the fused operators are loaded (building them first if needed). False when
    QGRAPH_NATIVE=0, or when building or loading failed (warned once, with the reason)."""
    if os.environ.get("QGRAPH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if "loaded" not in _state:
        try:
            path = library_path()
            _load(path if path.is_file() else build())
            _state["loaded"] = True
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
