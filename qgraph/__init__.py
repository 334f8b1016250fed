"""qgraph: simulate quantization and run QAT on MXNet Gluon models by rewriting their Symbol graphs.

The core: the graph IR and its files (Graph, load, save, to_block), the pass machinery
(PassManager and instruments), QuantConfig, QuantizedNet, the block that runs a rewritten
graph, and the analyses (qgraph.analysis: per-layer sensitivity, the mixed-precision
search). The passes themselves, and the pipelines that compose them (`passes.quantize`,
`passes.fixed_graph`), live in the `passes` package.
"""
from .analysis import search_precision, sensitivity
from .config import LayerOverride, QuantConfig
from .emit import Mode
from .errors import ConfigError, DataError, GraphError, PassError, QGraphError
from .graph import Graph, NodeBuilder, TensorRef
from .io import from_block, load, load_files, save, to_block
from .pass_manager import (DumpInstrument, Instrument, LintInstrument, PassContext, PassManager, Report,
                           TimingInstrument, VerifyInstrument)
from .runtime import QuantizedNet

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "GraphError", "PassError", "QGraphError", "Graph", "NodeBuilder", "TensorRef",
    "from_block", "load", "load_files", "save", "to_block", "DumpInstrument", "Instrument", "LintInstrument",
    "PassContext", "PassManager", "Report", "TimingInstrument", "VerifyInstrument", "QuantConfig", "Mode",
    "QuantizedNet", "LayerOverride", "search_precision", "sensitivity",
]
