"""Per-layer overrides through the passes: insert_fake_quant gives each layer its own bits,
granularity and sign, 'float' entries stay float (exclude, and insert_fake_quant alone), the
default exclusions still apply, and a pattern that matches no layer fails naming it."""
from __future__ import annotations

import mxnet as mx
import pytest
from helpers import MNIST_CNN, init_params

import passes
from qgraph import Graph, PassError, PassManager, QuantConfig
from qgraph.quantizer import fake_quant_specs

S = mx.sym


def _graph():
    x = S.Convolution(S.var("data"), num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv0")
    x = S.Convolution(S.Activation(x, act_type="relu", name="relu0"), num_filter=4, kernel=(3, 3), pad=(1, 1),
                      name="conv1")
    x = S.Convolution(S.Activation(x, act_type="relu", name="relu1"), num_filter=4, kernel=(1, 1), name="conv2")
    symbol = S.FullyConnected(S.Flatten(x), num_hidden=3, name="fc")
    graph = Graph.from_json(symbol.tojson(), init_params(symbol, {"data": (2, 3, 5, 5)}), input_names=["data"])
    graph.input_shapes = {"data": (2, 3, 5, 5)}
    return graph


def _specs(config, pipeline=None):
    graph, report = PassManager(pipeline or passes.default_pipeline(config), verify=True).run(_graph(), config)
    return {(s.layer, s.kind): s for s in fake_quant_specs(graph)}, report


def test_each_layer_gets_its_own_settings():
    config = QuantConfig(weight_bits=4, input_bits=4, quant_type="channel", layer_overrides={
        "conv1": {"weight_bits": 8, "quant_type": "layer"}, "conv2": {"input_bits": 6, "input_signed": True}})
    specs, report = _specs(config)
    assert (specs["conv1", "weight"].bits, specs["conv1", "weight"].granularity) == (8, "layer")
    assert (specs["conv1", "input"].bits, specs["conv1", "input"].signed) == (4, False)
    assert (specs["conv2", "weight"].bits, specs["conv2", "weight"].granularity) == (4, "channel")
    assert (specs["conv2", "input"].bits, specs["conv2", "input"].signed) == (6, True)
    assert (specs["fc", "weight"].bits, specs["fc", "input"].bits) == (4, 4)
    assert "weight int8 per layer" in [e.reason for e in report.for_pass("insert_fake_quant") if e.node == "conv1"][0]


def test_float_entries_stay_float_and_exclusions_still_apply():
    config = QuantConfig(layer_overrides={"conv[02]": "float", "conv0": {"weight_bits": 4}})
    specs, report = _specs(config)
    assert {layer for layer, _ in specs} == {"conv1", "fc"}  # conv0 is the first convolution: excluded anyway
    reasons = {e.node: e.reason for e in report.for_pass("exclude")}
    assert reasons["conv2"] == "kept in float: layer_overrides: float"
    alone, report = _specs(config, passes.build_pipeline("insert_fake_quant"))
    assert ("conv2", "weight") not in alone and ("conv0", "weight") in alone and alone["conv0", "weight"].bits == 4
    assert "layer_overrides: float" in {e.node: e.reason for e in report.for_pass("insert_fake_quant")}["conv2"]


@pytest.mark.parametrize("pipeline", ["exclude,insert_fake_quant", "insert_fake_quant"])
def test_a_pattern_matching_no_layer_fails_naming_it(pipeline):
    config = QuantConfig(layer_overrides={"conv9": "float"})
    with pytest.raises(PassError, match="'conv9' matches no Convolution, Deconvolution or FullyConnected"):
        PassManager(passes.build_pipeline(pipeline)).run(_graph(), config)


def test_an_overridden_layer_gets_the_spec_a_uniform_config_gives_it():
    mixed = passes.quantize(MNIST_CNN, QuantConfig(weight_bits=4, quant_type="channel", input_signed="auto",
                                                   layer_overrides={"mnistcnn_conv2_fwd": {"weight_bits": 8,
                                                                                           "input_bits": 6}}))
    uniform = passes.quantize(MNIST_CNN, QuantConfig(weight_bits=8, input_bits=6, quant_type="channel",
                                                     input_signed="auto"))
    pick = lambda net: [s for s in net.weight_specs + net.input_specs if s.layer == "mnistcnn_conv2_fwd"]  # noqa: E731
    assert pick(mixed) == pick(uniform)
    assert {s.bits for s in mixed.weight_specs if s.layer != "mnistcnn_conv2_fwd"} == {4}
