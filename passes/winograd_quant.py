"""winograd_quant: a fake-quantized 3x3 stride-1 Convolution  =>  the same layer quantized as a Winograd
F(2,3) / F(4,3) / F(6,3) kernel would quantize it.

Runs after insert_fake_quant, on the layers it quantized; grouped and depthwise convolutions are
handled per group, everything else is skipped with the reason in the report. Two modes
(QuantConfig.winograd_mode):

- weight (the seed's): conv(x, Q(W))  =>  conv(x, G^+ Q(G W G^T) G^+^T). The 3x3 kernels are
  transformed, quantized with the layer's weight spec (bits, per layer/group/output channel),
  projected back with G's pseudo-inverse (computed once, stored as constants) and convolved
  directly; the input keeps its quantizer.
- full: conv(Qx(x), Q(W), b)  =>  the Winograd kernel in stock operators. Qx(x) (the layer's own
  input quantizer, as an int8 kernel receives int8 data) is padded and cut into n x n tiles that
  two grouped convolutions transform, V = B^T d B; V is quantized (signed, input bits); the weights
  are transformed, U = G W G^T, and quantized per output channel; the element-wise products summed
  over input channels are one grouped 1x1 convolution (`<layer>_wino_product`, one group per tile
  position and convolution group); a grouped Deconvolution applies A^T . A and the bias, and the
  result is cropped to the convolution's output. Q(V) and Q(U) are ordinary input and weight
  fake-quant subgraphs of the product node, so QuantizedNet switches them, emits online tile
  thresholds for update_ema and calibrates the stored `<layer>_wino_product_data_threshold` on the float
  tiles like any other input. Its float graph is the Winograd computation in float32, which differs
  from the direct convolution by rounding only.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from qgraph import attrs as A
from qgraph import winograd
from qgraph.config import QuantConfig
from qgraph.errors import ConfigError
from qgraph.graph import Graph, TensorRef
from qgraph.pass_manager import PassContext
from qgraph.quantizer import (EXCLUDE_TAG, FQ_TAG, QUANTIZABLE_OPS, SPEC_TAG, FakeQuantSpec, add_input_fake_quant,
                              add_weight_fake_quant, strip_fake_quant)

STRUCTURE_TAG = "Winograd transform (float)"
_STRUCTURAL = {EXCLUDE_TAG: STRUCTURE_TAG}


class WinogradQuant:
    name = "winograd_quant"
    requires = ("insert_fake_quant",)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        config = ctx.config or QuantConfig()
        if config.winograd == "none":
            raise ConfigError("winograd_quant needs QuantConfig.winograd set to F23, F43 or F63")
        for layer in _find_layers(graph):
            weight_spec, input_spec, reason = _check_layer(graph, layer)
            if reason:
                ctx.report.skipped(self.name, layer, reason)
                continue
            if config.winograd_mode == "weight":
                _rewrite_weight(graph, layer, weight_spec, config.winograd)
                ctx.report.changed(self.name, layer, f"weight quantized in the {config.winograd} domain, "
                                                     "projected back with G's pseudo-inverse")
            else:
                product = _rewrite_full(graph, layer, weight_spec, input_spec, config.winograd)
                tiles = f", tiles int{input_spec.bits}" if input_spec else ""
                ctx.report.changed(self.name, layer, f"{config.winograd} Winograd kernel ({product}): weights "
                                                     f"int{weight_spec.bits} per {weight_spec.granularity}{tiles}")
        return graph


def _find_layers(graph: Graph) -> list[str]:
    return [n for n in graph.nodes(QUANTIZABLE_OPS) if graph.attrs(n).get(EXCLUDE_TAG) != STRUCTURE_TAG]


def _spec_at(graph: Graph, layer: str, slot: int) -> FakeQuantSpec | None:
    """The spec of the fake-quant subgraph feeding `layer[slot]`, if any."""
    inputs = graph.inputs(layer)
    if slot >= len(inputs):
        return None
    text = graph.attrs(inputs[slot].node).get(SPEC_TAG)
    spec = FakeQuantSpec.from_json(text) if text else None
    return spec if spec is not None and spec.layer == layer and spec.slot == slot else None


def _check_layer(graph: Graph, layer: str):
    """(weight spec, input spec or None, None) for a layer to rewrite, else (None, None, reason)."""
    op, attrs = graph.op(layer), graph.attrs(layer)
    if op != "Convolution":
        return None, None, f"{op} is not a Convolution"
    kernel = A.get_tuple(attrs, "kernel", (), layer)
    if len(kernel) != 2:
        return None, None, f"{len(kernel)}-D convolution; Winograd applies to 2-D 3x3 kernels"
    if tuple(kernel) != (3, 3):
        return None, None, f"kernel {tuple(kernel)} is not 3x3"
    stride = A.get_tuple(attrs, "stride", (1, 1), layer) or (1, 1)
    if tuple(stride) != (1, 1):
        return None, None, f"stride {tuple(stride)} is not 1"
    dilate = A.get_tuple(attrs, "dilate", (1, 1), layer) or (1, 1)
    if tuple(dilate) != (1, 1):
        return None, None, f"dilation {tuple(dilate)} is not 1"
    if attrs.get("layout", "None") not in ("None", "NCHW"):
        return None, None, f"layout {attrs['layout']} is not NCHW"
    if attrs.get(EXCLUDE_TAG):
        return None, None, f"excluded ({attrs[EXCLUDE_TAG]})"
    weight_spec = _spec_at(graph, layer, 1)
    if weight_spec is None:
        return None, None, "its weight is not fake-quantized (run insert_fake_quant first)"
    if weight_spec.winograd:
        return None, None, f"weight already quantized in the {weight_spec.winograd} domain"
    return weight_spec, _spec_at(graph, layer, 0), None


def _rewrite_weight(graph: Graph, layer: str, spec: FakeQuantSpec, tile: str) -> None:
    strip_fake_quant(graph, kinds=("weight",), layers={layer})
    add_weight_fake_quant(graph, dataclasses.replace(spec, winograd=tile))


class _Structure:
    """Adds the float Winograd nodes of one layer, named `<layer>_wino_<suffix>`."""

    def __init__(self, graph: Graph, layer: str):
        self.graph, self.layer = graph, layer

    def op(self, op: str, suffix: str, inputs, **attrs) -> TensorRef:
        return TensorRef(self.graph.add_node(op, f"{self.layer}_wino_{suffix}", inputs, attrs))

    def kernel(self, suffix: str, value: np.ndarray, copies: int) -> TensorRef:
        """A constant convolution kernel, `value` tiled `copies` times along the first axis."""
        ref = winograd.constant(self.op, f"{suffix}_const", value)
        return self.op("tile", suffix, [ref], reps=(copies,) + (1,) * (value.ndim - 1))

    def regroup(self, x: TensorRef, outer: int, inner: int, suffix: str) -> TensorRef:
        """NCHW channels ordered (outer, inner) -> ordered (inner, outer). H and W are merged for
        the transpose: a 4-D transpose runs about twice as fast as a 5-D one here."""
        split = self.op("Reshape", f"{suffix}_split", [x], shape=(0, -4, outer, inner, -3))
        swapped = self.op("transpose", f"{suffix}_swap", [split], axes=(0, 2, 1, 3))
        return self.op("reshape_like", suffix, [swapped, x])


def _rewrite_full(graph: Graph, layer: str, weight_spec: FakeQuantSpec, input_spec: FakeQuantSpec | None,
                  tile: str) -> str:
    """Replace `layer` by its Winograd kernel with Q(U) and Q(V); returns the product node's name."""
    threshold = None
    if input_spec is not None and not input_spec.online:
        threshold = np.asarray(graph.params[input_spec.threshold])
    strip_fake_quant(graph, layers={layer})
    attrs = graph.attrs(layer)
    x, weight, *bias = graph.inputs(layer)
    w_shape = weight_spec.shape
    if graph.is_param(weight.node):
        # the weight no longer feeds a Convolution, from which MXNet used to infer its shape
        graph.set_attr(weight.node, "__shape__", A.format_tuple(w_shape))
    groups = A.get_int(attrs, "num_group", 1, layer)
    c_out, c_in_g = w_shape[0], w_shape[1]
    c_in = c_in_g * groups
    m, n = winograd.output_size(tile), winograd.input_size(tile)
    _, BT, AT = winograd.matrices(tile)
    pad_h, pad_w = (tuple(A.get_tuple(attrs, "pad", (0, 0), layer)) or (0, 0))
    s = _Structure(graph, layer)

    # input tiles: m - 1 extra rows and columns at the bottom and right give ceil(out / m) whole tiles
    padded = s.op("Pad", "pad", [x], mode="constant", constant_value=0.0,
                  pad_width=(0, 0, 0, 0, pad_h, pad_h + m - 1, pad_w, pad_w + m - 1))
    rows = s.op("Convolution", "in_rows", [padded, s.kernel("bt_rows", BT.reshape(n, 1, n, 1), c_in)],
                kernel=(n, 1), stride=(m, 1), num_filter=c_in * n, num_group=c_in, no_bias=True, **_STRUCTURAL)
    tiles = s.op("Convolution", "in_tiles", [rows, s.kernel("bt_cols", BT.reshape(n, 1, 1, n), c_in * n)],
                 kernel=(1, n), stride=(1, m), num_filter=c_in * n * n, num_group=c_in * n, no_bias=True,
                 **_STRUCTURAL)
    v = s.regroup(tiles, c_in, n * n, "tiles_by_position")            # channels (a, b, c)

    transformed = winograd.transform_weight(s.op, weight, tile)         # (c_out * c_in_g, n, n)
    by_position = s.op("transpose", "u_swap", [s.op("Reshape", "u_split", [transformed],
                                                    shape=(c_out, c_in_g, n * n))], axes=(2, 0, 1))
    u = s.op("Reshape", "u", [by_position], shape=(n * n * c_out, c_in_g, 1, 1))   # filters (a, b, o)
    product = s.op("Convolution", "product", [v, u], kernel=(1, 1), num_filter=n * n * c_out,
                   num_group=n * n * groups, no_bias=True)

    # A^T M A for every tile and output channel, plus the bias: kernel[(o, a, b), 0, p, q] = A^T[p, a] A^T[q, b]
    pairs = s.kernel("at_pairs", np.einsum("pa,qb->abpq", AT, AT).reshape(n * n, 1, m, m), c_out)
    out_tiles = s.op("Deconvolution", "out_tiles",
                     [s.regroup(product, n * n, c_out, "products_by_channel"), pairs] + bias,
                     kernel=(m, m), stride=(m, m), num_filter=c_out, num_group=c_out, no_bias=not bias, **_STRUCTURAL)
    # the direct convolution's output size from a one-channel slice of the padded input
    reference = s.op("slice_axis", "ref_c", [padded], axis=1, begin=0, end=1)
    reference = s.op("slice_axis", "ref_h", [reference], axis=2, begin=0, end=-(m + 1))
    reference = s.op("slice_axis", "ref_w", [reference], axis=3, begin=0, end=-(m + 1))
    output = s.op("slice_like", "out", [out_tiles, reference], axes=(2, 3))
    graph.replace_node(layer, output.node)

    _requantize(graph, product.node, padded.node, weight_spec, input_spec, threshold, (n, c_out, groups, c_in_g))
    return product.node


def _requantize(graph, product, first, weight_spec, input_spec, threshold, dims) -> None:
    """Q(x) where the layer read x (the padding), Q(U) and Q(V) at the product."""
    n, c_out, groups, c_in_g = dims
    reshape, axes = {"layer": ((1, -1), (1,)), "group": ((n * n, groups, -1), (0, 2)),
                     "channel": ((n * n, c_out, -1), (0, 2))}[weight_spec.granularity]
    add_weight_fake_quant(graph, FakeQuantSpec("weight", product, 1, weight_spec.bits, signed=True,
                                               granularity=weight_spec.granularity, reshape=reshape, axes=axes,
                                               shape=(n * n * c_out, c_in_g, 1, 1)))
    if input_spec is None:
        return
    x_spec = dataclasses.replace(input_spec, layer=first, slot=0)
    tile_spec = FakeQuantSpec("input", product, 0, input_spec.bits, signed=True, online=input_spec.online,
                              stat=input_spec.stat)
    if threshold is not None:  # offline: stored thresholds, named as insert_fake_quant names them
        x_spec = dataclasses.replace(x_spec, threshold=graph.add_variable(
            f"{first}_data_threshold", threshold, attrs={FQ_TAG: x_spec.id}))
        tile_spec = dataclasses.replace(tile_spec, threshold=graph.add_variable(
            f"{product}_data_threshold", np.zeros(1, np.float32), attrs={FQ_TAG: tile_spec.id}))
    add_input_fake_quant(graph, x_spec)
    add_input_fake_quant(graph, tile_spec)
