"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"):
each quantized weight learns whether to round up or down, layer by layer, so that the layer
reproduces the float model's output from the quantized net's inputs.

Per layer, in topological order, every earlier layer already rounded:

    X = the layer's input in the quantized net (earlier layers quantized and AdaRounded, the
        layer's own input quantizer applied), Y = the float model's output of the layer
    W~ = s * clip(floor(W / s) + h(V), -L, L),  h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
    loss = mean over output positions of |W~ x + b - y|^2  +  reg * sum(1 - |2 h(V) - 1|^beta)

with the rectified sigmoid's zeta = 1.1, gamma = -0.1, reg = 0.01 after a warm start (the first
20% of the iterations fit the data term alone), beta annealed linearly from 20 to 2, V started
where h(V) is the fractional part of W / s, and Adam (lr 1e-3): the paper's and AIMET's
defaults. The scale s is the quantizer's own and stays as it is. The result is R = [h(V) >= 0.5]
(or nearest rounding, should that fit the layer's output better, as after too few iterations),
stored with QuantizedNet.set_weight_rounding: every form of the simulation, the export,
fixed_graph and the ncnn writer then use the integers clip(floor(W / s) + R, -L, L).

The data term is quadratic in W~, so it is computed from its sufficient statistics over all
calibration images, X^T X and X^T (Y - b) per convolution group (from an im2col of X, summed in
float64) gathered in one pass over the data: an iteration costs one (C_out x K) by (K x K)
product whatever the number of images, and Adam sees the exact gradient over the whole set
rather than a 32-image minibatch's, which also makes the fit deterministic (`seed` only picks the
`num_images` subset when more images are given).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from .. import attrs as A
from ..errors import ConfigError
from ..graph import TensorRef
from ..quantizer import MIN_SCALE
from ..tags import FAKE_BN_TAG
from .probes import Probe, batches_of, floating_graph, quantized_graph

PURPOSE = "adaround"
ZETA, GAMMA = 1.1, -0.1
ITERATIONS = 1000
REG = 0.01
BETA = (20.0, 2.0)
WARM_START = 0.2
LEARNING_RATE = 1e-3
_ADAM = (0.9, 0.999, 1e-8)


@dataclass(frozen=True)
class LayerFit:
    """One layer's fit: the data term (mean squared output error per position) with nearest
    rounding and with the learned one, and the fraction of weights rounded the other way."""

    loss_nearest: float
    loss: float
    flipped: float

    def as_dict(self) -> dict:
        return {"loss_nearest": self.loss_nearest, "loss": self.loss, "flipped": self.flipped}


@dataclass(frozen=True)
class Settings:
    """The optimisation: iterations per layer, regulariser weight, beta from/to, warm-start
    fraction, Adam's learning rate."""

    iterations: int = ITERATIONS
    reg: float = REG
    beta: tuple = BETA
    warm_start: float = WARM_START
    lr: float = LEARNING_RATE

    def __post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)) or \
                self.iterations < 1:
            raise ConfigError(f"{PURPOSE}: iterations={self.iterations!r} must be a positive integer")
        if not (np.isfinite(self.reg) and self.reg >= 0):
            raise ConfigError(f"{PURPOSE}: reg={self.reg!r} must be a finite number >= 0")
        if len(self.beta) != 2 or not all(np.isfinite(b) and b >= 1 for b in self.beta):
            raise ConfigError(f"{PURPOSE}: beta={self.beta!r} must be two numbers >= 1 (start, end)")
        if not 0 <= self.warm_start < 1:
            raise ConfigError(f"{PURPOSE}: warm_start={self.warm_start!r} must be in [0, 1)")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{PURPOSE}: lr={self.lr!r} must be a positive number")


def adaround(net, data, iterations: int = ITERATIONS, reg: float = REG, beta: tuple = BETA,
             warm_start: float = WARM_START, lr: float = LEARNING_RATE, num_images: int | None = None,
             seed: int = 0, batch_size: int = 128, progress: bool = True) -> dict[str, LayerFit]:
    """Learn the rounding of every quantized weight of `net` (a QuantizedNet) on `data`
    (calibration images); returns layer -> LayerFit. Needs BatchNorm merged into the layers, and
    the input thresholds calibrated when inputs are quantized offline."""
    settings = Settings(iterations, float(reg), tuple(beta), float(warm_start), float(lr))
    specs = _specs(net)
    quantized_graph(net, PURPOSE)  # refuses an uncalibrated net before reading the data
    batches = batches_of(data, batch_size, PURPOSE, num_images, seed)
    results = {}
    for spec in specs:
        with tqdm(total=len(batches) + settings.iterations, desc=f"adaround {spec.layer}", leave=False,
                  disable=not progress) as bar:
            problem = _problem(net, spec)
            hessian, cross, energy = _statistics(net, spec.layer, problem.geometry, batches, bar)
            decisions, fit = _fit(problem, hessian, cross, energy, settings, bar)
        net.set_weight_rounding(spec.layer, decisions)
        results[spec.layer] = fit
    return results


# ---------------------------------------------------------------------- which layers
def _specs(net) -> list:
    if not net.weight_specs:
        raise ConfigError(f"{PURPOSE}: the net's weights are not quantized (no weight quantizer in its graph: run "
                          "insert_fake_quant, and do not exclude every layer)")
    if not net.mode.weights:
        raise ConfigError(f"{PURPOSE}: weight quantization is switched off (net.enable_quantize() first)")
    graph = net.float_graph
    for spec in net.weight_specs:
        layer = spec.layer
        if graph.op(layer) not in ("Convolution", "FullyConnected"):
            raise ConfigError(f"{PURPOSE}: '{layer}' is a {graph.op(layer)}; AdaRound fits Convolution and "
                              "FullyConnected weights only")
        if spec.winograd:
            raise ConfigError(f"{PURPOSE}: '{layer}' quantizes its weight in the {spec.winograd} Winograd domain")
        weight = graph.inputs(layer)[1].node
        if not graph.is_param(weight) or graph.attrs(weight).get(FAKE_BN_TAG):
            raise ConfigError(f"{PURPOSE}: the weight of '{layer}' is computed ('{weight}', fake BatchNorm?), not a "
                              "stored parameter")
        followers = [c for c, _ in graph.consumers(layer) if graph.op(c) == "BatchNorm"]
        if followers:
            raise ConfigError(f"{PURPOSE}: '{layer}' is followed by BatchNorm '{followers[0]}': merge BatchNorm "
                              "first (merge_bn=True), so the rounding learned is the one deployed")
        if graph.op(layer) == "Convolution" and (
                len(A.get_tuple(graph.attrs(layer), "kernel", (), layer)) != 2
                or graph.attrs(layer).get("layout", "None") not in ("None", "NCHW")):
            raise ConfigError(f"{PURPOSE}: '{layer}' is not a 2-D NCHW convolution")
    return list(net.weight_specs)


# ---------------------------------------------------------------------- the layer as a linear map
@dataclass(frozen=True)
class _Geometry:
    """How a layer's input becomes the rows its weight multiplies (im2col), per group."""

    op: str
    groups: int
    kernel: tuple = (1, 1)
    stride: tuple = (1, 1)
    pad: tuple = (0, 0)
    dilate: tuple = (1, 1)
    flatten: bool = True

    @classmethod
    def of(cls, graph, layer: str) -> "_Geometry":
        attrs, op = graph.attrs(layer), graph.op(layer)
        if op == "FullyConnected":
            return cls(op, 1, flatten=A.get_bool(attrs, "flatten", True, layer))
        return cls(op, A.get_int(attrs, "num_group", 1, layer), A.get_tuple(attrs, "kernel", (), layer),
                   A.get_tuple(attrs, "stride", (1, 1), layer) or (1, 1), A.get_tuple(attrs, "pad", (0, 0), layer)
                   or (0, 0), A.get_tuple(attrs, "dilate", (1, 1), layer) or (1, 1))

    def columns(self, x: np.ndarray) -> np.ndarray:
        """(groups, positions, K): each output position's receptive field, in the weight's order."""
        if self.op == "FullyConnected":
            rows = x.reshape(x.shape[0], -1) if self.flatten else x.reshape(-1, x.shape[-1])
            return rows[None]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilate
        padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        windows = sliding_window_view(padded, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
        windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]                   # N, C, Ho, Wo, kh, kw
        n, c, ho, wo = windows.shape[:4]
        grouped = windows.reshape(n, self.groups, c // self.groups, ho, wo, kh, kw)
        return np.ascontiguousarray(grouped.transpose(1, 0, 3, 4, 2, 5, 6)).reshape(self.groups, n * ho * wo, -1)

    def outputs(self, y: np.ndarray) -> np.ndarray:
        """(groups, positions, C_out / groups): the layer's output in the same row order."""
        if self.op == "FullyConnected":
            return y.reshape(-1, y.shape[-1])[None]
        n, c, ho, wo = y.shape
        grouped = y.reshape(n, self.groups, c // self.groups, ho, wo)
        return np.ascontiguousarray(grouped.transpose(1, 0, 3, 4, 2)).reshape(self.groups, n * ho * wo, -1)


@dataclass(frozen=True)
class _Problem:
    """One layer's rounding problem, arrays as (groups, C_out / groups, K): W / s, s, the levels L."""

    layer: str
    geometry: _Geometry
    scaled: np.ndarray
    scale: np.ndarray
    levels: int
    rounding: str
    shape: tuple


def _problem(net, spec) -> _Problem:
    """W / s and s exactly as the weight quantizer computes them in float32 (qgraph.quantizer)."""
    graph = net.float_graph
    weight = net.collect_params()[graph.inputs(spec.layer)[1].node].data().asnumpy().astype(np.float32)
    grouped = weight.reshape(spec.reshape)
    magnitude = np.abs(grouped).max(axis=spec.axes, keepdims=True)
    scale = np.maximum(magnitude / np.float32(spec.levels), np.float32(MIN_SCALE)).astype(np.float32)
    scaled = (grouped / scale).astype(np.float32)
    geometry = _Geometry.of(graph, spec.layer)
    layout = (geometry.groups, weight.shape[0] // geometry.groups, -1)
    return _Problem(spec.layer, geometry, scaled.reshape(layout),
                    np.broadcast_to(scale, grouped.shape).reshape(layout).astype(np.float32), spec.levels,
                    spec.rounding, weight.shape)


def _statistics(net, layer: str, geometry: _Geometry, batches, bar) -> tuple:
    """(X^T X, X^T (Y - b), mean |Y - b|^2), each divided by the number of output positions."""
    quantized, floating = quantized_graph(net, PURPOSE), floating_graph(net)
    inputs = Probe(net, quantized, [quantized.inputs(layer)[0]])
    outputs = Probe(net, floating, [TensorRef(layer)])
    bias = net.layer_bias(layer)
    hessian = cross = None
    energy, count = 0.0, 0
    for batch in batches:
        rows = geometry.columns(inputs(batch)[0].asnumpy())
        target = geometry.outputs(outputs(batch)[0].asnumpy())
        if bias is not None:
            target = target - bias.reshape(geometry.groups, 1, -1)
        transposed = rows.transpose(0, 2, 1)
        step_h, step_c = np.matmul(transposed, rows), np.matmul(transposed, target)
        hessian = step_h.astype(np.float64) if hessian is None else hessian + step_h
        cross = step_c.astype(np.float64) if cross is None else cross + step_c
        energy += float(np.square(target, dtype=np.float64).sum())
        count += rows.shape[1]
        bar.update(1)
    return hessian / count, cross / count, energy / count


# ---------------------------------------------------------------------- the optimisation
def _rectified_sigmoid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(h(V), dh/dV): clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1) and its derivative."""
    sigmoid = 1.0 / (1.0 + np.exp(-v))
    raw = sigmoid * (ZETA - GAMMA) + GAMMA
    slope = np.where((raw > 0) & (raw < 1), sigmoid * (1.0 - sigmoid) * (ZETA - GAMMA), 0.0)
    return np.clip(raw, 0.0, 1.0), slope


def _nearest(scaled: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "half_even":
        return np.round(scaled)
    return np.sign(scaled) * np.floor(np.abs(scaled.astype(np.float64)) + 0.5)


def _data_loss(weight: np.ndarray, hessian: np.ndarray, cross_t: np.ndarray, energy: float) -> tuple:
    """(loss, gradient) of mean |W~ x - y|^2 = sum(W~ H W~^T) - 2 sum(W~ C^T) + E."""
    product = np.matmul(weight, hessian)
    loss = float((product * weight).sum() - 2.0 * (weight * cross_t).sum() + energy)
    return loss, 2.0 * (product - cross_t)


def _fit(problem: _Problem, hessian, cross, energy, settings: Settings, bar) -> tuple[np.ndarray, LayerFit]:
    """Adam over V; returns (R in the weight's shape, the fit)."""
    levels, scale = problem.levels, problem.scale
    exact = (hessian, cross.transpose(0, 2, 1))
    hessian, cross_t = hessian.astype(np.float32), exact[1].astype(np.float32)
    base = np.floor(problem.scaled)
    rest = problem.scaled - base
    v = (-np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).astype(np.float32)
    first, second = np.zeros_like(v), np.zeros_like(v)
    (beta1, beta2, eps), (beta_start, beta_end) = _ADAM, settings.beta
    warm = int(settings.warm_start * settings.iterations)
    for step in range(1, settings.iterations + 1):
        h, slope = _rectified_sigmoid(v)
        unclipped = base + h
        inside = np.abs(unclipped) <= levels
        loss, grad_w = _data_loss(np.clip(unclipped, -levels, levels) * scale, hessian, cross_t, energy)
        grad_h = grad_w * scale * inside
        if step > warm:
            progress = (step - 1 - warm) / max(settings.iterations - warm, 1)
            beta = beta_end + (beta_start - beta_end) * max(0.0, 1.0 - progress)
            centred = 2.0 * h - 1.0
            grad_h = grad_h - settings.reg * beta * 2.0 * np.sign(centred) * np.abs(centred) ** (beta - 1.0)
        grad = (grad_h * slope).astype(np.float32)
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        v -= (settings.lr * (first / (1 - beta1 ** step)) / (np.sqrt(second / (1 - beta2 ** step)) + eps)).astype(
            np.float32)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss:.4g}")
        bar.update(1)
    h, _ = _rectified_sigmoid(v)
    integers = np.clip(base + (h >= 0.5), -levels, levels)
    nearest = np.clip(_nearest(problem.scaled, problem.rounding), -levels, levels)
    loss_nearest = _data_loss(nearest * scale.astype(np.float64), *exact, energy)[0]
    loss = _data_loss(integers * scale.astype(np.float64), *exact, energy)[0]
    if loss > loss_nearest:  # a fit that ends worse than rounding to nearest (too few iterations) is not kept
        integers, loss = nearest, loss_nearest
    fit = LayerFit(loss_nearest, loss, float((integers != nearest).mean()))
    return (integers - base).astype(np.float32).reshape(problem.shape), fit
