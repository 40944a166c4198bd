"""Errors that the CLI turns into a clear message and exit code 2 (bad input), never a traceback."""


class BenchError(Exception):
    """Base class for user-facing errors. ``exit_code`` is what ``python -m bench`` exits with."""

    exit_code = 2


class ConfigError(BenchError):
    """An invalid configuration value (unknown name, ratio out of range, bad option)."""


class IncompatibleMethodError(BenchError):
    """The method cannot run on this model (e.g. it needs a CLS token the vision tower lacks)."""


class MissingWeightsError(BenchError):
    """Model weights are not available locally and cannot be fetched."""


class CorruptFileError(BenchError):
    """A file the harness needs (weights, record, data) exists but cannot be read."""
