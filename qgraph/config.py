"""QuantConfig: one validated, frozen place for every quantization choice and its default."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import ConfigError

QUANT_TYPES = ("layer", "group", "channel")
ONLINE_STATS = ("max", "mean_max")
WINOGRAD_TILES = ("none", "F23", "F43", "F63")
WINOGRAD_MODES = ("weight", "full")
ROUNDINGS = ("half_away", "half_even")


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
    or 'full' (the Winograd kernel itself, input tiles quantized too). fake_bn: for QAT,
    quantize convolution weights folded with their BatchNorm (passes/fake_bn.py). equalize:
    cross-layer equalization with bias absorption (passes/equalize.py, DFQ) after BatchNorm
    folding, which it requires (merge_bn).
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
        for name in ("quantize_input", "online", "merge_bn", "exclude_first_conv", "exclude_last_fc", "fake_bn",
                     "equalize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"QuantConfig.{name}={getattr(self, name)!r}: must be True or False")
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

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)
