"""qgraph: simulate quantization and run QAT on MXNet Gluon models by rewriting their Symbol graphs.

The core: the graph IR and its files (Graph, load, save, to_block), the pass machinery
(PassManager and instruments), QuantConfig, QuantizedNet, the block that runs a rewritten
graph, and the analyses (qgraph.analysis: per-layer sensitivity, the mixed-precision
search). The passes themselves, and the pipelines that compose them (`passes.quantize`,
`passes.fixed_graph`), live in the `passes` package.

Only the error types are imported with the package. Everything else needs MXNet, whose
import takes seconds and turns a process whose DMLC_ROLE is scheduler or server into a
kvstore node, and `python -m qgraph.launch` (standard library only) must run without it;
so the names below, and submodules such as `qgraph.emit`, are imported on first use
(PEP 562 module __getattr__), which `import qgraph; qgraph.QuantizedNet` does not notice.
"""
import importlib

from .errors import ConfigError, DataError, GraphError, PassError, QGraphError

__version__ = "0.1.0"

_HOMES = {  # exported name -> the module that defines it
    "QuantConfig": "config", "LayerOverride": "config", "Mode": "emit", "Graph": "graph", "NodeBuilder": "graph", "TensorRef": "graph",
    "from_block": "io", "load": "io", "load_files": "io", "save": "io", "to_block": "io",
    "DumpInstrument": "pass_manager", "Instrument": "pass_manager", "LintInstrument": "pass_manager",
    "PassContext": "pass_manager", "PassManager": "pass_manager", "Report": "pass_manager",
    "TimingInstrument": "pass_manager", "VerifyInstrument": "pass_manager", "QuantizedNet": "runtime",
    "search_precision": "analysis", "sensitivity": "analysis",
}

__all__ = ["ConfigError", "DataError", "GraphError", "PassError", "QGraphError", *_HOMES]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    else:  # a submodule not imported yet
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
