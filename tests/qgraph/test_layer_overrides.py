"""QuantConfig.layer_overrides: accepted forms, validation naming the entry and field, merging
(later entries win), matching by exact name or whole-name regex, and a pattern that matches no
layer is an error; the config stays frozen and hashable."""
import pytest

from qgraph import ConfigError, LayerOverride, QuantConfig

LAYERS = ["conv0", "conv1", "conv10", "fc"]


def test_a_mapping_is_stored_as_pairs_and_the_config_stays_hashable():
    config = QuantConfig(layer_overrides={"conv1": {"weight_bits": 4}, "fc": "float"})
    assert config.layer_overrides == (("conv1", LayerOverride(weight_bits=4)), ("fc", LayerOverride(float=True)))
    assert hash(config) == hash(QuantConfig(layer_overrides=config.layer_overrides))
    assert config.replace(weight_bits=4).layer_overrides == config.layer_overrides
    assert config.overrides_json() == {"conv1": {"weight_bits": 4}, "fc": "float"}


def test_exact_names_and_whole_name_regexes_match_later_entries_win():
    config = QuantConfig(layer_overrides={"conv.*": {"weight_bits": 4, "input_bits": 6}, "conv1": {"weight_bits": 8},
                                          "conv1.": "float"})
    found = config.overrides_for(LAYERS)
    assert set(found) == {"conv0", "conv1", "conv10"}
    assert found["conv0"] == LayerOverride(weight_bits=4, input_bits=6)
    assert found["conv1"] == LayerOverride(weight_bits=8, input_bits=6)   # fields merge, the later one wins
    assert found["conv10"].float                                          # "conv1." matches conv10 only
    back = QuantConfig(layer_overrides={".*": "float", "fc": {"quant_type": "channel"}}).overrides_for(LAYERS)
    assert not back["fc"].float and back["fc"].quant_type == "channel" and back["conv0"].float


def test_apply_gives_the_layer_its_own_config():
    config = QuantConfig(weight_bits=4, quant_type="channel", layer_overrides={"fc": {"weight_bits": 8,
                                                                                      "input_signed": "auto"}})
    own = config.overrides_for(LAYERS)["fc"].apply(config)
    assert (own.weight_bits, own.input_bits, own.quant_type, own.input_signed) == (8, 8, "channel", "auto")
    assert own.layer_overrides == ()


def test_a_pattern_matching_no_layer_is_named():
    with pytest.raises(ConfigError, match=r"layer_overrides: 'dense\.\*' matches no Convolution"):
        QuantConfig(layer_overrides={"conv0": "float", "dense.*": "float"}).overrides_for(LAYERS)


@pytest.mark.parametrize("value, message", [
    ({"conv0": {"weight_bits": 1}}, r"layer_overrides\['conv0'\]\.weight_bits=1: must be an integer in 2\.\.16"),
    ({"conv0": {"quant_type": "tensor"}}, r"layer_overrides\['conv0'\]\.quant_type='tensor'"),
    ({"conv0": {"input_signed": "yes"}}, r"layer_overrides\['conv0'\]\.input_signed='yes'"),
    ({"conv0": {"bits": 4}}, r"layer_overrides\['conv0'\]: unknown field 'bits'"),
    ({"conv0": "fp32"}, r"layer_overrides\['conv0'\]: 'fp32' must be \"float\""),
    ({"conv0": {}}, r"layer_overrides\['conv0'\]: \{\} must set"),
    ({"conv0": {"float": True, "weight_bits": 4}}, r"must set float alone"),
    ({"conv0": {"float": "yes"}}, r"float='yes': must be true or false"),
    ({"conv(": "float"}, r"layer_overrides: 'conv\(' is not a valid regular expression"),
    ("conv0", r"layer_overrides='conv0': must be a mapping"),
    ((("conv0",),), r"is not a \(layer name or regex, settings\) pair"),
])
def test_invalid_entries_name_the_entry_and_field(value, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(layer_overrides=value)
