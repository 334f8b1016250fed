"""Read and write MXNet operator attributes, which Symbol JSON stores as strings."""
from __future__ import annotations

import ast
import functools

from .errors import GraphError

_TRUE = {"true", "1"}
_FALSE = {"false", "0"}


def get_bool(attrs: dict, key: str, default: bool, node: str = "?") -> bool:
    text = attrs.get(key)
    if text is None:
        return default
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise GraphError(f"node '{node}': attribute {key}={text!r} is not a boolean")


def get_int(attrs: dict, key: str, default: int, node: str = "?") -> int:
    text = attrs.get(key)
    if text is None:
        return default
    try:
        return int(str(text).strip())
    except ValueError:
        raise GraphError(f"node '{node}': attribute {key}={text!r} is not an integer") from None


def get_float(attrs: dict, key: str, default: float, node: str = "?") -> float:
    text = attrs.get(key)
    if text is None:
        return default
    try:
        return float(str(text).strip())
    except ValueError:
        raise GraphError(f"node '{node}': attribute {key}={text!r} is not a number") from None


def get_tuple(attrs: dict, key: str, default: tuple, node: str = "?") -> tuple:
    """Parse '(3, 3)', '[3,3]' or '3' into a tuple of ints."""
    text = attrs.get(key)
    if text is None:
        return tuple(default)
    value = _int_tuple(str(text).strip())
    if value is None:
        raise GraphError(f"node '{node}': attribute {key}={text!r} is not a tuple of integers")
    return value


@functools.lru_cache(maxsize=4096)
def _int_tuple(text: str) -> tuple | None:
    """The ints of '(3, 3)', '[3,3]' or '3', or None. Cached: a model repeats a few dozen
    kernel, stride and pad strings, and literal_eval compiles each one it parses."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def format_bool(value: bool) -> str:
    return "True" if value else "False"


def format_tuple(value) -> str:
    """As MXNet writes tuples: '(3, 3)', '(16,)', '()'."""
    items = [str(int(v)) for v in value]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
