"""MXNet's own int8 inference (oneDNN) fed with qgraph's thresholds: the int8 symbol and params
MXNet users deploy, made by MXNet's quantization flow from the BatchNorm-folded float graph,
and a runner to check them against the simulation.

The flow (python/mxnet/contrib/quantization.py, MXNet 1.9.1):
1. sym.get_backend_symbol('MKLDNN_QUANTIZE') fuses Convolution (+ ReLU) into _sg_mkldnn_conv;
2. quantize_graph(calib_mode='none', quantized_dtype='auto', quantize_granularity='channel-wise')
   puts quantized operators in, and lists the tensors that need a range;
3. calib_graph(calib_mode='customize') takes those ranges from a collector's min_max_dict;
4. get_backend_symbol('MKLDNN_QUANTIZE') again folds the requantization into the convolutions.

MXNet quantizes tensors, not layer inputs: every range is keyed by a tensor of the fused graph,
'data', the output of a fused node (`sg_mkldnn_conv_relu_3_output`, named after no Gluon layer),
or a float op's output before a quantize_v2. The name map goes from a key to the Gluon tensor it
holds (the last node inside a fused subgraph) to the qgraph layers reading that tensor (through
Flatten/Reshape/Dropout) and their input thresholds. A quantized convolution's output is stored
int8/uint8 for every reader, float ones too; where no layer qgraph quantizes reads it (a
convolution before a residual Add or a pooling), its range is the largest |value| over the
calibration images: a requantization the simulation does not have.

oneDNN's arithmetic (quantization_utils.h GetQuantizeScale, mkldnn_quantize_v2-inl.h,
subgraph/mkldnn/mkldnn_conv.cc, mkldnn_common.h GetWeightScales, ConvertWeightBias2MKLDNN):
- data: scale 127.5/R (int8) or 255.5/R (uint8) for a range R, reorders that round half to even
  and saturate to [-128, 127] / [0, 255]. qgraph's step is T/127 (T/255), so R = T * 127.5/127
  (T * 255.5/255) makes the steps equal; only int8's -128 (values below -T) differs from
  qgraph's -127;
- weights: 127.5 / max|W_c| per output channel, so the channel's extreme lands on +-127.5 (-128
  for a negative one). The params hold qgraph's Q(W) with each channel's extreme moved to about
  127.5 * s_w, chosen in float32 so that the reorder gives +-127: oneDNN then holds qgraph's
  codes and (to a few ulps) its steps (a channel where no such float32 exists keeps -128 for
  that one weight);
- bias: int32 rint(b * scale_x * scale_w), as QuantConfig.quantize_bias;
- output: int32 sums rescaled by s_out / (s_x * s_w) in float, ReLU fused, rounded half to
  even and saturated: uint8 after a fused ReLU, int8 otherwise;
- the fully connected layer's requantize + dequantize fuse into a float output.
MXNet 1.9.1 bug: a convolution fused with a residual sum and a ReLU computes in place in the
residual's buffer (mkldnn_conv.cc: output = inputs[in_sum]), so with an int8 residual its
uint8-scaled output saturates at 127, half its range. The export keeps every convolution out of
a sum fusion (an x + 0 between them during the flow, removed afterwards; the backend pass looks
through a `_copy`) and the residual Adds and the ReLUs after them in float, as the simulation
computes them. MXNET_DISABLE_MKLDNN_FUSE_CONV_SUM=1 does the same, but MXNet reads it only when
its library loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet.contrib import quantization as mxq

from ..errors import ConfigError, GraphError, mxnet_error_line
from ..evaluate import predict
from ..graph import Graph, TensorRef
from ..io import to_block
from . import integers
from .verification import Verification, compare, float_outputs, relative_difference


BACKEND = "MKLDNN_QUANTIZE"
FLOAT_OPS = ("elemwise_add", "_Plus", "_plus", "broadcast_add", "Activation")  # and pooling but max pooling
PASS_THROUGH = ("Flatten", "flatten", "Reshape", "reshape", "Dropout", "_copy", "identity")
SUM_OPS = ("elemwise_add", "_Plus", "_plus", "broadcast_add")
RANGE = {True: 127.5 / 127, False: 255.5 / 255}  # oneDNN's step R/127.5 (R/255.5) is qgraph's T/127 (T/255)
UNFUSED = "_qgraph_no_sum_fusion"


def check_config(config) -> None:
    """Refuse simulation settings MXNet's oneDNN int8 cannot run (a QuantConfig)."""
    if config.weight_bits != 8 or config.input_bits != 8:
        raise ConfigError("MXNet's int8 uses 8-bit weights and inputs: drop --weight-bits-width/--input-bits-width")
    if config.quant_type != "channel":
        raise ConfigError("the export uses MXNet's channel-wise weight scales: use --quant-type channel")
    if config.input_signed != "auto":
        raise ConfigError("MXNet quantizes to uint8 after fused ReLUs and to int8 elsewhere: use --input-signed auto")
    if not config.quantize_input:
        raise ConfigError("MXNet's int8 layers quantize their inputs: drop --no-quantize-input")
    if config.winograd != "none":
        raise ConfigError("oneDNN's int8 convolutions quantize in the spatial domain: drop --wino-quantize")
    if config.rounding != "half_even":
        raise ConfigError("oneDNN's reorders round half to even: use --rounding half_even")
    if not config.merge_bn:
        raise ConfigError("MXNet's int8 flow runs BatchNorm folded into the layers: set merge_bn")
    if config.layer_overrides:
        raise ConfigError("the MXNet int8 export takes no per-layer settings (QuantConfig.layer_overrides): drop "
                          "--layer-config")


@dataclass
class Int8Model:
    """MXNet's int8 model: the symbol and params to deploy, the range given to each calibration
    key (min, max), the Gluon tensor each key holds, and notes on what differs from qgraph."""

    symbol: mx.sym.Symbol
    arg_params: dict
    aux_params: dict
    ranges: dict
    tensors: dict
    notes: list = field(default_factory=list)

    def files(self, prefix) -> dict:
        """PREFIX-symbol.json and PREFIX-0000.params -> contents (params written by mx.nd.save)."""
        return model_files(prefix, self.symbol.tojson(), self.arg_params, self.aux_params)


def model_files(prefix, symbol_json: str, arg_params: dict, aux_params: dict) -> dict:
    """An MXNet model's PREFIX-0000.params (first: a reader never sees a new symbol with old
    params) and PREFIX-symbol.json -> contents."""
    arrays = {**{f"arg:{k}": mx.nd.array(v) for k, v in arg_params.items()},
              **{f"aux:{k}": mx.nd.array(v) for k, v in aux_params.items()}}
    return {Path(f"{prefix}-0000.params"): lambda tmp: mx.nd.save(tmp, arrays),
            Path(f"{prefix}-symbol.json"): symbol_json}


def fp32_files(folded: Graph, prefix) -> dict:
    """The folded float model's files, as MXNet's quantization flow starts from it."""
    aux = folded.aux_names()
    return model_files(prefix, folded.to_json(), {k: v for k, v in folded.params.items() if k not in aux},
                       {k: v for k, v in folded.params.items() if k in aux})


# ---------------------------------------------------------------------- weights
def exact_weight(weight: np.ndarray, spec, offsets: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    """qgraph's Q(W) with each output channel's extreme moved to m, about 127.5 * s_w, such that
    oneDNN's weight quantization (scale 127.5 / max|W_c|, rint, saturate) gives qgraph's codes.
    `offsets`: the layer's learned rounding decisions (AdaRound), if any. Returns (the weight to
    hand to MXNet, channels where oneDNN keeps -128 for the extreme)."""
    codes, steps = integers.weight_codes(weight, spec, offsets=offsets)
    flat = codes.reshape(len(codes), -1)
    out = (flat * steps[:, None]).astype(np.float32)
    kept = []
    for c in range(len(flat)):
        if not flat[c].any():
            continue
        extreme = int(np.argmax(np.abs(flat[c])))
        m = _extreme(steps[c], flat[c, extreme] < 0)
        if m is None:
            kept.append(c)
            m = np.float32(127.5) * steps[c]
        out[c, extreme] = np.sign(flat[c, extreme]) * m
    return out.reshape(weight.shape), kept


def _extreme(step: np.float32, negative: bool) -> np.float32 | None:
    """m near 127.5 * step with oneDNN's code for it 127 (and -127 for -m): m * float32(127.5 / m)
    must stay below 127.5 when the extreme is negative (rint(-127.5) is -128)."""
    m = np.float32(127.5) * np.float32(step)
    if not negative:
        return m
    candidates = m.view(np.int32) + np.arange(-4096, 4097, dtype=np.int32)
    values = np.sort(candidates.view(np.float32), kind="stable")
    values = values[np.argsort(np.abs(values - m), kind="stable")]
    products = values * (np.float32(127.5) / values)
    fine = values[(products < np.float32(127.5)) & (products > np.float32(126.5))]
    return fine[0] if fine.size else None


# ---------------------------------------------------------------------- conversion
def _guard_sums(graph: Graph) -> list[str]:
    """An x + 0 between every Convolution and a residual sum reading it, so that oneDNN fuses no
    convolution with a sum (the in-place sum of MXNet 1.9.1 saturates uint8 outputs at 127)."""
    guards = []
    for node in graph.nodes(SUM_OPS):
        for slot, ref in enumerate(graph.inputs(node)):
            if graph.op(ref.node) == "Convolution":
                guards.append(graph.insert_on_edge(node, slot, "_plus_scalar", f"{ref.node}{UNFUSED}", {"scalar": "0"}))
    return guards


def _nodes(symbol) -> list:
    return json.loads(symbol.tojson())["nodes"]


def _fused_heads(symbol) -> dict:
    """Fused node -> (the Gluon node whose output it produces, the Gluon nodes inside it)."""
    found = {}
    for node in _nodes(symbol):
        if node.get("subgraphs"):
            body = node["subgraphs"][0]
            inner = {n["name"] for n in body["nodes"] if n["op"] != "null"}
            found[node["name"]] = (body["nodes"][body["heads"][0][0]]["name"], inner)
    return found


def _is_max_pooling(graph: Graph, node: str) -> bool:
    return graph.op(node) == "Pooling" and graph.attrs(node).get("pool_type", "max") == "max"


def _quantized_readers(graph: Graph, tensor: str, layers) -> list[str]:
    """The layers in `layers` reading `tensor`, through reshapes and max pooling (which commutes
    with quantization at one step, so MXNet's int8 max pooling is the simulation's float one)."""
    found = []
    for reader, slot in graph.consumers(TensorRef(tensor)):
        if graph.op(reader) in PASS_THROUGH or _is_max_pooling(graph, reader):
            found += _quantized_readers(graph, reader, layers)
        elif reader in layers and slot == 0:
            found.append(reader)
    return found


def _largest_values(graph: Graph, tensors: list, images: np.ndarray, batch_size: int = 100) -> dict:
    """(min, max) of float tensors of `graph` over `images`."""
    probe = graph.copy().set_outputs([TensorRef(t) for t in tensors]).cleanup()
    block = to_block(probe)
    low, high = {t: np.inf for t in tensors}, {t: -np.inf for t in tensors}
    for start in range(0, len(images), batch_size):
        outputs = block(mx.nd.array(images[start:start + batch_size]))
        for tensor, out in zip(tensors, outputs if isinstance(outputs, (list, tuple)) else [outputs]):
            values = out.asnumpy()
            low[tensor], high[tensor] = min(low[tensor], float(values.min())), max(high[tensor], float(values.max()))
    return {t: (low[t], high[t]) for t in tensors}


class _Collector:
    """What calib_graph(calib_mode='customize') reads: min_max_dict, calibration key -> (min, max)."""

    def __init__(self, ranges: dict):
        self.min_max_dict = dict(ranges)


def convert(net, calib_images: np.ndarray) -> Int8Model:
    """MXNet's int8 model of a calibrated QuantizedNet (BatchNorm folded, channel weights, 'auto'
    inputs, half-even rounding, integer biases), its thresholds handed to MXNet's flow. Tensors
    MXNet requantizes that no quantized layer reads get the (min, max) over `calib_images`."""
    folded = net.current_float_graph().cleanup()
    weights = {s.layer: s for s in net.weight_specs}
    for layer in weights:
        if folded.op(layer) not in ("Convolution", "FullyConnected"):
            raise GraphError(f"node '{layer}': op {folded.op(layer)} has no int8 kernel in MXNet's oneDNN flow; keep "
                             f"it float (--exclude-op {folded.op(layer)})")
    thresholds = net.thresholds()
    signed = {s.layer: s.signed for s in net.input_specs}
    notes = []
    params, values = dict(folded.params), net.parameter_values()
    for layer, spec in weights.items():
        name = folded.inputs(layer)[1].node
        params[name], kept = exact_weight(folded.params[name], spec, values[spec.offsets] if spec.offsets else None)
        if kept:
            notes.append(f"{layer}: oneDNN keeps -128 for the extreme weight of channel(s) {kept}")
    guarded = folded.copy()
    guards = _guard_sums(guarded)
    args = {k: mx.nd.array(v) for k, v in params.items() if k not in folded.aux_names()}
    aux = {k: mx.nd.array(v) for k, v in params.items() if k in folded.aux_names()}
    symbol = guarded.to_symbol()
    try:
        fused = symbol.get_backend_symbol(BACKEND)
        heads = _fused_heads(fused)
        excluded = sorted(name for name, (_, inner) in heads.items() if any(
            n in inner for n in folded.nodes(("Convolution", "FullyConnected")) if n not in thresholds))
        excluded += [n for n in folded.nodes("Pooling") if not _is_max_pooling(folded, n)]
        options = dict(excluded_sym_names=excluded, excluded_op_names=list(FLOAT_OPS), quantized_dtype="auto",
                       quantize_mode="full", quantize_granularity="channel-wise")
        _, keys = mxq._quantize_symbol(fused, mx.cpu(), excluded_symbols=excluded,
                                       excluded_operators=list(FLOAT_OPS), offline_params=list(args),
                                       quantized_dtype="auto", quantize_mode="full",
                                       quantize_granularity="channel-wise")
        qsym, qargs, qaux, _ = mxq.quantize_graph(fused, args, aux, mx.cpu(), calib_mode="none", **options)
        tensors = {key: _key_tensor(key, heads) for key in keys}
        ranges = _ranges(folded, tensors, thresholds, signed, calib_images, notes)
        qsym, qargs, qaux = mxq.calib_graph(qsym, qargs, qaux, _Collector(ranges), calib_mode="customize",
                                            quantized_dtype="auto", logger=None)
        final = qsym.get_backend_symbol(BACKEND)
    except mx.base.MXNetError as err:
        raise GraphError(f"MXNet's quantization flow failed: {mxnet_error_line(err)}") from None
    return Int8Model(_drop_guards(final, guards), qargs, qaux, ranges, tensors, notes)


def _key_tensor(key: str, heads: dict) -> str:
    stem = key[: -len("_output")] if key.endswith("_output") else key
    return heads[stem][0] if stem in heads else stem


def _ranges(folded: Graph, tensors: dict, thresholds: dict, signed: dict, images, notes: list) -> dict:
    ranges, unread = {}, []
    for key, tensor in tensors.items():
        if tensor not in folded:
            raise GraphError(f"MXNet asks for the range of '{key}', which holds no tensor of the graph")
        if folded.op(tensor) == "FullyConnected" and not folded.consumers(TensorRef(tensor)):
            ranges[key] = (-1.0, 1.0)  # any range: requantize + dequantize fuse into a float output
            continue
        readers = _quantized_readers(folded, tensor, thresholds)
        if not readers:
            unread.append(key)
            continue
        values = sorted({float(thresholds[r]) for r in readers})
        if len(values) > 1:
            notes.append(f"{tensor}: read by {readers} with thresholds {values}; MXNet quantizes it once, "
                         "with the largest")
        is_signed = any(signed[r] for r in readers)
        top = values[-1] * RANGE[is_signed]
        ranges[key] = (-top if is_signed else 0.0, top)
    if unread:
        found = _largest_values(folded, [tensors[k] for k in unread], images)
        for key in unread:
            low, high = found[tensors[key]]
            top = max(abs(low), abs(high)) * RANGE[low < 0]
            ranges[key] = (-top if low < 0 else 0.0, top)
            notes.append(f"{tensors[key]}: requantized by MXNet for float readers, range {top:.4g} from the "
                         "calibration images (the simulation keeps it float)")
    return ranges


def _drop_guards(symbol, guards: list):
    """The final symbol without the x + 0 nodes that kept convolutions out of sum fusion (an
    edit of the Symbol JSON: MXNet's quantized operators are not all IR-checkable)."""
    doc = json.loads(symbol.tojson())
    nodes = doc["nodes"]
    dropped = {i: node["inputs"][0] for i, node in enumerate(nodes) if node["name"] in set(guards)}
    if not dropped:
        return symbol
    position, kept = {}, []
    for i, node in enumerate(nodes):
        if i not in dropped:
            position[i] = len(kept)
            kept.append(node)

    def moved(entry):
        while entry[0] in dropped:
            entry = dropped[entry[0]]
        return [position[entry[0]]] + list(entry[1:])

    for node in kept:
        node["inputs"] = [moved(e) for e in node.get("inputs", [])]
    doc.update(nodes=kept, arg_nodes=[position[i] for i in doc["arg_nodes"]], heads=[moved(h) for h in doc["heads"]])
    doc.pop("node_row_ptr", None)
    return mx.sym.load_json(json.dumps(doc))


# ---------------------------------------------------------------------- running
class Int8Runner:
    """An MXNet executor over a symbol and its params (oneDNN fusion on, as MXNet binds by
    default), bound for the images' shape and run in batches of `batch_size`."""

    def __init__(self, symbol, arg_params: dict, aux_params: dict, input_name: str = "data", batch_size: int = 250):
        self.symbol, self.args, self.aux = symbol, arg_params, aux_params
        self.input_name, self.batch_size = input_name, batch_size
        self._executors: dict = {}

    @classmethod
    def load(cls, prefix, **options) -> "Int8Runner":
        symbol_path, params_path = Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params")
        for path in (symbol_path, params_path):
            if not path.is_file():
                raise GraphError(f"{path}: no such MXNet model file")
        saved = mx.nd.load(str(params_path))
        args = {k[4:]: v for k, v in saved.items() if k.startswith("arg:")}
        aux = {k[4:]: v for k, v in saved.items() if k.startswith("aux:")}
        return cls(mx.sym.load(str(symbol_path)), args, aux, **options)

    def _executor(self, shape: tuple):
        if shape not in self._executors:
            try:
                executor = self.symbol.simple_bind(mx.cpu(), grad_req="null", **{self.input_name: shape})
                executor.copy_params_from(self.args, self.aux, allow_extra_params=True)
            except mx.base.MXNetError as err:
                raise GraphError(f"MXNet cannot bind the model for input {shape}: {mxnet_error_line(err)}") from None
            self._executors[shape] = executor
        return self._executors[shape]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        size = min(self.batch_size, len(images))
        executor = self._executor((size,) + tuple(images.shape[1:]))
        outputs = []
        for start in range(0, len(images), size):
            batch = images[start:start + size]
            padded = np.zeros((size,) + batch.shape[1:], np.float32)
            padded[:len(batch)] = batch
            out = executor.forward(is_train=False, **{self.input_name: mx.nd.array(padded)})[0]
            outputs.append(out.asnumpy()[:len(batch)])
        return np.concatenate(outputs).reshape(len(images), -1)


def verify(folded: Graph, prefix, images: np.ndarray, labels=None, net=None, fp32_images: int = 16) -> Verification:
    """MXNet's executor (oneDNN fusion on) on the folded float graph against Gluon on the first
    `fp32_images` images; then (given `net`) the int8 files at `prefix` against the simulation."""
    sample, name = images[:fp32_images], folded.input_names[0]
    symbol = folded.to_symbol()
    aux_names = folded.aux_names(symbol)
    fp32 = Int8Runner(symbol, {k: mx.nd.array(v) for k, v in folded.params.items() if k not in aux_names},
                      {k: mx.nd.array(v) for k, v in folded.params.items() if k in aux_names}, name)
    relative = relative_difference(fp32(sample), float_outputs(folded, sample))
    if net is None:
        return Verification(relative, len(sample))
    int8 = Int8Runner.load(prefix, input_name=name)
    return compare(relative, int8(images).argmax(1), predict(net, images), labels)
