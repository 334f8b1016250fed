"""Layer probes for the post-training recovery methods: a QuantizedNet's graph cut at chosen
tensors, run over calibration batches as a block that shares the net's parameters.

`quantized` is the net's evaluation form (weights and inputs quantized as its mode says, offline
thresholds baked in as the forward pass bakes them), `floating` the float graph; both come from
qgraph.emit, so a probe computes exactly what the simulation computes up to those tensors. A
probe made after a parameter changed (a corrected bias, a learned rounding) sees the change,
because the parameters are the net's own.
"""
from __future__ import annotations

from typing import Sequence

import mxnet as mx
import numpy as np

from ..calibrate import as_batches
from ..emit import Mode, emit
from ..errors import ConfigError
from ..graph import Graph, TensorRef
from ..io import to_block


def batches_of(data, batch_size: int, purpose: str, num_images: int | None = None, seed: int = 0) -> list:
    """Calibration data as NDArray batches (qgraph.calibrate.as_batches), at most `num_images`
    images drawn without replacement with `seed` when more are given. `purpose` names the method
    in the error an empty set raises."""
    if num_images is not None and num_images < 1:
        raise ConfigError(f"{purpose}: num_images={num_images} must be at least 1")
    batches = as_batches(data, batch_size, purpose=purpose)
    if num_images is not None and sum(b.shape[0] for b in batches) > num_images:
        images = np.concatenate([b.asnumpy() for b in batches])
        keep = np.sort(np.random.RandomState(seed).choice(len(images), num_images, replace=False))
        batches = as_batches(images[keep], batch_size, purpose=purpose)
    return batches


def quantized_graph(net, purpose: str) -> Graph:
    """The emitted graph of `net`'s current quantization (evaluation form, model outputs only)."""
    mode = net.mode.replace(training=False, sign_probe=False, bn_frozen=False)
    mode = mode.replace(weights=mode.weights and bool(net.weight_specs), inputs=mode.inputs and bool(net.input_specs))
    if not mode.weights and not mode.inputs:
        raise ConfigError(f"{purpose}: the net quantizes neither weights nor inputs (enable_quantize() first)")
    mode = mode.replace(online=mode.inputs and mode.online)
    thresholds = None
    if mode.inputs and not mode.online:
        thresholds = net.thresholds()
        if thresholds and not any(thresholds.values()):
            raise ConfigError(f"{purpose}: every input threshold is 0; calibrate the net first")
    return emit(net.float_graph, net.weight_specs, net.input_specs, mode, thresholds).graph


def floating_graph(net) -> Graph:
    """The float graph of `net` (no quantizer)."""
    return emit(net.float_graph, net.weight_specs, net.input_specs, Mode(weights=False, inputs=False)).graph


class Probe:
    """`graph` cut so that its outputs are `tensors`, as a block on `net`'s parameters."""

    def __init__(self, net, graph: Graph, tensors: Sequence[TensorRef]):
        cut = graph.copy().set_outputs(list(tensors)).cleanup()
        self.block = to_block(cut, params=net.collect_params())
        self.block.hybridize(static_alloc=True)

    def __call__(self, batch: mx.nd.NDArray) -> list[mx.nd.NDArray]:
        outputs = self.block(batch)
        return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

