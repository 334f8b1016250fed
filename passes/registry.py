"""The pass registry: name -> pass class, built once at import and only read, and the pipelines
(lists of pass instances) built from names or from a QuantConfig."""
from __future__ import annotations

from types import MappingProxyType

from qgraph.config import QuantConfig
from qgraph.errors import ConfigError

from .equalize import Equalize
from .exclude import Exclude
from .fake_bn import FakeBN
from .fix_weights import FixWeights
from .fold_bn import FoldBN
from .insert_fake_quant import InsertFakeQuant
from .insert_observers import InsertObservers
from .lower_winograd_kernel import LowerWinogradKernel
from .quantize_winograd_weights import QuantizeWinogradWeights

PASSES = MappingProxyType({cls.name: cls for cls in (FoldBN, Equalize, Exclude, FakeBN, InsertFakeQuant, InsertObservers,
                                                     QuantizeWinogradWeights, LowerWinogradKernel, FixWeights)})


def get_pass(name: str):
    """A new instance of the pass registered as `name`."""
    try:
        return PASSES[name]()
    except KeyError:
        raise ConfigError(f"unknown pass '{name}'; known passes: {', '.join(sorted(PASSES))}") from None


def build_pipeline(names) -> list:
    """Pass instances for a list of names (or a comma-separated string)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return [get_pass(n) for n in names]


def default_pipeline(config: QuantConfig) -> list:
    """The passes a QuantConfig asks for: fold_bn when merge_bn, equalize when asked for, then
    exclude, fake_bn when asked for, insert_fake_quant, then the Winograd rewrite of
    `winograd_mode` when a tile is set."""
    names = (["fold_bn"] if config.merge_bn else []) + (["equalize"] if config.equalize else [])
    names += ["exclude"] + (["fake_bn"] if config.fake_bn else [])
    names += ["insert_fake_quant"]
    if config.winograd != "none":
        names += ["quantize_winograd_weights" if config.winograd_mode == "weight" else "lower_winograd_kernel"]
    return build_pipeline(names)


