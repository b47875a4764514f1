"""The one error hierarchy of resumax.

Every error a user can cause is raised early, is a `ResumaxError`, and names the path, key or value
at fault together with what was expected.
"""

from __future__ import annotations


class ResumaxError(Exception):
    """Base class of every error resumax raises on purpose."""


class ConfigError(ResumaxError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataSourceError(ResumaxError):
    """A data file is missing, unreadable, empty or corrupt."""


class DataFileNotFoundError(DataSourceError, FileNotFoundError):
    """A data file or dataset directory does not exist (also a built-in `FileNotFoundError`)."""


class RecordEncodeError(ResumaxError, TypeError):
    """An example holds a value the record codec cannot store without pickle."""


class RecordDecodeError(ResumaxError):
    """Stored bytes are not a valid record of the expected format (resumax, tf.train.Example)."""


class StageError(ResumaxError):
    """A pipeline stage raised while processing a record; names the stage and the record."""


class WorkerError(ResumaxError):
    """A pipeline worker process died or could not send its result."""


class StateMismatchError(ResumaxError):
    """A saved state belongs to another dataset, seed, shuffle setting or state version."""


class CheckpointError(ResumaxError):
    """A checkpoint file is missing, malformed or cannot be written."""
