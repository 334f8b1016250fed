"""Drive calibration data through a QuantizedNet and store an offline threshold for every quantized input.

naive: the seed's EMA (momentum 0.9) of each batch's threshold over `calib_epoch`
passes with the online quantizer active, started from the first batch rather than
from 0. kl, percentile and mse run the float graph once over the data with in-graph
taps (qgraph/taps.py): the first batch fixes a fine histogram grid per
tensor, and the whole set fills it (see _one_pass_histograms); a tensor that outgrows
its grid gets an exact second pass. entropy follows MXNet: the whole-set range first,
then an 8001-bin symmetric histogram over it. Thresholds are searched with
qgraph.observers. best: every other method but kl runs (naive, entropy, percentile, mse) and
each quantized input keeps the candidate threshold that gives the least squared error of its
layer's output (input and weight quantized, against the float layer on the float input) over
the calibration data (see _best_thresholds). Afterwards the net quantizes inputs offline.
"""
from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import mxnet as mx
import numpy as np
from tqdm import tqdm

from . import observers
from .errors import ConfigError, DataError, QGraphError
from .graph import TensorRef
from .io import to_block
from .quantizer import add_input_fake_quant, add_weight_fake_quant
from .taps import HistogramTap, add_taps, observed_tensors, tap_kind, tensor_key

log = logging.getLogger(__name__)

MODES = ("naive", "kl", "entropy", "percentile", "mse", "best")
BEST_CANDIDATES = ("naive", "entropy", "percentile", "mse")   # kl is left out: it can clip nearly all
KL_BINS = 2048
ENTROPY_BINS = 8001
FINE_BINS = 64      # one-pass histograms: fine bins per KL bin at the first batch's range
GRID_HEADROOM = 2   # the fine grid covers this multiple of the first batch's range


@dataclass(frozen=True)
class Calibration:
    """How to calibrate: `mode` (one of MODES), `epochs` over the data for naive, the batch
    size, and the percentile for mode 'percentile'."""

    mode: str = "naive"
    epochs: int = 3
    batch_size: int = 128
    percentile: float = 99.99

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"calibration mode {self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"calibration {name}={getattr(self, name)}: must be at least 1")

    def replace(self, **changes) -> "Calibration":
        return dataclasses.replace(self, **changes)

    def run(self, net, data, progress: bool = True, after_epoch: Callable[[int], None] | None = None) -> dict:
        """calibrate(net, data) with these settings."""
        return calibrate(net, data, self.mode, calib_epoch=self.epochs, batch_size=self.batch_size,
                         percentile=self.percentile, progress=progress, after_epoch=after_epoch)


def as_batches(data, batch_size: int = 128, num_batches: int | None = None, purpose: str | None = None) -> list:
    """Calibration data as a list of NDArray batches, checked to be non-empty and finite.
    Accepts a numpy array or NDArray (split into batches), a list of them, (data, label)
    pairs, a gluon DataLoader or an mx.io.DataIter. `purpose` (a method's name) prefixes errors."""
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
            raise DataError(f"{purpose + ': ' if purpose else ''}calibration batch {len(batches)} contains NaN or "
                            "Inf values")
        batches.append(mx.nd.array(array, dtype=np.float32))
        if num_batches is not None and len(batches) >= num_batches:
            break
    if not batches:
        raise DataError(f"{purpose + ': ' if purpose else ''}the calibration set is empty (data gave no images)")
    return batches


def calibrate(net, data, mode: str = "naive", calib_epoch: int = 3, num_batches: int | None = None,
              momentum: float = 0.9, percentile: float = 99.99, batch_size: int = 128,
              progress: bool = True, after_epoch: Callable[[int], None] | None = None) -> dict:
    """Calibrate `net` (a QuantizedNet) in place; returns layer -> {threshold, method, bits, signed}.
    `after_epoch(epoch)` runs after each naive epoch with the net quantizing inputs offline
    with the thresholds so far (the seed's --eval-per-calib)."""
    if mode not in MODES:
        raise ConfigError(f"calibration mode {mode!r} is not one of {', '.join(MODES)}")
    if calib_epoch < 1:
        raise ConfigError(f"calib_epoch={calib_epoch}: must be at least 1")
    if not net.input_specs:
        raise ConfigError("the net quantizes no inputs, so there is nothing to calibrate")
    batches = as_batches(data, batch_size, num_batches)
    methods = None
    if mode == "naive":
        _calibrate_naive(net, batches, calib_epoch, momentum, progress, after_epoch)
    elif mode == "best":
        chosen, methods = _best_thresholds(net, batches, calib_epoch, momentum, percentile, progress)
        net.set_thresholds(chosen)
    else:
        net.set_thresholds(_histogram_thresholds(net, batches, mode, percentile, progress))
    thresholds = net.thresholds()
    bad = [layer for layer, t in thresholds.items() if not np.isfinite(t)]
    if bad:
        raise QGraphError(f"calibration gave a non-finite threshold for {bad[:3]}: do its activations overflow?")
    net.quantize_input(enable=True, online=False)
    by_layer = {s.layer: s for s in net.input_specs}
    return {layer: {"threshold": t, "method": f"best ({methods[layer]})" if methods else mode,
                    "bits": by_layer[layer].bits, "signed": by_layer[layer].signed}
            for layer, t in thresholds.items()}


def _bar(iterable, progress: bool, desc: str):
    return tqdm(iterable, desc=desc, leave=False) if progress else iterable


def _calibrate_naive(net, batches, calib_epoch, momentum, progress, after_epoch):
    net.enable_quantize()
    net.reset_thresholds()
    for epoch in range(calib_epoch):
        net.quantize_input(enable=True, online=True)
        for batch in _bar(batches, progress, f"calibrate naive {epoch + 1}/{calib_epoch}"):
            net(batch)
            net.update_ema(momentum)
        if after_epoch is not None:
            net.quantize_input(enable=True, online=False)
            after_epoch(epoch)


class _TapRunner:
    """The float graph with taps as extra outputs, as a SymbolBlock sharing the net's
    parameters: the same execution path, and so the same rounding, as the net's evaluation."""

    def __init__(self, net, taps: dict):
        graph = net.float_graph.copy().cleanup()
        self.n_model = len(graph.outputs)
        add_taps(graph, **taps)
        self.kinds = [tap_kind(graph, ref) for ref in graph.outputs[self.n_model:]]
        self.block = to_block(graph, params=net.collect_params())

    def __call__(self, batch):
        return self.block(batch)


def _run_taps(net, batches, taps: dict, progress, desc):
    """Run every batch through the float graph with `taps` (qgraph.taps.add_taps arguments);
    combine each tap's outputs across batches with `_combine`."""
    runner = _TapRunner(net, taps)
    totals: dict = {}
    for batch in _bar(batches, progress, desc):
        outputs = runner(batch)
        for kind, value in zip(runner.kinds, outputs[runner.n_model:]):
            totals[kind] = value.copy() if kind not in totals else _combine(kind, totals[kind], value)
    return {kind: value.asnumpy() for kind, value in totals.items()}


def _combine(kind, old, new):
    if kind.endswith("|min"):
        return mx.nd.minimum(old, new)
    if kind.endswith("|max"):
        return mx.nd.maximum(old, new)
    return old if kind.endswith("|hist_edges") else old + new


def _top(ranges: dict, key: str, signed: bool) -> float:
    """The range a histogram must cover: max |x| for signed inputs, max x for unsigned."""
    largest = float(ranges[f"{key}|max"][0])
    return max(largest, -float(ranges[f"{key}|min"][0])) if signed else largest


def _exact_histograms(net, batches, layers, keys, signed_keys, ranges, entropy, progress) -> dict:
    """key -> (counts, taps used) over the exact whole-set range: a second pass over the data."""
    taps = {}
    for key in keys:
        top = _top(ranges, key, key in signed_keys)
        if top <= 0:
            continue
        if entropy:
            absmax = _top(ranges, key, True)
            taps[key] = HistogramTap("x", ENTROPY_BINS, -absmax, absmax)
        else:
            taps[key] = HistogramTap("abs" if key in signed_keys else "relu", KL_BINS, 0.0, top)
    if not taps:
        return {}
    totals = _run_taps(net, batches, dict(layers=layers, reductions=(), histograms=taps),
                       progress, "calibrate: histograms")
    return {key: (_without_zeros(totals, key, tap), tap) for key, tap in taps.items()}


def _without_zeros(totals: dict, key: str, tap) -> np.ndarray:
    """The counts, with exact zeros taken out of the first bin (as the seed's histograms).
    A one-pass fine grid has no zero count: its first bin, [0, width), is emptied instead."""
    hist = totals[f"{key}|hist"].astype(np.float64)
    if tap.source != "x":
        hist[0] = 0.0 if tap.bins > KL_BINS else hist[0] - float(totals[f"{key}|zeros"][0])
    return hist


def _one_pass_histograms(net, batches, layers, keys, signed_keys, progress):
    """Ranges and KL_BINS-bin histograms over (0, T'] in one pass over the data.

    The first batch alone fixes a fine grid per tensor: FINE_BINS bins per KL bin over twice its
    range. Its first fine bin, which holds the exact zeros the seed leaves out (and any value
    below 1/131072 of the first batch's range), is dropped rather than counting zeros in-graph. The whole set then runs once with range and histogram taps; each histogram is
    summed into KL_BINS bins of j fine bins, j the smallest that covers the whole-set maximum
    M, so T' = KL_BINS * j * width exceeds M by less than M / FINE_BINS. Tensors whose
    maximum outgrew their grid get a second, exact pass."""
    first = _run_taps(net, batches[:1], dict(layers=layers), False, "")
    taps = {}
    for key in keys:
        first_top = _top(first, key, key in signed_keys)
        if first_top > 0:
            fine = KL_BINS * FINE_BINS * GRID_HEADROOM
            taps[key] = HistogramTap("abs" if key in signed_keys else "relu", fine, 0.0,
                                     first_top * GRID_HEADROOM, count_zeros=False)
    totals = _run_taps(net, batches, dict(layers=layers, histograms=taps), progress,
                       "calibrate: ranges and histograms")
    histograms, regrid = {}, []
    for key in keys:
        top = _top(totals, key, key in signed_keys) if np.isfinite(totals[f"{key}|max"][0]) else np.nan
        if not np.isfinite(top) or top <= 0:
            continue
        tap = taps.get(key)
        if tap is None or top > tap.high:
            regrid.append(key)
            continue
        width = tap.high / tap.bins
        merge = int(np.ceil(top / (KL_BINS * width)))
        fine = _without_zeros(totals, key, tap)[:KL_BINS * merge]
        histograms[key] = (fine.reshape(KL_BINS, merge).sum(axis=1), KL_BINS * merge * width)
    if regrid:
        exact = _exact_histograms(net, batches, layers, regrid, signed_keys, totals, False, progress)
        histograms.update({key: (hist, tap.high) for key, (hist, tap) in exact.items()})
    return totals, histograms


def _histogram_thresholds(net, batches, mode, percentile, progress) -> dict:
    layers = [s.layer for s in net.input_specs]
    graph = net.float_graph
    key_of = {s.layer: tensor_key(graph.inputs(s.layer)[0]) for s in net.input_specs}
    signed_keys = {key_of[s.layer] for s in net.input_specs if s.signed}
    keys = list(observed_tensors(graph, layers))
    if mode == "entropy":  # MXNet's symmetric 8001-bin histogram over the exact range
        ranges = _run_taps(net, batches, dict(layers=layers), progress, "calibrate: ranges")
    else:
        ranges, histograms = _one_pass_histograms(net, batches, layers, keys, signed_keys, progress)
    for key in keys:
        if not np.isfinite([ranges[f"{key}|{k}"][0] for k in ("max", "min")]).all():
            raise QGraphError(f"activations feeding {[l for l, k in key_of.items() if k == key][:3]} contain NaN or Inf")
    _warn_negative_unsigned(net, key_of, ranges)
    if mode == "entropy":
        exact = _exact_histograms(net, batches, layers, keys, signed_keys, ranges, True, progress)

    thresholds, searches = {}, {}
    for spec in net.input_specs:
        key = key_of[spec.layer]
        if mode == "entropy" and key in exact:
            hist, tap = exact[key]
            unsigned = not spec.signed and float(ranges[f"{key}|min"][0]) >= 0
            thresholds[spec.layer] = observers.entropy_threshold(hist, np.linspace(tap.low, tap.high, tap.bins + 1),
                                                                 unsigned=unsigned)
        elif mode != "entropy" and key in histograms:
            hist, top = histograms[key]
            if mode == "kl":
                levels = 2 ** (spec.bits - 1) if spec.signed else 2 ** spec.bits
                searches[spec.layer] = (observers.kl_threshold, hist, top, levels)
            elif mode == "percentile":
                searches[spec.layer] = (observers.percentile_threshold, hist, top, percentile)
            else:
                searches[spec.layer] = (observers.mse_threshold, hist, top, spec.levels)
        else:
            thresholds[spec.layer] = 0.0
            log.warning("input of %s is never positive on the calibration set: threshold 0", spec.layer)
    # numpy releases the GIL in the searches' large array operations, so two threads use both cores
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = pool.map(lambda job: job[0](*job[1:]), searches.values())
        thresholds.update(zip(searches, found))
    return thresholds


def _best_thresholds(net, batches, calib_epoch, momentum, percentile, progress) -> tuple[dict, dict]:
    """({layer: threshold}, {layer: the method it came from}): per quantized input, the candidate of
    BEST_CANDIDATES whose quantization gives the least squared error of the layer's output."""
    _calibrate_naive(net, batches, calib_epoch, momentum, progress, None)
    candidates = {"naive": net.thresholds()}
    for method in BEST_CANDIDATES[1:]:
        candidates[method] = _histogram_thresholds(net, batches, method, percentile, progress)
    graph = net.float_graph.copy()
    trials = _add_output_errors(graph, net, candidates)
    runner = to_block(graph.cleanup(), params=net.collect_params())
    n_model = len(net.float_graph.outputs)
    errors = np.zeros(len(trials))
    for batch in _bar(batches, progress, "calibrate: output errors"):
        outputs = runner(batch)[n_model:]
        errors += mx.nd.concat(*outputs, dim=0).asnumpy().astype(np.float64)
    chosen, methods = {}, {}
    for (layer, method), error in sorted(zip(trials, errors), key=lambda item: item[1]):
        if layer not in chosen:  # ascending errors: the first trial of a layer is its best
            chosen[layer], methods[layer] = candidates[method][layer], method
    return chosen, methods


def _add_output_errors(graph, net, candidates: dict) -> list[tuple[str, str]]:
    """Append to `graph` the squared error of each quantized layer's output with each candidate
    threshold (a copy of the layer reading Q_T(x) and Q(W)); returns the (layer, method) of each
    output. Candidates that agree on a layer's threshold are tried once (the first listed)."""
    weights = {s.layer: s for s in net.weight_specs} if net.mode.weights else {}
    trials = []
    for spec in net.input_specs:
        layer, tried = spec.layer, set()
        for method, thresholds in candidates.items():
            value = float(thresholds[spec.layer])
            if value in tried:
                continue
            tried.add(value)
            twin = graph.add_node(graph.op(layer), f"{layer}_{method}_trial", graph.inputs(layer), graph.attrs(layer))
            add_input_fake_quant(graph, dataclasses.replace(spec, layer=twin, online=False), ste=False,
                                 threshold_value=value)
            if layer in weights:
                add_weight_fake_quant(graph, dataclasses.replace(weights[layer], layer=twin), ste=False)
            node = graph.builder(f"{twin}_error")
            squared = node("square", "square", [node("elemwise_sub", "diff", [TensorRef(twin), TensorRef(layer)])])
            graph.add_output(node("sum", "sum", [squared]))
            trials.append((layer, method))
    return trials


def _warn_negative_unsigned(net, key_of, ranges) -> None:
    negative = [s.layer for s in net.input_specs if not s.signed and ranges[f"{key_of[s.layer]}|min"][0] < 0]
    if negative:
        log.warning("unsigned input quantization clips negative calibration values to 0 at %d layer(s): %s; "
                    "consider input_signed='auto' or True", len(negative), ", ".join(negative))


def input_histograms(net, data, bins: int = 256, batch_size: int = 128, progress: bool = False) -> dict:
    """layer -> (counts, edges): each quantized input's values on `data`, in `bins` equal bins over
    their whole range (both signs), for plots; calibration searches its own finer grids."""
    batches = as_batches(data, batch_size)
    layers = [s.layer for s in net.input_specs]
    key_of = {layer: tensor_key(net.float_graph.inputs(layer)[0]) for layer in layers}
    ranges = _run_taps(net, batches, dict(layers=layers), progress, "histograms: ranges")
    taps = {}
    for key in dict.fromkeys(key_of.values()):
        low, high = float(ranges[f"{key}|min"][0]), float(ranges[f"{key}|max"][0])
        taps[key] = HistogramTap("x", bins, low, high if high > low else low + 1.0)
    totals = _run_taps(net, batches, dict(layers=layers, reductions=(), histograms=taps), progress, "histograms")
    return {layer: (totals[f"{key}|hist"].astype(np.float64), np.linspace(taps[key].low, taps[key].high, bins + 1))
            for layer, key in key_of.items()}
