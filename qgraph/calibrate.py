"""Drive calibration data through a QuantizedNet and store an offline threshold for every quantized input.

naive: the seed's EMA (momentum 0.9) of each batch's threshold over `calib_epoch`
passes with the online quantizer active, started from the first batch rather than
from 0. Histogram modes (kl, entropy, percentile, mse) run the float graph twice
with in-graph taps (passes/insert_observers.py): first the range of every tapped
tensor over the whole calibration set, then histograms over that fixed range, and
search thresholds with qgraph.observers. Afterwards the net quantizes inputs offline.
"""
from __future__ import annotations

import logging

import numpy as np

from . import observers
from .errors import ConfigError, QGraphError

log = logging.getLogger(__name__)

MODES = ("naive", "kl", "entropy", "percentile", "mse")
KL_BINS = 2048
ENTROPY_BINS = 8001


def as_batches(data, batch_size: int = 128, num_batches: int | None = None) -> list:
    """Calibration data as a list of NDArray batches, checked to be non-empty and finite.
    Accepts a numpy array or NDArray (split into batches), a list of them, (data, label)
    pairs, a gluon DataLoader or an mx.io.DataIter."""
    import mxnet as mx

    if isinstance(data, (np.ndarray, mx.nd.NDArray)):
        data = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    elif isinstance(data, mx.io.DataIter):
        data.reset()
        data = [b.data[0][:b.data[0].shape[0] - b.pad] for b in data]
    batches = []
    for item in data:
        if isinstance(item, (tuple, list)):
            item = item[0]
        if isinstance(item, mx.io.DataBatch):
            item = item.data[0]
        array = item.asnumpy() if isinstance(item, mx.nd.NDArray) else np.asarray(item, dtype=np.float32)
        if array.size == 0:
            continue
        if not np.isfinite(array).all():
            raise QGraphError(f"calibration batch {len(batches)} contains NaN or Inf values")
        batches.append(mx.nd.array(array, dtype=np.float32))
        if num_batches is not None and len(batches) >= num_batches:
            break
    if not batches:
        raise QGraphError("the calibration set is empty")
    return batches


def calibrate(net, data, mode: str = "naive", calib_epoch: int = 3, num_batches: int | None = None,
              momentum: float = 0.9, percentile: float = 99.99, batch_size: int = 128,
              progress: bool = True) -> dict:
    """Calibrate `net` (a QuantizedNet) in place; returns layer -> {threshold, method, bits, signed}."""
    if mode not in MODES:
        raise ConfigError(f"calibration mode {mode!r} is not one of {', '.join(MODES)}")
    if calib_epoch < 1:
        raise ConfigError(f"calib_epoch={calib_epoch}: must be at least 1")
    if not net.input_specs:
        raise ConfigError("the net quantizes no inputs, so there is nothing to calibrate")
    batches = as_batches(data, batch_size, num_batches)
    if mode == "naive":
        _calibrate_naive(net, batches, calib_epoch, momentum, progress)
    else:
        net.set_thresholds(_histogram_thresholds(net, batches, mode, percentile, progress))
    thresholds = net.thresholds()
    bad = [layer for layer, t in thresholds.items() if not np.isfinite(t)]
    if bad:
        raise QGraphError(f"calibration gave a non-finite threshold for {bad[:3]}: do its activations overflow?")
    net.quantize_input(enable=True, online=False)
    by_layer = {s.layer: s for s in net.input_specs}
    return {layer: {"threshold": t, "method": mode, "bits": by_layer[layer].bits, "signed": by_layer[layer].signed}
            for layer, t in thresholds.items()}


def _bar(iterable, progress: bool, desc: str):
    if not progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _calibrate_naive(net, batches, calib_epoch, momentum, progress):
    net.enable_quantize()
    net.quantize_input(enable=True, online=True)
    net.reset_thresholds()
    for epoch in range(calib_epoch):
        for batch in _bar(batches, progress, f"calibrate naive {epoch + 1}/{calib_epoch}"):
            net(batch)
            net.update_ema(momentum)


class _TapRunner:
    """The float graph with taps as extra outputs, as a SymbolBlock sharing the net's
    parameters: the same execution path, and so the same rounding, as the net's evaluation."""

    def __init__(self, net, taps_pass):
        from passes.insert_observers import tap_kind

        from .pass_manager import PassContext
        from .runtime import symbol_block

        graph = net.float_graph.copy().cleanup()
        self.n_model = len(graph.outputs)
        graph = taps_pass.run(graph, PassContext())
        self.kinds = [tap_kind(graph, ref) for ref in graph.outputs[self.n_model:]]
        self.block = symbol_block(graph, net.collect_params())

    def __call__(self, batch):
        return self.block(batch)


def _run_taps(net, batches, taps_pass, progress, desc, combine):
    """Run every batch; combine each tap's outputs across batches with `combine(old, new)`."""
    runner = _TapRunner(net, taps_pass)
    totals: dict = {}
    for batch in _bar(batches, progress, desc):
        outputs = runner(batch)
        for kind, value in zip(runner.kinds, outputs[runner.n_model:]):
            totals[kind] = value.copy() if kind not in totals else combine(kind, totals[kind], value)
    return {kind: value.asnumpy() for kind, value in totals.items()}


def _combine_reduction(kind, old, new):
    import mxnet as mx

    return mx.nd.minimum(old, new) if kind.endswith("|min") else mx.nd.maximum(old, new)


def _histogram_thresholds(net, batches, mode, percentile, progress) -> dict:
    from passes.insert_observers import HistogramTap, InsertObservers, observed_tensors, tensor_key

    layers = [s.layer for s in net.input_specs]
    graph = net.float_graph
    key_of = {s.layer: tensor_key(graph.inputs(s.layer)[0]) for s in net.input_specs}
    signed_keys = {key_of[s.layer] for s in net.input_specs if s.signed}
    ranges = _run_taps(net, batches, InsertObservers(layers=tuple(layers)), progress, "calibrate: ranges",
                       _combine_reduction)
    _warn_negative_unsigned(net, key_of, ranges)

    for key in observed_tensors(graph, layers):
        ranges[f"{key}|absmax"] = np.maximum(ranges[f"{key}|max"], -ranges[f"{key}|min"])
    taps = {}
    for key in observed_tensors(graph, layers):
        if not np.isfinite([ranges[f"{key}|{k}"][0] for k in ("max", "min")]).all():
            raise QGraphError(f"activations feeding {[l for l, k in key_of.items() if k == key][:3]} contain NaN or Inf")
        top = float(ranges[f"{key}|absmax"][0] if key in signed_keys else ranges[f"{key}|max"][0])
        if top <= 0:
            continue
        if mode == "entropy":
            taps[key] = HistogramTap("x", ENTROPY_BINS, -float(ranges[f"{key}|absmax"][0]), float(ranges[f"{key}|absmax"][0]))
        else:
            taps[key] = HistogramTap("abs" if key in signed_keys else "relu", KL_BINS, 0.0, top)
    histograms = _run_taps(net, batches, InsertObservers(layers=tuple(layers), reductions=(), histograms=taps),
                           progress, f"calibrate: {mode} histograms", lambda kind, old, new: old + new)
    for key, tap in taps.items():
        if tap.source != "x":  # the seed's histograms leave exact zeros out
            hist = histograms[f"{key}|hist"].astype(np.float64)
            hist[0] -= float(histograms[f"{key}|zeros"][0])
            histograms[f"{key}|hist"] = hist

    thresholds = {}
    for spec in net.input_specs:
        key = key_of[spec.layer]
        if key not in taps:
            thresholds[spec.layer] = 0.0
            log.warning("input of %s is never positive on the calibration set: threshold 0", spec.layer)
            continue
        tap, hist = taps[key], histograms[f"{key}|hist"]
        if mode == "kl":
            levels = 2 ** (spec.bits - 1) if spec.signed else 2 ** spec.bits
            thresholds[spec.layer] = observers.kl_threshold(hist, tap.high, levels)
        elif mode == "entropy":
            edges = np.linspace(tap.low, tap.high, tap.bins + 1)
            unsigned = not spec.signed and float(ranges[f"{key}|min"][0]) >= 0
            thresholds[spec.layer] = observers.entropy_threshold(hist, edges, unsigned=unsigned)
        elif mode == "percentile":
            thresholds[spec.layer] = observers.percentile_threshold(hist, tap.high, percentile)
        else:
            thresholds[spec.layer] = observers.mse_threshold(hist, tap.high, spec.levels)
    return thresholds


def _warn_negative_unsigned(net, key_of, ranges) -> None:
    negative = [s.layer for s in net.input_specs if not s.signed and ranges[f"{key_of[s.layer]}|min"][0] < 0]
    if negative:
        log.warning("unsigned input quantization clips negative calibration values to 0 at %d layer(s): %s; "
                    "consider input_signed='auto' or True", len(negative), ", ".join(negative))
