"""qgraph: simulate quantization and run QAT on MXNet Gluon models by rewriting their Symbol graphs."""
from .config import QuantConfig
from .errors import ConfigError, GraphError, PassError, QGraphError
from .graph import Graph, TensorRef
from .io import from_block, load, load_files, save, to_block
from .pass_manager import (DumpInstrument, Instrument, PassContext, PassManager, Report,
                           TimingInstrument, VerifyInstrument)
from .runtime import QuantizedNet, quantize

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "GraphError", "PassError", "QGraphError", "Graph", "TensorRef", "from_block", "load",
    "load_files", "save", "to_block", "DumpInstrument", "Instrument", "PassContext", "PassManager",
    "Report", "TimingInstrument", "VerifyInstrument", "QuantConfig", "QuantizedNet", "quantize",
]
