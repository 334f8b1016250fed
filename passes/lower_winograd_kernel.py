"""lower_winograd_kernel (QuantConfig.winograd_mode 'full'): a fake-quantized 3x3 stride-1
Convolution  =>  the F(2,3) / F(4,3) / F(6,3) Winograd kernel an int8 engine runs, quantized
where that kernel quantizes:

    conv(Qx(x), Q(W), b)  =>  A^T [ Q(G W G^T) . Q(B^T Qx(x) B) ] A + b

The float kernel is built by qgraph.winograd.build_kernel (stock operators). Qx(x), the
layer's own input quantizer, stays where the layer read x (an int8 kernel receives int8
data); V = B^T d B is quantized as the signed input of the product node
(`<layer>_wino_product`, input bits) and U = G W G^T as its weight, per output channel
(or per layer/group, as the layer's weight spec). Q(V) and Q(U) are ordinary fake-quant
subgraphs of the product, so QuantizedNet switches them, emits online tile thresholds for
update_ema and calibrates the stored `<layer>_wino_product_data_threshold` on the float
tiles like any other input. Runs after insert_fake_quant; grouped and depthwise
convolutions are handled per group; other layers are skipped with the reason.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from qgraph import winograd
from qgraph.config import QuantConfig
from qgraph.errors import ConfigError
from qgraph.graph import Graph
from qgraph.pass_manager import PassContext
from qgraph.quantizer import (QUANTIZABLE_OPS, FakeQuantSpec, add_input_fake_quant, add_weight_fake_quant,
                              spec_feeding, strip_fake_quant, winograd_candidate)
from qgraph.tags import FQ_TAG, WINOGRAD_TAG


class LowerWinogradKernel:
    name = "lower_winograd_kernel"
    requires = ("insert_fake_quant",)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        config = ctx.config or QuantConfig()
        if config.winograd == "none":
            raise ConfigError("lower_winograd_kernel needs QuantConfig.winograd set to F23, F43 or F63")
        for layer in graph.nodes(QUANTIZABLE_OPS):
            weight_spec, reason = winograd_candidate(graph, layer)
            if reason:
                ctx.report.skipped(self.name, layer, reason)
                continue
            input_spec = spec_feeding(graph, layer, 0)
            product = _rewrite(graph, layer, weight_spec, input_spec, config.winograd, config.winograd_scales)
            tiles = f", tiles int{input_spec.bits}" if input_spec else ""
            ctx.report.changed(self.name, layer, f"{config.winograd} Winograd kernel ({product}): weights "
                                                 f"int{weight_spec.bits} per {weight_spec.granularity}{tiles}")
        return graph


def _rewrite(graph: Graph, layer: str, weight_spec: FakeQuantSpec, input_spec: FakeQuantSpec | None,
             tile: str, scales: str = "channel") -> str:
    """Replace `layer` by its Winograd kernel with Q(x), Q(U) and Q(V); returns the product node.
    scales 'tile': U gets a scale per (tile position, output channel) and V a threshold per tile
    position (each position's channels pass through a node of their own, `<layer>_wino_tile<k>`,
    whose input is quantized, and are concatenated again)."""
    threshold = None
    if input_spec is not None and not input_spec.online:
        threshold = np.asarray(graph.params[input_spec.threshold])
    strip_fake_quant(graph, layers={layer})
    kernel = winograd.build_kernel(graph, layer, tile)
    n, c_out, groups, c_in_g = kernel.dims
    granularity = "tile" if scales == "tile" else weight_spec.granularity
    reshape, axes = {"layer": ((1, -1), (1,)), "group": ((n * n, groups, -1), (0, 2)),
                     "channel": ((n * n, c_out, -1), (0, 2)), "tile": ((n * n * c_out, -1), (1,))}[granularity]
    add_weight_fake_quant(graph, FakeQuantSpec("weight", kernel.product, 1, weight_spec.bits, signed=True,
                                               granularity=granularity, reshape=reshape, axes=axes,
                                               shape=(n * n * c_out, c_in_g, 1, 1), rounding=weight_spec.rounding))
    if input_spec is None:
        return kernel.product
    x_spec = dataclasses.replace(input_spec, layer=kernel.padded, slot=0)
    if threshold is not None:  # offline: stored thresholds, named as insert_fake_quant names them
        x_spec = dataclasses.replace(x_spec, threshold=graph.add_variable(
            f"{kernel.padded}_data_threshold", threshold, attrs={FQ_TAG: x_spec.id}))
    add_input_fake_quant(graph, x_spec)
    tile_layers = _tile_positions(graph, kernel, layer) if scales == "tile" else [kernel.product]
    for tile_layer in tile_layers:
        tile_spec = FakeQuantSpec("input", tile_layer, 0, input_spec.bits, signed=True, online=input_spec.online,
                                  stat=input_spec.stat, rounding=input_spec.rounding, learned=input_spec.learned)
        if threshold is not None:
            tile_spec = dataclasses.replace(tile_spec, threshold=graph.add_variable(
                f"{tile_layer}_data_threshold", np.zeros(1, np.float32), attrs={FQ_TAG: tile_spec.id}))
        add_input_fake_quant(graph, tile_spec)
    return kernel.product


def _tile_positions(graph: Graph, kernel: winograd.Kernel, layer: str) -> list[str]:
    """product(V, U)  =>  product(Concat(tile_0(V[:, position 0]), ..., tile_nn(V[:, position nn])), U):
    one node per tile position, so that each gets an input quantizer (threshold) of its own."""
    n, c_out, groups, c_in_g = kernel.dims
    channels = c_in_g * groups
    v = graph.inputs(kernel.product)[0]
    node = graph.builder(f"{layer}_wino", {WINOGRAD_TAG: layer})
    positions = []
    for k in range(n * n):
        part = node("slice_axis", f"tile{k}_channels", [v], axis=1, begin=k * channels, end=(k + 1) * channels)
        positions.append(node("_copy", f"tile{k}", [part]))
    joined = node("Concat", "tiles_joined", positions, dim=1, num_args=len(positions))
    graph.set_input(kernel.product, 0, joined)
    return [p.node for p in positions]
