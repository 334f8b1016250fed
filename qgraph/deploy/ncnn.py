"""ncnn deployment: a Graph (BatchNorm folded) as ncnn .param/.bin, its int8 calibration table in
ncnn2table's format, the int8 model ncnn2int8 would make from the two, and a runner over the
`ncnn` Python package to check them.

Formats, as Tencent/ncnn reads and writes them (src/modelbin.cpp, src/layer/convolution.cpp,
convolutiondepthwise.cpp, innerproduct.cpp, tools/modelwriter.h, tools/quantize/ncnn2table.cpp,
ncnn2int8.cpp):
- .param: "7767517", "<layer count> <blob count>", then per layer
  "Type name n_bottom n_top bottom... top... id=value ...". A blob read by several layers goes
  through a Split layer, as ncnn's converters do.
- .bin: each layer's arrays in load order. Weights (loaded with type 0) start with a 4-byte tag,
  0 for float32 or 0x000D4B38 for int8 (int8 data padded to 4 bytes); biases and scales (type 1)
  are bare float32.
- table: "<layer>_param_0 s_0 ... s_{C-1}" with s = 127 / max|W| per output channel (per group
  for ConvolutionDepthWise), then "<layer> s" with s = 127 / threshold of the layer's input;
  numbers printed with "%f " as ncnn2table does.
- int8 model (ncnn2int8): int8_scale_term 8=2 for Convolution and InnerProduct, 8=1 for
  ConvolutionDepthWise (per-group weight scales); weights round(W * s) clipped to [-127, 127]
  under the int8 tag, then the float bias, the weight scales and the input scale.
  ncnn2int8 also stores the weights of layers it leaves in float as fp16; this writer keeps
  them float32, so float layers compute exactly what the simulation's float layers compute. A
  layer whose weight rounding was learned (AdaRound) gets the simulation's integers, not
  round(W * s): the scales, 127/max|W|, are the same.

What ncnn (1.0.20261020, x86) does with the int8 model, measured with tests/qgraph/test_ncnn.py
and tools/export_ncnn.py --verify: every layer with a table entry runs int8 (inputs quantized
round(x * s) to [-127, 127], int32 sums, dequantized to float32 with the bias), the others in
float; 3x3 stride-1 int8 convolutions give the same outputs with Winograd on or off; the packed
depthwise int8 path dequantizes with an approximate reciprocal (_mm_rcp_ps, relative error up
to 3.7e-4), so depthwise models agree with the simulation a little less unless
use_packing_layout is off; ncnn's default fp16 storage perturbs float layers by about 1e-4,
hence FLOAT32_OPTIONS.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np

from .. import attrs as A
from ..errors import ConfigError, GraphError, mxnet_error_line
from ..evaluate import predict
from ..graph import Graph, TensorRef
from ..io import write_atomic, write_files_atomic
from .verification import Verification, compare, float_outputs, relative_difference

MAGIC = 7767517
TAG_FLOAT32 = 0
TAG_INT8 = 0x000D4B38
INT8_MAX = 127

SUPPORTED_OPS = ("Convolution (2-D, NCHW)", "FullyConnected", "Activation (relu, sigmoid, tanh)", "relu",
                 "LeakyReLU (leaky)", "clip", "Pooling (max/avg/global)", "elemwise_add/sub/mul",
                 "broadcast_add (same shapes)", "Concat", "Flatten", "Dropout (dropped)", "softmax",
                 "SoftmaxActivation", "SoftmaxOutput")
_PASS_THROUGH = ("Dropout", "_copy", "identity", "BlockGrad", "stop_gradient")
_BINARY = {"elemwise_add": 0, "_Plus": 0, "_plus": 0, "broadcast_add": 0, "elemwise_sub": 1, "_Minus": 1,
           "_minus": 1, "elemwise_mul": 2, "_Mul": 2, "_mul": 2}
_ACTIVATIONS = {"relu": "ReLU", "sigmoid": "Sigmoid", "tanh": "TanH"}


@dataclass
class Layer:
    """One ncnn layer: its type, name, blob names, `id=value` parameters and the arrays its
    load_model reads, in order, each with whether it carries a type tag."""

    type: str
    name: str
    bottoms: list
    tops: list
    params: list = field(default_factory=list)   # (id, int | float | list of floats)
    arrays: list = field(default_factory=list)   # (tagged, numpy array)


@dataclass
class NcnnModel:
    """An ncnn model in memory: the .param text, the .bin bytes and its input/output blob names."""

    param: str
    bin: bytes
    inputs: list
    outputs: list
    layers: list

    def save(self, prefix) -> tuple[Path, Path]:
        """Write PREFIX.param and PREFIX.bin atomically; returns both paths."""
        return write_files_atomic({Path(f"{prefix}.param"): self.param, Path(f"{prefix}.bin"): self.bin})


@dataclass
class Table:
    """An ncnn int8 calibration table: layer -> weight scales, layer -> input scale."""

    weights: dict
    inputs: dict

    def format(self) -> str:
        """The text ncnn2table writes: weight lines first, then input lines, "%f " per value."""
        lines = [f"{name}_param_0 " + "".join(f"{v:f} " for v in scales) for name, scales in self.weights.items()]
        lines += [f"{name} {scale:f} " for name, scale in self.inputs.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str, source: str = "table") -> "Table":
        """Read a table as ncnn2int8 does: a key then numbers; keys with '_param_' are weights."""
        weights, inputs = {}, {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                values = np.array([float(v) for v in fields[1:]], np.float32)
            except ValueError:
                raise GraphError(f"{source}:{number}: not a key followed by numbers: {line[:80]!r}") from None
            if not len(values):
                raise GraphError(f"{source}:{number}: '{fields[0]}' has no scale")
            key = fields[0]
            if "_param_" in key:
                weights[key.rsplit("_param_", 1)[0]] = values
            else:
                inputs[key] = float(values[0])
        return cls(weights, inputs)

    def save(self, path) -> Path:
        return write_atomic(path, self.format())

    @classmethod
    def load(cls, path) -> "Table":
        path = Path(path)
        if not path.is_file():
            raise GraphError(f"{path}: no such calibration table")
        return cls.parse(path.read_text(), str(path))


# ---------------------------------------------------------------------- scales
def weight_scales(weight: np.ndarray, groups: int) -> np.ndarray:
    """127 / max|W| over each of `groups` equal slices of W (0 where a slice is all zero, which
    ncnn's int8 layers read as 'output 0')."""
    absmax = np.abs(weight.astype(np.float32).reshape(groups, -1)).max(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(absmax > 0, np.float32(INT8_MAX) / absmax, 0).astype(np.float32)


def calibration_table(graph: Graph, thresholds: dict, granularity: str = "channel") -> Table:
    """The ncnn table for the layers in `thresholds` (layer -> input threshold, as
    QuantizedNet.thresholds() returns them): weight scales per output channel (per group for
    grouped convolutions), or with granularity 'layer' one scale repeated for every channel;
    input scale 127 / threshold."""
    if granularity not in ("channel", "layer"):
        raise ConfigError(f"granularity {granularity!r}: ncnn tables hold per-channel or per-layer weight scales")
    weights, inputs = {}, {}
    for layer, threshold in thresholds.items():
        if layer not in graph or graph.op(layer) not in ("Convolution", "FullyConnected"):
            found = graph.op(layer) if layer in graph else "no such node"
            raise GraphError(f"threshold for '{layer}' ({found}): ncnn quantizes only Convolution and "
                             f"FullyConnected inputs")
        threshold = float(threshold)
        if not threshold > 0 or not math.isfinite(threshold):
            raise GraphError(f"'{layer}': input threshold {threshold} must be positive and finite")
        weight = _param(graph, layer, 1)
        groups = _ncnn_groups(graph, layer, weight)
        scales = weight_scales(weight, groups if granularity == "channel" else 1)
        weights[layer] = np.repeat(scales, groups // len(scales))
        inputs[layer] = INT8_MAX / threshold
    return Table(weights, inputs)


def _ncnn_groups(graph: Graph, layer: str, weight: np.ndarray) -> int:
    """How many weight scales ncnn keeps: one per output channel, one per group for grouped convs."""
    if graph.op(layer) == "Convolution":
        group = A.get_int(graph.attrs(layer), "num_group", 1, layer)
        return group if group > 1 else weight.shape[0]
    return weight.shape[0]


def quantize_int8(values: np.ndarray, scale) -> np.ndarray:
    """ncnn's float2int8: round half away from zero of values * scale, clipped to [-127, 127]."""
    scaled = values.astype(np.float32) * np.asarray(scale, np.float32)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))
    return np.clip(rounded, -INT8_MAX, INT8_MAX).astype(np.int8)


# ---------------------------------------------------------------------- conversion
def _param(graph: Graph, layer: str, slot: int) -> np.ndarray:
    ref = graph.inputs(layer)[slot]
    if not graph.is_param(ref.node):
        raise GraphError(f"node '{layer}': input {slot} ('{ref.node}') is computed, not a stored parameter; "
                         "ncnn needs constant weights")
    return graph.params[ref.node]


class _Converter:
    def __init__(self, graph: Graph, input_shapes: dict, table: Table | None, quantized: dict | None = None):
        self.graph, self.table, self.quantized = graph, table, quantized or {}
        self.shapes = _output_shapes(graph, input_shapes)
        self.alias: dict = {}
        self.layers: list[Layer] = []

    def blob(self, ref: TensorRef) -> str:
        ref = TensorRef(ref.node, ref.index)
        while ref in self.alias:
            ref = self.alias[ref]
        return ref.node if ref.index == 0 else f"{ref.node}_{ref.index}"

    def data_inputs(self, name: str, count: int | None = None) -> list:
        refs = [r for r in self.graph.inputs(name) if not self.graph.is_param(r.node)]
        return [self.blob(r) for r in (refs if count is None else refs[:count])]

    def run(self) -> NcnnModel:
        graph = self.graph
        for name in graph.input_names:
            shape = self.shapes[TensorRef(name, 0)]
            dims = [int(v) for v in reversed(shape[1:])]  # ncnn w, h, c
            self.layers.append(Layer("Input", name, [], [name], list(enumerate(dims))))
        for name in graph.topo_order():
            op = graph.op(name)
            if op == "null":
                continue
            if op in _PASS_THROUGH:
                self.alias[TensorRef(name, 0)] = TensorRef(*graph.inputs(name)[0][:2])
                continue
            handler = _HANDLERS.get(op, _Converter._binary if op in _BINARY else None)
            if handler is None:
                hint = " (fold it into the layer before it first: passes fold_bn / --merge-bn)" if op == "BatchNorm" else ""
                raise GraphError(f"node '{name}': op {op} cannot be written for ncnn{hint}; "
                                 f"supported: {', '.join(SUPPORTED_OPS)}")
            self.layers.append(handler(self, name, graph.attrs(name)))
        outputs = [self.blob(r) for r in graph.outputs]
        self._insert_splits(outputs)
        return NcnnModel(_param_text(self.layers), _bin_bytes(self.layers), list(graph.input_names), outputs,
                         self.layers)

    def _insert_splits(self, outputs: list) -> None:
        """A blob read more than once feeds a Split whose tops each reader takes one of."""
        readers: dict = {}
        for layer in self.layers:
            for i, bottom in enumerate(layer.bottoms):
                readers.setdefault(bottom, []).append((layer, i))
        result = []
        for layer in self.layers:
            result.append(layer)
            for top in layer.tops:
                users = readers.get(top, [])
                if len(users) + (top in outputs) < 2 or not users:
                    continue
                tops = [f"{top}_splitncnn_{k}" for k in range(len(users))]
                for (user, slot), new in zip(users, tops):
                    user.bottoms[slot] = new
                result.append(Layer("Split", f"splitncnn_{top}", [top], tops))
        self.layers[:] = result

    # ------------------------------------------------------------------ operators
    def _op_Convolution(self, name, attrs) -> Layer:
        kernel = A.get_tuple(attrs, "kernel", (), name)
        layout = attrs.get("layout", "None")
        if len(kernel) != 2 or layout not in ("None", "NCHW"):
            raise GraphError(f"node '{name}': op Convolution with kernel {kernel} and layout {layout} cannot be "
                             "written for ncnn; only 2-D NCHW convolutions are supported")
        stride = A.get_tuple(attrs, "stride", (1, 1), name) or (1, 1)
        dilate = A.get_tuple(attrs, "dilate", (1, 1), name) or (1, 1)
        pad = A.get_tuple(attrs, "pad", (0, 0), name) or (0, 0)
        group = A.get_int(attrs, "num_group", 1, name)
        weight = _param(self.graph, name, 1)
        has_bias = not A.get_bool(attrs, "no_bias", False, name)
        kind = "Convolution" if group == 1 else "ConvolutionDepthWise"
        params = [(0, weight.shape[0]), (1, kernel[1]), (11, kernel[0]), (2, dilate[1]), (12, dilate[0]),
                  (3, stride[1]), (13, stride[0]), (4, pad[1]), (14, pad[0]), (15, pad[1]), (16, pad[0]),
                  (5, int(has_bias)), (6, int(weight.size))]
        if group > 1:
            params.append((7, group))
        bias = _param(self.graph, name, 2) if has_bias else None
        return self._weighted(kind, name, params, weight, bias, int8_term=1 if group > 1 else 2)

    def _op_FullyConnected(self, name, attrs) -> Layer:
        data_shape = self.shapes[TensorRef(*self.graph.inputs(name)[0][:2])]
        if not A.get_bool(attrs, "flatten", True, name) and len(data_shape) > 2:
            raise GraphError(f"node '{name}': FullyConnected with flatten=False on a {len(data_shape)}-D input "
                             "cannot be written for ncnn")
        weight = _param(self.graph, name, 1)
        has_bias = not A.get_bool(attrs, "no_bias", False, name)
        params = [(0, weight.shape[0]), (1, int(has_bias)), (2, int(weight.size))]
        bias = _param(self.graph, name, 2) if has_bias else None
        return self._weighted("InnerProduct", name, params, weight, bias, int8_term=2)

    def _weighted(self, kind, name, params, weight, bias, int8_term) -> Layer:
        layer = Layer(kind, name, self.data_inputs(name, 1), [self.blob(TensorRef(name))], params)
        weight = weight.astype(np.float32)
        int8 = self.table is not None and name in self.table.inputs
        if int8:
            if name not in self.table.weights:
                raise GraphError(f"calibration table has an input scale for '{name}' but no '{name}_param_0'")
            scales = np.asarray(self.table.weights[name], np.float32)
            groups = len(scales)
            if groups == 0 or weight.shape[0] % groups:
                raise GraphError(f"table: '{name}_param_0' has {groups} scales for {weight.shape[0]} outputs")
            # a weight the simulation rounds its own way (AdaRound) is written as its quantized value:
            # Q(W) * 127 / max|W| is an integer up to float rounding, which quantize_int8 removes
            source = self.quantized.get(name, weight)
            if source.shape != weight.shape:
                raise GraphError(f"quantized weight of '{name}' has shape {source.shape}, the layer {weight.shape}")
            grouped = source.astype(np.float32).reshape(groups, -1)
            layer.params.append((8, int8_term))
            layer.arrays.append((True, quantize_int8(grouped, scales[:, None]).reshape(-1)))
        else:
            layer.arrays.append((True, weight.reshape(-1)))
        if bias is not None:
            layer.arrays.append((False, bias.astype(np.float32).reshape(-1)))
        if int8:
            layer.arrays.append((False, scales))
            layer.arrays.append((False, np.array([self.table.inputs[name]], np.float32)))
        return layer

    def _simple(self, kind, name, params=()) -> Layer:
        return Layer(kind, name, self.data_inputs(name, 1), [self.blob(TensorRef(name))], list(params))

    def _op_Activation(self, name, attrs) -> Layer:
        act = attrs.get("act_type", "")
        if act not in _ACTIVATIONS:
            raise GraphError(f"node '{name}': op Activation act_type={act} cannot be written for ncnn; "
                             f"supported: {', '.join(_ACTIVATIONS)}")
        return self._simple(_ACTIVATIONS[act], name)

    def _op_relu(self, name, attrs) -> Layer:
        return self._simple("ReLU", name)

    def _op_LeakyReLU(self, name, attrs) -> Layer:
        if attrs.get("act_type", "leaky") != "leaky":
            raise GraphError(f"node '{name}': op LeakyReLU act_type={attrs['act_type']} cannot be written for ncnn")
        return self._simple("ReLU", name, [(0, A.get_float(attrs, "slope", 0.25, name))])

    def _op_clip(self, name, attrs) -> Layer:
        return self._simple("Clip", name, [(0, A.get_float(attrs, "a_min", 0.0, name)),
                                           (1, A.get_float(attrs, "a_max", 0.0, name))])

    def _op_Pooling(self, name, attrs) -> Layer:
        pool_type = attrs.get("pool_type", "max")
        if pool_type not in ("max", "avg"):
            raise GraphError(f"node '{name}': op Pooling pool_type={pool_type} cannot be written for ncnn")
        if A.get_bool(attrs, "global_pool", False, name):
            return self._simple("Pooling", name, [(0, int(pool_type == "avg")), (4, 1)])
        convention = attrs.get("pooling_convention", "valid")
        if convention not in ("valid", "full") or attrs.get("layout", "None") not in ("None", "NCHW"):
            raise GraphError(f"node '{name}': op Pooling with pooling_convention={convention} and layout "
                             f"{attrs.get('layout')} cannot be written for ncnn")
        kernel = A.get_tuple(attrs, "kernel", (), name)
        if len(kernel) != 2:
            raise GraphError(f"node '{name}': op Pooling with kernel {kernel}: only 2-D pooling is supported")
        stride = A.get_tuple(attrs, "stride", (1, 1), name) or (1, 1)
        pad = A.get_tuple(attrs, "pad", (0, 0), name) or (0, 0)
        include_pad = A.get_bool(attrs, "count_include_pad", True, name)
        return self._simple("Pooling", name, [
            (0, int(pool_type == "avg")), (1, kernel[1]), (11, kernel[0]), (2, stride[1]), (12, stride[0]),
            (3, pad[1]), (13, pad[0]), (14, pad[1]), (15, pad[0]), (4, 0), (5, 0 if convention == "full" else 1),
            (6, int(include_pad))])

    def _binary(self, name, attrs) -> Layer:
        refs = self.graph.inputs(name)
        shapes = [self.shapes[TensorRef(*r[:2])] for r in refs]
        if len(refs) != 2 or shapes[0] != shapes[1]:
            raise GraphError(f"node '{name}': op {self.graph.op(name)} with input shapes {shapes} cannot be "
                             "written for ncnn; only same-shape elementwise operations are supported")
        return Layer("BinaryOp", name, [self.blob(r) for r in refs], [self.blob(TensorRef(name))],
                     [(0, _BINARY[self.graph.op(name)])])

    def _op_Concat(self, name, attrs) -> Layer:
        rank = len(self.shapes[TensorRef(name, 0)])
        dim = A.get_int(attrs, "dim", 1, name) % rank
        if dim == 0:
            raise GraphError(f"node '{name}': op Concat along the batch axis cannot be written for ncnn")
        refs = self.graph.inputs(name)
        return Layer("Concat", name, [self.blob(r) for r in refs], [self.blob(TensorRef(name))], [(0, dim - 1)])

    def _op_Flatten(self, name, attrs) -> Layer:
        return self._simple("Flatten", name)

    def _softmax(self, name, axis) -> Layer:
        rank = len(self.shapes[TensorRef(name, 0)])
        axis = axis % rank
        if axis == 0:
            raise GraphError(f"node '{name}': softmax along the batch axis cannot be written for ncnn")
        return self._simple("Softmax", name, [(0, axis - 1), (1, 1)])

    def _op_softmax(self, name, attrs) -> Layer:
        return self._softmax(name, A.get_int(attrs, "axis", -1, name))

    def _op_SoftmaxActivation(self, name, attrs) -> Layer:
        if attrs.get("mode", "instance") != "instance":
            raise GraphError(f"node '{name}': SoftmaxActivation mode={attrs['mode']} cannot be written for ncnn")
        return self._softmax(name, 1)

    def _op_SoftmaxOutput(self, name, attrs) -> Layer:
        layer = self._softmax(name, 1)
        layer.bottoms = layer.bottoms[:1]
        return layer


_HANDLERS = {op: getattr(_Converter, f"_op_{op}") for op in (
    "Convolution", "FullyConnected", "Activation", "relu", "LeakyReLU", "clip", "Pooling", "Concat", "Flatten",
    "softmax", "SoftmaxActivation", "SoftmaxOutput")}


def _output_shapes(graph: Graph, input_shapes: dict) -> dict:
    """TensorRef(node, index) -> shape for every tensor, from MXNet's shape inference."""
    internals = graph.to_symbol().get_internals()
    try:
        _, out_shapes, _ = internals.infer_shape(**input_shapes)
    except mx.base.MXNetError as err:
        raise GraphError(f"shape inference failed with inputs {input_shapes}: {mxnet_error_line(err)}") from None
    if out_shapes is None:
        raise GraphError(f"shape inference is incomplete with inputs {input_shapes}")
    shapes = {}
    for output, shape in zip(internals.list_outputs(), out_shapes):
        if output.endswith("_output"):
            shapes[TensorRef(output[: -len("_output")], 0)] = tuple(shape)
        else:
            stem, _, index = output.rpartition("_output")
            if index.isdigit():
                shapes[TensorRef(stem, int(index))] = tuple(shape)
            else:
                shapes[TensorRef(output, 0)] = tuple(shape)
    return shapes


def _format_value(value) -> str:
    if isinstance(value, (bool, int, np.integer)):
        return str(int(value))
    return f"{float(value):e}"


def _param_text(layers: list) -> str:
    blobs = {b for layer in layers for b in layer.bottoms + layer.tops}
    lines = [str(MAGIC), f"{len(layers)} {len(blobs)}"]
    for layer in layers:
        fields = [f"{layer.type:<24s}", f"{layer.name:<24s}", str(len(layer.bottoms)), str(len(layer.tops))]
        fields += layer.bottoms + layer.tops
        fields += [f"{key}={_format_value(value)}" for key, value in layer.params]
        lines.append(" ".join(fields))
    return "\n".join(lines) + "\n"


def _bin_bytes(layers: list) -> bytes:
    chunks = []
    for layer in layers:
        for tagged, array in layer.arrays:
            if tagged:
                chunks.append(struct.pack("<I", TAG_INT8 if array.dtype == np.int8 else TAG_FLOAT32))
            data = array.astype("<f4" if array.dtype != np.int8 else np.int8).tobytes()
            chunks.append(data + b"\0" * (-len(data) % 4))
    return b"".join(chunks)


def to_ncnn(graph: Graph, input_shape=None, table: Table | None = None, quantized: dict | None = None) -> NcnnModel:
    """The ncnn model of `graph` (BatchNorm folded first). With `table`, the layers it has an
    input scale for are written int8, as ncnn2int8 writes them; a layer in `quantized` (layer ->
    its quantized weight Q(W), e.g. AdaRounded) gets the integers of Q(W) instead of rounding its
    float weight to nearest. `input_shape` (N, C, H, W), or a dict per input, defaults to
    graph.input_shapes."""
    shapes = graph.input_shapes if input_shape is None else (
        dict(input_shape) if isinstance(input_shape, dict) else {graph.input_names[0]: tuple(input_shape)})
    missing = [n for n in graph.input_names if n not in shapes]
    if missing:
        raise ConfigError(f"the input shape of {missing} is needed to write an ncnn model; pass input_shape")
    if table is not None:
        unknown = sorted(set(table.inputs) - set(graph.nx))
        if unknown:
            raise GraphError(f"calibration table names layers the graph does not have: {unknown[:3]}")
    return _Converter(graph, {k: tuple(v) for k, v in shapes.items()}, table, quantized).run()


# ---------------------------------------------------------------------- running
# ncnn's defaults let x86 layers keep float weights and activations in fp16 where the CPU has
# F16C (measured here: 1.1e-4 relative error on cifar_resnet20_v1 instead of 2e-6). These
# options keep every float computation in float32, as MXNet and the simulation compute it.
FLOAT32_OPTIONS = {"use_fp16_storage": False, "use_fp16_packed": False, "use_fp16_arithmetic": False,
                   "use_bf16_storage": False}
class NcnnRunner:
    """An ncnn Net loaded from .param/.bin, run one image at a time (ncnn has no batch axis).
    `options` sets ncnn.Option fields before loading, e.g. {"use_winograd_convolution": False}."""

    def __init__(self, param_path, bin_path, input_name: str = "data", output_name: str | None = None,
                 num_threads: int = 1, options: dict | None = None):
        import ncnn  # optional: only running a model needs the ncnn package

        for path in (param_path, bin_path):
            if not Path(path).is_file():
                raise GraphError(f"{path}: no such ncnn model file")
        self.net = ncnn.Net()
        self.net.opt.num_threads = num_threads
        for key, value in (options or {}).items():
            if not hasattr(self.net.opt, key):
                raise ConfigError(f"ncnn.Option has no field '{key}'")
            setattr(self.net.opt, key, value)
        if self.net.load_param(str(param_path)) != 0:
            raise GraphError(f"{param_path}: ncnn cannot load this param file")
        if self.net.load_model(str(bin_path)) != 0:
            raise GraphError(f"{bin_path}: ncnn cannot load this model file (does it match {Path(param_path).name}?)")
        self.input_name = input_name
        self.output_name = output_name or self.net.output_names()[0]

    def __call__(self, images: np.ndarray, progress=None) -> np.ndarray:
        """Outputs for a batch (N, C, H, W) of float32 images, stacked to (N, ...)."""
        import ncnn  # optional, as above

        results = []
        for image in images if progress is None else progress(images):
            extractor = self.net.create_extractor()
            extractor.input(self.input_name, ncnn.Mat(np.ascontiguousarray(image, np.float32)))
            ret, out = extractor.extract(self.output_name)
            if ret != 0:
                raise GraphError(f"ncnn failed to compute blob '{self.output_name}' (error {ret})")
            results.append(np.array(out).copy())
        return np.stack(results)


# ---------------------------------------------------------------------- export and verification
def check_config(config) -> None:
    """Refuse simulation settings ncnn's int8 kernels cannot run (a QuantConfig)."""
    if config.weight_bits != 8 or config.input_bits != 8:
        raise ConfigError("ncnn int8 uses 8-bit weights and inputs: drop --weight-bits-width/--input-bits-width")
    if config.input_signed is not True:
        raise ConfigError("ncnn quantizes inputs as signed int8: use --input-signed true")
    if config.quant_type not in ("channel", "layer"):
        raise ConfigError("ncnn's table holds a weight scale per output channel: use --quant-type channel or layer")
    if not config.quantize_input:
        raise ConfigError("ncnn int8 quantizes every int8 layer's input: drop --no-quantize-input")
    if config.winograd != "none":
        # measured: ncnn's int8 Winograd F(4,3) gives the same outputs as its direct int8
        # convolution, so it quantizes in the spatial domain, not the Winograd domain
        raise ConfigError("ncnn quantizes 3x3 convolutions in the spatial domain: drop --wino-quantize")
    if not config.merge_bn:
        raise ConfigError("ncnn runs BatchNorm folded into the layers: set merge_bn")
    if config.layer_overrides:
        raise ConfigError("the ncnn writer takes no per-layer settings (QuantConfig.layer_overrides): drop "
                          "--layer-config")


@dataclass
class Int8Export:
    """What export_int8 makes: the folded float graph, its FP32 ncnn model, the calibration
    table (as ncnn2table prints it) and the int8 model ncnn2int8 would make from the two."""

    folded: Graph
    fp32: NcnnModel
    table_text: str
    int8: NcnnModel

    def files(self, prefix) -> dict:
        """OUT.param, OUT.bin, OUT.table, OUT-int8.param, OUT-int8.bin -> contents."""
        return {Path(f"{prefix}.param"): self.fp32.param, Path(f"{prefix}.bin"): self.fp32.bin,
                Path(f"{prefix}.table"): self.table_text, Path(f"{prefix}-int8.param"): self.int8.param,
                Path(f"{prefix}-int8.bin"): self.int8.bin}


def export_int8(net, input_shape) -> Int8Export:
    """The ncnn models of a calibrated QuantizedNet whose graph has BatchNorm folded (merge_bn):
    int8 layers are those the net quantizes, with its thresholds and weight granularity."""
    folded = net.current_float_graph().cleanup()
    granularity = {s.granularity for s in net.weight_specs} or {"channel"}
    if len(granularity) > 1:
        raise ConfigError(f"ncnn tables hold one weight granularity; the net mixes {sorted(granularity)}")
    text = calibration_table(folded, net.thresholds(), granularity.pop()).format()
    # AdaRounded weights keep the integers the simulation learned (same scales: s = max|W| / 127)
    learned = {s.layer for s in net.weight_specs if s.offsets}
    quantized = {layer: w for layer, w in net.quantized_weights().items() if layer in learned} if learned else None
    # ncnn2int8 reads the scales back from the printed table, so the int8 model does too
    return Int8Export(folded, to_ncnn(folded, input_shape), text,
                      to_ncnn(folded, input_shape, Table.parse(text), quantized))


def verify(folded: Graph, fp32_files, images: np.ndarray, labels=None, net=None, int8_files=None,
           input_name: str = "data", options: dict | None = None, threads: int = 1, fp32_images: int = 16,
           progress=None) -> Verification:
    """Run the written models with the real ncnn runtime: FP32 against MXNet on the first
    `fp32_images` images, then (given `net` and `int8_files`) int8 against the simulation on all."""
    sample = images[:fp32_images]
    fp32 = NcnnRunner(*fp32_files, input_name=input_name, num_threads=threads, options=options)
    relative = relative_difference(fp32(sample), float_outputs(folded, sample))
    if net is None or int8_files is None:
        return Verification(relative, len(sample))
    int8 = NcnnRunner(*int8_files, input_name=input_name, output_name=fp32.output_name, num_threads=threads,
                      options=dict(options or {}, use_int8_inference=True))
    ncnn_top = int8(images, progress=progress).reshape(len(images), -1).argmax(1)
    return compare(relative, ncnn_top, predict(net, images), labels)
