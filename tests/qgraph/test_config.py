"""QuantConfig: every invalid field is a ConfigError naming the field; documented defaults."""
import dataclasses

import pytest

from qgraph import ConfigError, QuantConfig

INVALID = [
    ("weight_bits", 1), ("weight_bits", 17), ("weight_bits", 0), ("weight_bits", -8), ("weight_bits", True),
    ("weight_bits", "8"), ("weight_bits", 8.0), ("weight_bits", None),
    ("input_bits", 1), ("input_bits", 17), ("input_bits", False), ("input_bits", "8"),
    ("quant_type", "tensor"), ("quant_type", "Layer"), ("quant_type", None),
    ("input_signed", "yes"), ("input_signed", 1), ("input_signed", 0), ("input_signed", None),
    ("input_signed", "AUTO"),
    ("online_stat", "mean"), ("online_stat", "percentile"),
    ("online", "yes"), ("online", 1), ("quantize_input", 0), ("merge_bn", "False"),
    ("exclude_first_conv", None), ("exclude_last_fc", 1),
    ("exclude", "conv1"), ("exclude", ("conv1", 3)), ("exclude_ops", "FullyConnected"),
    ("exclude", ("[unclosed",)), ("exclude", ("conv(",)), ("exclude", ("*conv",)),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_field_raises_config_error_naming_it(field, value):
    with pytest.raises(ConfigError) as info:
        QuantConfig(**{field: value})
    assert field in str(info.value)


def test_invalid_regex_message_names_the_pattern():
    with pytest.raises(ConfigError, match=r"exclude.*\[unclosed"):
        QuantConfig(exclude=("conv0", "[unclosed"))


def test_replace_validates_too():
    with pytest.raises(ConfigError, match="weight_bits"):
        QuantConfig().replace(weight_bits=1)
    assert QuantConfig().replace(weight_bits=4).weight_bits == 4


def test_documented_defaults():
    config = QuantConfig()
    assert config.weight_bits == 8
    assert config.input_bits == 8
    assert config.quant_type == "layer"
    assert config.input_signed is False
    assert config.online is True
    assert config.online_stat == "max"   # DESIGN: the batch max by default, the seed's mean_max as an option
    assert config.quantize_input is True
    assert config.exclude_first_conv is True
    assert config.exclude_last_fc is False
    assert config.merge_bn is False
    assert config.exclude == () and config.exclude_ops == ()


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_valid_bit_widths(bits):
    config = QuantConfig(weight_bits=bits, input_bits=bits)
    assert (config.weight_bits, config.input_bits) == (bits, bits)


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_valid_input_signed(value):
    assert QuantConfig(input_signed=value).input_signed == value


@pytest.mark.parametrize("quant_type", ["layer", "group", "channel"])
def test_valid_quant_types(quant_type):
    assert QuantConfig(quant_type=quant_type).quant_type == quant_type


def test_exclude_lists_become_tuples_and_config_is_frozen_and_hashable():
    config = QuantConfig(exclude=["conv1", r"stage\d_.*"], exclude_ops=["Deconvolution"])
    assert config.exclude == ("conv1", r"stage\d_.*") and config.exclude_ops == ("Deconvolution",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weight_bits = 4
    assert hash(config) == hash(QuantConfig(exclude=("conv1", r"stage\d_.*"), exclude_ops=("Deconvolution",)))
