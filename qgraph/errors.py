"""Exception types: every failure qgraph reports on purpose is a QGraphError."""
from __future__ import annotations

import re


class QGraphError(Exception):
    """Base of every error qgraph raises on purpose; the message says what to do."""


class GraphError(QGraphError):
    """A Symbol JSON, params file or graph edit is malformed or inconsistent."""


class PassError(QGraphError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class ConfigError(QGraphError):
    """An option, flag or configuration field has an invalid value."""


class DataError(QGraphError):
    """Input data (images, calibration batches, RecordIO files) is missing, empty or corrupt."""


def mxnet_error_line(err: Exception) -> str:
    """The informative line of an MXNetError (MXNet appends stack traces)."""
    text = str(err)
    for line in text.splitlines():
        line = line.strip()
        if "Check failed" in line or "Error in operator" in line or "InferShape" in line:
            return re.sub(r"^\[[\d:]+\] \S+: ", "", line)
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Stack trace", "File ", "[bt]")):
            return re.sub(r"^(MXNetError: )?\[[\d:]+\] \S+: ", "", line)
    return text.strip()[:300]
