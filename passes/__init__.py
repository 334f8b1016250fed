"""Registry of graph passes: name -> pass class, built once at import and only read."""
from __future__ import annotations

from qgraph.errors import ConfigError

from .fold_bn import FoldBN

PASSES = {cls.name: cls for cls in (FoldBN,)}


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
