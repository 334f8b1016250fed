"""ONNX deployment: a Graph (BatchNorm folded) as an FP32 ONNX model, the same model with
QuantizeLinear/DequantizeLinear (QDQ) pairs exactly where the simulation quantizes, and a
runner over ONNX Runtime to check both.

The float model is MXNet's own export (mx.onnx.export_model, opset 22 with onnx 1.17), with
the initializers taken out of the graph inputs (mx.onnx lists every parameter as an input,
which makes weights overridable and stops ONNX Runtime from folding or fusing them). The QDQ
model adds, for every layer the simulation quantizes (qgraph.deploy.integers gives the numbers):
- its data input: QuantizeLinear/DequantizeLinear with scale float32(T) / float32(L) and zero
  point 0, uint8 (L = 255) for unsigned inputs, int8 (L = 127) for signed ones, one pair per
  reading layer (ONNX Runtime fuses a DequantizeLinear with one consumer only). A signed input
  that is not provably non-negative is clipped at -T first: QuantizeLinear saturates at -128,
  the simulation at -127;
- its weight: an int8 initializer with DequantizeLinear, per output channel (axis=0, which
  must be given: the default axis is 1) or per tensor;
- its bias: an int32 initializer round(b / (s_x * s_w)) with DequantizeLinear of scale s_x * s_w
  (QuantConfig.quantize_bias). ONNX Runtime's Conv and Gemm QDQ selectors fuse a node only when
  every input comes from a DequantizeLinear, the bias an int32 one (onnxruntime
  qdq_selectors.cc, ConvNodeGroupSelector / GemmNodeGroupSelector);
- a ReLU between a convolution and an int8 QuantizeLinear: QuantizeLinear/DequantizeLinear with
  the reader's scale before it too. ONNX Runtime drops a ReLU before a quantizer only when the
  zero point is the type's minimum (uint8 0); for int8 zero point 0, Q(relu(y)) = relu(Q(y))
  code for code, so the requantization changes no value and lets the convolution fuse.
Layers the simulation keeps in float stay float. QuantizeLinear rounds half to even, hence
QuantConfig(rounding='half_even').

What ONNX Runtime (1.32, x86 CPU, ORT_ENABLE_ALL) does with it, measured with
tools/export_onnx.py --verify and tests/qgraph/test_onnx.py: a Conv whose only reader is a
QuantizeLinear (or a ReLU and then one) becomes QLinearConv (int32 sums with the int32 bias,
float32 rescale, round half to even, saturation), a Gemm becomes QGemm; with int8 activations
only if the session allows it (session.qdqisint8allowed=1, else it prefers u8s8 and leaves
DQ -> Conv -> Q in float). Fused layers give the simulation's codes exactly; unfused ones
(a convolution read by a residual Add or a pooling) compute in float on dequantized integers,
the simulation's own arithmetic.
"""
from __future__ import annotations

import collections
import importlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np

from .. import attrs as A
from ..errors import ConfigError, GraphError
from ..evaluate import predict
from ..graph import Graph
from ..signs import is_non_negative
from . import integers
from .verification import Verification, compare, float_outputs, relative_difference

QUANTIZED_OPS = {"Convolution": "Conv", "FullyConnected": "Gemm"}
PIP_HINT = {"onnx": "onnx==1.17.0", "onnxruntime": "onnxruntime==1.32.0"}


def require(module: str):
    """Import onnx or onnxruntime, which only ONNX export and its check need, or say how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{module} is not installed (pip install {PIP_HINT[module]})") from None


# ---------------------------------------------------------------------- checks
def check_config(config) -> None:
    """Refuse simulation settings a QDQ model cannot state (a QuantConfig). The exporter writes
    the bias the simulation adds: int32 with quantize_bias (which ONNX Runtime needs to fuse a
    layer), else float (the layer then runs in float on dequantized integers)."""
    if config.winograd != "none":
        mode = "--wino-mode full: the Winograd kernel quantizes its input tiles" if config.winograd_mode == "full" \
            else "--wino-quantize: weights quantized in the Winograd domain are not integers times a step"
        raise ConfigError(f"{mode}, which has no QuantizeLinear/DequantizeLinear equivalent; drop --wino-quantize")
    if config.weight_bits != 8 or config.input_bits != 8:
        raise ConfigError("ONNX Runtime's int8 kernels use 8-bit weights and inputs: drop "
                          "--weight-bits-width/--input-bits-width")
    if not config.quantize_input:
        raise ConfigError("a QDQ model quantizes every int8 layer's input: drop --no-quantize-input")
    if config.rounding != "half_even":
        raise ConfigError("QuantizeLinear rounds half to even: use --rounding half_even")
    if not config.merge_bn:
        raise ConfigError("the QDQ model has BatchNorm folded into the layers: set merge_bn")
    if config.layer_overrides:
        raise ConfigError("the ONNX writer takes no per-layer settings (QuantConfig.layer_overrides): drop "
                          "--layer-config")


def check_ops(graph: Graph) -> None:
    """Every operator of `graph` has an mx.onnx converter; else a GraphError naming the node and op."""
    supported = set(mx.onnx.get_operator_support())
    for name in graph.topo_order():
        op = graph.op(name)
        if op != "null" and op not in supported:
            hint = " (BatchNorm folded? the graph must be the float model)" if op.startswith("_contrib_") else ""
            raise GraphError(f"node '{name}': op {op} has no ONNX mapping in mx.onnx (MXNet {mx.__version__}){hint}")


# ---------------------------------------------------------------------- FP32
def to_onnx(graph: Graph, input_shape) -> "onnx.ModelProto":  # noqa: F821
    """The ONNX model of `graph` by mx.onnx.export_model (batch and spatial axes dynamic, traced
    at `input_shape`), with initializers that are no longer graph inputs; checked by onnx.checker."""
    onnx = require("onnx")
    check_ops(graph)
    params = {k: mx.nd.array(v, dtype=v.dtype) for k, v in graph.params.items()}
    shape = tuple(input_shape)
    with tempfile.TemporaryDirectory(prefix="qgraph-onnx-") as folder:
        path = os.path.join(folder, "model.onnx")
        try:
            mx.onnx.export_model(graph.to_symbol(), params, [shape], [np.float32], path, dynamic=True,
                                 dynamic_input_shapes=[(None, shape[1]) + (None,) * (len(shape) - 2)])
        except Exception as err:  # mx.onnx raises bare exceptions from its converters
            raise GraphError(f"mx.onnx cannot export the graph: {type(err).__name__}: {err}") from None
        model = onnx.load(path)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------- QDQ
@dataclass
class _Rewrite:
    """One QDQ rewrite of an FP32 ONNX model: new initializers and nodes, added in order."""

    model: object
    initializers: list = field(default_factory=list)
    nodes: list = field(default_factory=list)

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper  # optional: only ONNX export needs onnx

        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list, output: str, **attrs) -> str:
        from onnx import helper  # optional, as above

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def dequantize(self, prefix: str, codes, scale, axis: bool) -> str:
        zero = np.zeros(np.shape(scale), codes.dtype)
        inputs = [self.const(f"{prefix}_quantized", codes), self.const(f"{prefix}_scale", scale),
                  self.const(f"{prefix}_zero_point", zero)]
        return self.node("DequantizeLinear", inputs, f"{prefix}_dequantized", **({"axis": 0} if axis else {}))

    def qdq(self, tensor: str, step, signed: bool, prefix: str) -> tuple[str, str]:
        """QuantizeLinear then DequantizeLinear of `tensor`: (codes, dequantized) tensor names."""
        zero = np.zeros((), np.int8 if signed else np.uint8)
        scale, point = self.const(f"{prefix}_scale", np.float32(step)), self.const(f"{prefix}_zero_point", zero)
        codes = self.node("QuantizeLinear", [tensor, scale, point], f"{prefix}_quantized")
        return codes, self.node("DequantizeLinear", [codes, scale, point], f"{prefix}_dequantized")


def layer_nodes(model, folded: Graph, quantized) -> dict:
    """MXNet layer -> its ONNX Conv/Gemm node, for the `quantized` layers. mx.onnx leaves Conv
    nodes unnamed, so a node is found by what the export keeps: the weight initializer (the
    MXNet parameter) at input 1, or the output tensor named after the MXNet node."""
    by_weight = {n.input[1]: n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1}
    by_output = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for layer in sorted(quantized):
        if folded.op(layer) not in QUANTIZED_OPS:
            raise GraphError(f"node '{layer}': op {folded.op(layer)} is quantized but has no QDQ writer here; "
                             f"keep it float (--exclude-op {folded.op(layer)})")
        node = by_weight.get(folded.inputs(layer)[1].node) or by_output.get(layer)
        if node is None or node.op_type != QUANTIZED_OPS[folded.op(layer)]:
            kind = node.op_type if node is not None else "no node"
            raise GraphError(f"node '{layer}': op {folded.op(layer)} was exported as {kind}, not "
                             f"{QUANTIZED_OPS[folded.op(layer)]}; its QDQ form is unknown")
        found[layer] = node
    return found


def qdq_model(folded: Graph, net, input_shape, debug_layers=()) -> "onnx.ModelProto":  # noqa: F821
    """The QDQ model of the calibrated QuantizedNet `net` over its folded float graph. With
    `debug_layers`, the int8/uint8 codes of those layers' inputs are extra graph outputs (int32)."""
    onnx = require("onnx")
    model = to_onnx(folded, input_shape)
    nodes = layer_nodes(model, folded, {s.layer for s in net.weight_specs})
    rewrite = _Rewrite(model)
    inits = {i.name: i for i in model.graph.initializer}
    thresholds = net.thresholds()
    weight_steps, input_steps, codes_of = {}, {}, {}
    values = net.parameter_values()
    for spec in net.weight_specs:
        node = nodes[spec.layer]
        if node.op_type == "Gemm" and _attr(node, "transB", 0) != 1:
            raise GraphError(f"node '{spec.layer}': Gemm without transB=1 has no per-output-channel weight axis")
        weight = onnx.numpy_helper.to_array(inits[node.input[1]])
        codes, steps = integers.weight_codes(weight, spec, offsets=values[spec.offsets] if spec.offsets else None)
        per_tensor = spec.reshape[0] == 1
        scale = steps[:1].reshape(()) if per_tensor else steps
        node.input[1] = rewrite.dequantize(f"{spec.layer}_weight", codes, scale, axis=not per_tensor)
        weight_steps[spec.layer] = steps
    for spec in net.input_specs:
        node = nodes[spec.layer]
        step = integers.input_step(thresholds[spec.layer], spec)
        source = node.input[0]
        if spec.signed and not is_non_negative(folded, folded.inputs(spec.layer)[0]):
            low = rewrite.const(f"{spec.layer}_data_clip_min", -np.float32(thresholds[spec.layer]))
            source = rewrite.node("Clip", [source, low], f"{spec.layer}_data_clipped")
        codes_of[spec.layer], node.input[0] = rewrite.qdq(source, step, spec.signed, f"{spec.layer}_data")
        input_steps[spec.layer] = (step, spec.signed)
    for spec in net.weight_specs:
        node = nodes[spec.layer]
        if spec.bias_bits and spec.layer in input_steps and len(node.input) > 2 and node.input[2]:
            bias = onnx.numpy_helper.to_array(inits[node.input[2]])
            codes, steps = integers.bias_codes(bias, weight_steps[spec.layer], input_steps[spec.layer][0],
                                               spec.rounding, spec.bias_bits)
            node.input[2] = rewrite.dequantize(f"{spec.layer}_bias", codes, steps, axis=True)
    _requantize_before_relu(rewrite, nodes, input_steps)
    graph = model.graph
    used = {i for n in list(graph.node) + rewrite.nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in used] + rewrite.initializers
    ordered = _toposort(list(graph.node) + rewrite.nodes, [i.name for i in graph.input] + [i.name for i in kept])
    del graph.node[:], graph.initializer[:]
    graph.node.extend(ordered)
    graph.initializer.extend(kept)
    for layer in debug_layers:  # through a Cast: ONNX Runtime fuses no quantizer whose output is a graph output
        rank = 2 if nodes[layer].op_type == "Gemm" else 2 + len(A.get_tuple(folded.attrs(layer), "kernel", (), layer))
        codes = f"{codes_of[layer]}_int32"
        graph.node.append(onnx.helper.make_node("Cast", [codes_of[layer]], [codes], name=codes,
                                                to=onnx.TensorProto.INT32))
        graph.output.append(onnx.helper.make_tensor_value_info(codes, onnx.TensorProto.INT32,
                                                               [f"{layer}_dim{i}" for i in range(rank)]))
    onnx.checker.check_model(model, full_check=True)
    return model


def _attr(node, name: str, default):
    from onnx import helper  # optional: only ONNX export needs onnx

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _requantize_before_relu(rewrite: _Rewrite, nodes: dict, input_steps: dict) -> None:
    """Conv -> Relu -> int8 Q (all readers alike) becomes Conv -> Q -> DQ -> Relu -> Q, so that the
    convolution, quantized on both sides with one type, fuses into QLinearConv."""
    readers = collections.defaultdict(list)
    for node in list(rewrite.model.graph.node) + rewrite.nodes:
        for name in node.input:
            readers[name].append(node)
    quantizer_of = {f"{layer}_data_quantized": layer for layer in input_steps}
    for layer, node in nodes.items():
        users = readers[node.output[0]]
        if layer not in input_steps or node.op_type != "Conv" or len(users) != 1 or users[0].op_type != "Relu":
            continue
        relu = users[0]
        steps = set()
        for user in readers[relu.output[0]]:
            reader = quantizer_of.get(user.output[0]) if user.op_type == "QuantizeLinear" else None
            steps.add(None if reader is None else input_steps[reader])
        if len(steps) == 1 and None not in steps:
            step, signed = steps.pop()
            if signed and input_steps[layer][1]:  # uint8 Q after a Relu fuses without help
                relu.input[0] = rewrite.qdq(node.output[0], step, True, f"{layer}_output")[1]


def _toposort(nodes: list, available: list) -> list:
    ready, pending, ordered = set(available) | {""}, list(nodes), []
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.input)]
        if not progress:
            raise GraphError(f"ONNX node '{pending[0].name}' ({pending[0].op_type}) reads a tensor nothing makes")
        ordered += progress
        for node in progress:
            ready.update(node.output)
        done = {id(n) for n in progress}
        pending = [n for n in pending if id(n) not in done]
    return ordered


@dataclass
class OnnxExport:
    """What export_int8 makes: the folded float graph, its FP32 ONNX model and the QDQ model."""

    folded: Graph
    fp32: bytes
    int8: bytes

    def files(self, prefix) -> dict:
        """OUT.onnx (QDQ) and OUT-fp32.onnx -> contents."""
        return {Path(f"{prefix}.onnx"): self.int8, Path(f"{prefix}-fp32.onnx"): self.fp32}


def export_fp32(graph: Graph, input_shape) -> bytes:
    """The serialized FP32 ONNX model of a folded float graph."""
    return to_onnx(graph, input_shape).SerializeToString()


def export_int8(net, input_shape) -> OnnxExport:
    """The ONNX models of a calibrated QuantizedNet whose graph has BatchNorm folded (merge_bn)."""
    folded = net.current_float_graph().cleanup()
    return OnnxExport(folded, export_fp32(folded, input_shape), qdq_model(folded, net, input_shape).SerializeToString())


# ---------------------------------------------------------------------- running
def session(model, int8_activations: bool = False, optimized_path=None, threads: int = 1):
    """An ONNX Runtime CPU session over a model (path or bytes) with every graph optimisation on;
    int8 activations fuse on x86 only with session.qdqisint8allowed=1. `optimized_path` receives
    the optimised model, where the fused operators can be counted."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if int8_activations:
        options.add_session_config_entry("session.qdqisint8allowed", "1")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = str(model) if isinstance(model, (str, Path)) else model
    if isinstance(source, str) and not Path(source).is_file():
        raise GraphError(f"{source}: no such ONNX model file")
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types
        raise GraphError(f"ONNX Runtime cannot load the model: {str(err).splitlines()[0][:300]}") from None


def run(sess, images: np.ndarray, batch_size: int = 500, outputs=None) -> list[np.ndarray]:
    """The session's outputs over `images`, in batches, concatenated."""
    name = sess.get_inputs()[0].name
    results = [sess.run(outputs, {name: np.ascontiguousarray(images[i:i + batch_size], np.float32)})
               for i in range(0, len(images), batch_size)]
    return [np.concatenate([r[k] for r in results]) for k in range(len(results[0]))]


def operator_counts(model_path) -> collections.Counter:
    onnx = require("onnx")
    return collections.Counter(n.op_type for n in onnx.load(str(model_path)).graph.node)


def int8_activations(net) -> bool:
    return any(s.signed for s in net.input_specs)


# ---------------------------------------------------------------------- verification
def verify(folded: Graph, fp32_model, images: np.ndarray, labels=None, net=None, int8_model=None,
           threads: int = 1, fp32_images: int = 16) -> Verification:
    """Run the written models with ONNX Runtime: FP32 against MXNet on the first `fp32_images`
    images, then (given `net` and `int8_model`) the QDQ model against the simulation on all,
    with the fused operators of its optimised graph (QLinearConv, QGemm) counted."""
    sample = images[:fp32_images]
    ours = run(session(fp32_model, threads=threads), sample)[0]
    relative = relative_difference(ours, float_outputs(folded, sample))
    if net is None or int8_model is None:
        return Verification(relative, len(sample))
    with tempfile.TemporaryDirectory(prefix="qgraph-ort-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        sess = session(int8_model, int8_activations(net), optimized, threads)
        counts = operator_counts(optimized)
    logits = run(sess, images)[0].reshape(len(images), -1)
    convs = len(folded.nodes("Convolution"))
    notes = (f"QLinearConv {counts.get('QLinearConv', 0)} of {convs} convolutions, "
             f"QGemm {counts.get('QGemm', 0)} of {len(folded.nodes('FullyConnected'))} fully connected",)
    details = {"QLinearConv": counts.get("QLinearConv", 0), "QGemm": counts.get("QGemm", 0), "Conv": convs}
    return compare(relative, logits.argmax(1), predict(net, images), labels, notes, details)
