"""QuantConfig: one validated, frozen place for every quantization choice and its default."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import ConfigError

QUANT_TYPES = ("layer", "group", "channel")
ONLINE_STATS = ("max", "mean_max")
WINOGRAD_TILES = ("none", "F23", "F43", "F63")
WINOGRAD_MODES = ("weight", "full")
WINOGRAD_SCALES = ("channel", "tile")
ROUNDINGS = ("half_away", "half_even")
OVERRIDE_FIELDS = ("weight_bits", "input_bits", "quant_type", "input_signed")


@dataclass(frozen=True)
class LayerOverride:
    """One entry of QuantConfig.layer_overrides: the layer stays in float (`float`), or the
    fields given (not None) replace the config's own for it. From JSON: the string "float", or
    an object with some of weight_bits, input_bits, quant_type, input_signed."""

    weight_bits: int | None = None
    input_bits: int | None = None
    quant_type: str | None = None
    input_signed: object = None
    float: bool = False

    @classmethod
    def parse(cls, value, where: str) -> "LayerOverride":
        """A LayerOverride from itself, "float" or a mapping of its fields; `where` names the entry."""
        if isinstance(value, LayerOverride):
            return value
        if value == "float":
            return cls(float=True)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {value!r} must be \"float\" or an object with some of "
                              f"{', '.join(OVERRIDE_FIELDS)}")
        unknown = sorted(set(value) - set(OVERRIDE_FIELDS) - {"float"})
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(OVERRIDE_FIELDS)}, float")
        if not value or (value.get("float") is True and len(value) > 1):
            raise ConfigError(f"{where}: {dict(value)!r} must set float alone or some of {', '.join(OVERRIDE_FIELDS)}")
        if "float" in value and not isinstance(value["float"], bool):
            raise ConfigError(f"{where}.float={value['float']!r}: must be true or false")
        return cls(**value)

    def merged(self, later: "LayerOverride") -> "LayerOverride":
        """This entry with a later one's word on top: "float" replaces everything, fields replace fields."""
        if later.float:
            return later
        fields = {name: getattr(later, name) if getattr(later, name) is not None else getattr(self, name)
                  for name in OVERRIDE_FIELDS}
        return LayerOverride(**fields)

    def apply(self, config: "QuantConfig") -> "QuantConfig":
        """`config` as it applies to the layer (validated; no overrides of its own)."""
        fields = {name: getattr(self, name) for name in OVERRIDE_FIELDS if getattr(self, name) is not None}
        return config.replace(layer_overrides=(), **fields)

    def to_json(self):
        """"float" or the fields set, as --layer-config files hold them."""
        return "float" if self.float else {n: getattr(self, n) for n in OVERRIDE_FIELDS if getattr(self, n) is not None}


@dataclass(frozen=True)
class QuantConfig:
    """How to simulate quantization.

    weight_bits / input_bits: 2..16. quant_type: weight scale per layer, per group
    (num_group slices) or per output channel. input_signed: False (one-sided uint, the
    seed's default), True (int), or 'auto' (unsigned only where the producer is provably
    non-negative). online: input thresholds from each batch (True) or calibrated
    parameters (False). online_stat: 'max' (batch max, the default) or 'mean_max' (the
    seed's mean of per-sample maxima, which clips the larger samples). winograd: 'none' or
    the tile F23/F43/F63 in which 3x3 stride-1 convolutions are quantized; winograd_mode:
    'weight' (the seed: weights quantized in the Winograd domain, then a direct convolution)
    or 'full' (the Winograd kernel itself, input tiles quantized too); winograd_scales (full
    mode): one scale per output channel for U = G g G^T and one threshold per layer for the
    tiles V ('channel'), or a scale per (tile position, output channel) and a threshold per
    tile position ('tile'). fake_bn: for QAT, quantize convolution weights folded with their
    BatchNorm (passes/fake_bn.py). learn_thresholds: QAT learns the offline input thresholds
    with LSQ's scaled gradient (Esser et al. 2019) instead of keeping them fixed.
    rounding: how every quantizer rounds ties, 'half_away' (MXNet's round, ncnn) or
    'half_even' (ONNX QuantizeLinear, oneDNN reorders). quantize_bias: each quantized layer's
    bias becomes the int32 value round(b / (s_x * s_w)) * s_x * s_w (per output channel, with
    `rounding`), the bias ONNX Runtime's QLinearConv/QGemm and oneDNN's int8 convolutions add;
    it needs quantized inputs, and neither Winograd-domain weights nor fake BatchNorm. equalize: cross-layer
    equalization with bias absorption (passes/equalize.py, DFQ) after BatchNorm folding, which
    it requires (merge_bn).
    """

    weight_bits: int = 8
    quant_type: str = "layer"
    quantize_input: bool = True
    input_signed: object = False
    input_bits: int = 8
    online: bool = True
    online_stat: str = "max"
    merge_bn: bool = False
    exclude_first_conv: bool = True
    exclude_last_fc: bool = False
    exclude: tuple = ()          # exact node names or regular expressions (full match)
    exclude_ops: tuple = ()      # operator types, e.g. ("FullyConnected",)
    winograd: str = "none"
    winograd_mode: str = "weight"
    fake_bn: bool = False
    rounding: str = "half_away"
    winograd_scales: str = "channel"
    learn_thresholds: bool = False
    quantize_bias: bool = False
    layer_overrides: tuple = ()  # ((name or regex, LayerOverride), ...); a mapping is accepted
    equalize: bool = False

    def __post_init__(self):
        for name in ("weight_bits", "input_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
                raise ConfigError(f"QuantConfig.{name}={value!r}: must be an integer in 2..16")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"QuantConfig.quant_type={self.quant_type!r}: must be one of {', '.join(QUANT_TYPES)}")
        if not (self.input_signed is True or self.input_signed is False or self.input_signed == "auto"):
            raise ConfigError(f"QuantConfig.input_signed={self.input_signed!r}: must be True, False or 'auto'")
        if self.online_stat not in ONLINE_STATS:
            raise ConfigError(f"QuantConfig.online_stat={self.online_stat!r}: must be one of {', '.join(ONLINE_STATS)}")
        if self.winograd not in WINOGRAD_TILES:
            raise ConfigError(f"QuantConfig.winograd={self.winograd!r}: must be one of {', '.join(WINOGRAD_TILES)}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"QuantConfig.rounding={self.rounding!r}: must be one of {', '.join(ROUNDINGS)}")
        if self.winograd_mode not in WINOGRAD_MODES:
            raise ConfigError(f"QuantConfig.winograd_mode={self.winograd_mode!r}: must be one of "
                              f"{', '.join(WINOGRAD_MODES)}")
        if self.winograd_scales not in WINOGRAD_SCALES:
            raise ConfigError(f"QuantConfig.winograd_scales={self.winograd_scales!r}: must be one of "
                              f"{', '.join(WINOGRAD_SCALES)}")
        if self.winograd_scales == "tile" and (self.winograd == "none" or self.winograd_mode != "full"):
            raise ConfigError("QuantConfig.winograd_scales='tile' quantizes a Winograd kernel's tiles: it needs "
                              "winograd set to F23, F43 or F63 and winograd_mode='full'")
        for name in ("quantize_input", "online", "merge_bn", "exclude_first_conv", "exclude_last_fc", "fake_bn",
                     "learn_thresholds", "quantize_bias", "equalize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"QuantConfig.{name}={getattr(self, name)!r}: must be True or False")
        self._check_quantize_bias()
        if self.equalize and not self.merge_bn:
            raise ConfigError("QuantConfig.equalize=True requires merge_bn=True: cross-layer equalization balances "
                              "the weights BatchNorm is folded into (--equalize needs --merge-bn)")
        for name in ("exclude", "exclude_ops"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"QuantConfig.{name}={value!r}: must be a tuple of strings")
            object.__setattr__(self, name, tuple(value))
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"QuantConfig.exclude: {pattern!r} is not a valid regular expression ({err})") from None
        if self.learn_thresholds and (self.online or not self.quantize_input):
            raise ConfigError("QuantConfig.learn_thresholds=True learns offline input thresholds: it needs "
                              "online=False and quantize_input=True")
        object.__setattr__(self, "layer_overrides", _parse_overrides(self.layer_overrides))
        for pattern, entry in self.layer_overrides:
            try:
                entry.apply(self)  # each field validated as the config's own
            except ConfigError as err:
                raise ConfigError(str(err).replace("QuantConfig.", f"QuantConfig.layer_overrides[{pattern!r}].", 1)
                                  ) from None

    def _check_quantize_bias(self) -> None:
        """An int32 bias has the step s_x * s_w: it needs the input's step and a spatial weight step."""
        if not self.quantize_bias:
            return
        blocker = ("quantize_input=False (no input step s_x)" if not self.quantize_input else
                   f"winograd={self.winograd!r} (weight steps in the Winograd domain)" if self.winograd != "none" else
                   "fake_bn=True (the folded bias is not a tensor of the graph)" if self.fake_bn else None)
        if blocker:
            raise ConfigError(f"QuantConfig.quantize_bias=True cannot be combined with {blocker}")

    def overrides_for(self, layers: Sequence[str]) -> dict[str, LayerOverride]:
        """layer -> the merged override of every entry matching it (an exact name, else a regular
        expression matching the whole name), for the layers some entry matches. ConfigError
        naming the pattern when one matches none of `layers`."""
        found: dict[str, LayerOverride] = {}
        for pattern, entry in self.layer_overrides:
            matches = [pattern] if pattern in layers else [n for n in layers if re.fullmatch(pattern, n)]
            if not matches:
                raise ConfigError(f"QuantConfig.layer_overrides: {pattern!r} matches no Convolution, Deconvolution "
                                  "or FullyConnected layer of the graph")
            for layer in matches:
                found[layer] = found[layer].merged(entry) if layer in found else entry
        return found

    def overrides_json(self) -> dict:
        """layer_overrides as a --layer-config JSON object (pattern -> "float" or fields)."""
        return {pattern: entry.to_json() for pattern, entry in self.layer_overrides}

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


def _parse_overrides(value) -> tuple:
    """((pattern, LayerOverride), ...) from a mapping or a sequence of pairs, each checked."""
    if isinstance(value, Mapping):
        value = tuple(value.items())
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ConfigError(f"QuantConfig.layer_overrides={value!r}: must be a mapping from layer name or regex "
                          "to its settings")
    pairs = []
    for item in value:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"QuantConfig.layer_overrides: {item!r} is not a (layer name or regex, settings) pair")
        pattern = item[0]
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"QuantConfig.layer_overrides: {pattern!r} is not a valid regular expression "
                              f"({err})") from None
        pairs.append((pattern, LayerOverride.parse(item[1], f"QuantConfig.layer_overrides[{pattern!r}]")))
    return tuple(pairs)
