"""Analysis of a quantized model: which layer costs the accuracy (sensitivity), the cheapest
mixed precision that keeps it (search), what the quantizers see (ranges) and the figures
(plots). Functions that need the pass pipeline take it as `quantize` (passes.quantize)."""
from .ranges import channel_ranges, input_histograms, threshold_survey
from .report import Analysis, analyze
from .search import PrecisionSearch, run_precision_search, search_precision, weight_bits
from .sweeps import LayerSensitivity, Sensitivity, sensitivity, sensitivity_of

__all__ = ["Analysis", "analyze", "channel_ranges", "input_histograms", "threshold_survey", "PrecisionSearch", "run_precision_search",
           "search_precision", "weight_bits", "LayerSensitivity", "Sensitivity", "sensitivity", "sensitivity_of"]
