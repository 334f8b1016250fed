"""The graph passes and the pipelines that compose them.

One rewrite per module (fold_bn, exclude, fake_bn, insert_fake_quant, insert_observers,
quantize_winograd_weights, lower_winograd_kernel, fix_weights); `registry` maps each pass's
name to its class (built once at import, only read) and builds pipelines from names or from a
QuantConfig; `pipelines` holds the library's entry points that need passes, which is why they
live here and not in qgraph (the core never imports passes):

- `quantize(source, config)`: load a model, run the default pipeline, return a QuantizedNet;
- `fixed_graph(net)`: a QuantizedNet's deployable graph (fold_bn, then fix_weights).
"""
from .pipelines import fixed_graph, quantize
from .registry import PASSES, build_pipeline, default_pipeline, get_pass

__all__ = ["PASSES", "build_pipeline", "default_pipeline", "fixed_graph", "get_pass", "quantize"]
