"""Post-training recovery: methods that win back accuracy a quantized net lost, from calibration
data and without training. Each works on a QuantizedNet in place and stores its result as
parameters of the net, so the export, passes.fixed_graph and the deployment writers see it.

- bias_correction: empirical bias correction, layer by layer (QuantizedNet.correct_bias);
- adaround: learned up/down rounding of every quantized weight (QuantizedNet.adaround);
- steps: `Recovery`, which of them a tool runs after calibration, and in what order.

Cross-layer equalization, the data-free method, is a graph rewrite: passes/equalize.py.
"""
from .adaround import ITERATIONS, LayerFit, adaround
from .bias_correction import correct_bias
from .steps import Recovery

__all__ = ["ITERATIONS", "LayerFit", "Recovery", "adaround", "correct_bias"]
