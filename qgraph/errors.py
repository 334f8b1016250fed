"""Exception types: every failure qgraph reports on purpose is a QGraphError."""


class QGraphError(Exception):
    """Base of every error qgraph raises on purpose; the message says what to do."""


class GraphError(QGraphError):
    """A Symbol JSON, params file or graph edit is malformed or inconsistent."""


class PassError(QGraphError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class ConfigError(QGraphError):
    """An option, flag or configuration field has an invalid value."""
