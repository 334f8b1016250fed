"""What the quantizers see: every quantized input's values with the threshold each calibration
method would pick, and every layer's per-output-channel weight ranges before and after
BatchNorm folding (the spread one per-layer scale must cover: after folding, MobileNet's first
depthwise convolution has one channel 338 times the median, so one int8 scale per layer rounds
most of its channels to zero)."""
from __future__ import annotations

import numpy as np

from .. import attrs as A
from ..calibrate import MODES, Calibration, input_histograms
from ..folding import bn_fold_blocker, bn_scale_shift, scaled_weight
from ..graph import Graph
from ..quantizer import QUANTIZABLE_OPS, weight_grouping, weight_param
from ..runtime import QuantizedNet

__all__ = ["channel_ranges", "input_histograms", "threshold_survey"]


def threshold_survey(net: QuantizedNet, data, modes=MODES, calibration: Calibration = Calibration()) -> dict:
    """mode -> (layer -> threshold) for every calibration mode on `data`; the net keeps the
    thresholds and the online/offline mode it had."""
    before, mode, was_set = net.thresholds(), net.mode, not net.mode.online
    found = {}
    for name in modes:
        calibration.replace(mode=name).run(net, data, progress=False)
        found[name] = net.thresholds()
    if was_set:
        net.set_thresholds(before)
    else:
        net.reset_thresholds()
    net.mode = mode
    return found


def channel_ranges(graph: Graph, layers=None) -> list[dict]:
    """For each Convolution/Deconvolution/FullyConnected (or those in `layers`) of an unfolded
    graph: its per-output-channel max |w| (`before`) and, when a BatchNorm folds into it, the
    folded weight's (`after`, else None); channels as the per-channel quantizer groups them."""
    found = []
    following = {layer: bn for layer, bn in graph.match_chain([QUANTIZABLE_OPS, "BatchNorm"])}
    for layer in graph.nodes(QUANTIZABLE_OPS):
        if layers is not None and layer not in layers:
            continue
        weight = graph.params.get(weight_param(graph, layer))
        if weight is None:
            continue
        reshape, axes = weight_grouping(graph, layer, "channel")
        bn = following.get(layer)
        after = None
        if bn is not None and bn_fold_blocker(graph, layer, bn) is None:
            scale, _ = bn_scale_shift(graph, bn)
            groups = A.get_int(graph.attrs(layer), "num_group", 1, layer)
            after = _channel_max(scaled_weight(graph.op(layer), weight, scale, groups), reshape, axes)
        found.append({"layer": layer, "before": _channel_max(weight, reshape, axes), "after": after})
    return found


def _channel_max(weight: np.ndarray, reshape: tuple, axes: tuple) -> np.ndarray:
    return np.abs(np.asarray(weight, np.float64).reshape(reshape)).max(axis=axes).ravel()
