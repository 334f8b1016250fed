"""Registry of graph passes: name -> pass class, built once at import and only read."""
from __future__ import annotations

from qgraph.errors import ConfigError

from .exclude import Exclude
from .fake_bn import FakeBN
from .fold_bn import FoldBN
from .insert_fake_quant import InsertFakeQuant
from .insert_observers import InsertObservers
from .winograd_quant import WinogradQuant

PASSES = {cls.name: cls for cls in (FoldBN, Exclude, FakeBN, InsertFakeQuant, InsertObservers, WinogradQuant)}


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


def default_pipeline(config) -> list:
    """The passes a QuantConfig asks for: fold_bn when merge_bn, then exclude, fake_bn when asked
    for, insert_fake_quant, then winograd_quant when a Winograd tile is set."""
    names = (["fold_bn"] if config.merge_bn else []) + ["exclude"] + (["fake_bn"] if config.fake_bn else [])
    names += ["insert_fake_quant"]
    names += ["winograd_quant"] if config.winograd != "none" else []
    return build_pipeline(names)
