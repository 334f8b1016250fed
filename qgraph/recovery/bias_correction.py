"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2; AIMET's
empirical variant): the quantized net's per-channel output mean is moved back to the float
model's, one layer at a time.

For each quantized layer in topological order, with every earlier layer already quantized and
corrected: E_fp is the channel mean of the float model's output of that layer over the
calibration data, E_q the same in the quantized net; the layer's bias becomes b + E_fp - E_q.
The float means are measured once, before any bias changes. Corrected biases are stored as the
layers' bias parameters (a layer without one gets `<layer>_bias`), so the export, fixed_graph
and every deployment writer see them; note that the net's float mode reads the same biases.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError
from ..folding import channel_axis
from ..graph import TensorRef
from .probes import Probe, batches_of, floating_graph, quantized_graph

PURPOSE = "correct_bias"


def correct_bias(net, data, batch_size: int = 128, progress: bool = True) -> dict[str, np.ndarray]:
    """Correct the bias of every quantized layer of `net` (a QuantizedNet) in place; returns
    layer -> the correction added (float32, one value per output channel)."""
    layers = _layers(net)
    quantized_graph(net, PURPOSE)  # refuses a net that quantizes nothing, or is not calibrated
    batches = batches_of(data, batch_size, PURPOSE)
    reference = _means(net, floating_graph(net), layers, batches)
    corrections = {}
    for layer in tqdm(layers, desc="bias correction", leave=False, disable=not progress):
        quantized = _means(net, quantized_graph(net, PURPOSE), [layer], batches)[layer]
        correction = (reference[layer] - quantized).astype(np.float32)
        bias = net.layer_bias(layer)
        net.set_layer_bias(layer, correction if bias is None else bias + correction)
        corrections[layer] = correction
    return corrections


def _layers(net) -> list[str]:
    """The quantized layers (weights or inputs), in topological order."""
    quantized = {s.layer for s in net.weight_specs} | {s.layer for s in net.input_specs}
    layers = [n for n in net.float_graph.nodes() if n in quantized]
    deconvolutions = [n for n in layers if net.float_graph.op(n) == "Deconvolution"]
    if deconvolutions:
        raise ConfigError(f"{PURPOSE}: Deconvolution layers are not supported ({deconvolutions[0]})")
    return layers


def _means(net, graph, layers, batches) -> dict[str, np.ndarray]:
    """layer -> the channel mean of its output over `batches`, computed by `graph`."""
    graph = graph.copy()
    tensors = []
    for layer in layers:
        axis = channel_axis(graph, layer)
        if axis is None:
            raise ConfigError(f"{PURPOSE}: cannot tell the channel axis of '{layer}' (layout "
                              f"{graph.attrs(layer).get('layout')})")
        tensors.append(TensorRef(graph.add_node("mean", f"{layer}_channel_mean", [TensorRef(layer)],
                                                {"axis": f"({axis},)", "exclude": "True"})))
    probe = Probe(net, graph, tensors)
    totals, count = None, 0
    for batch in batches:
        values = [v.asnumpy().astype(np.float64) * batch.shape[0] for v in probe(batch)]
        totals = values if totals is None else [t + v for t, v in zip(totals, values)]
        count += batch.shape[0]
    return {layer: total / count for layer, total in zip(layers, totals)}
