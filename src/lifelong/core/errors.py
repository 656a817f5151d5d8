"""Errors that mean "your input is wrong", as opposed to a bug in lifelong.

The CLI prints these as one clear line and exits nonzero, without a traceback.
"""

from __future__ import annotations


class LifelongError(Exception):
    """Base class for user-facing errors (bad input, bad config, missing files)."""


class DataError(LifelongError):
    """A data file violates the schema or an invariant.

    Args:
        path: the file that is wrong.
        message: what is wrong.
        column: the offending column, when one is to blame.
        row: the first bad row (0-based), when the problem is row-level.
    """

    def __init__(self, path: object, message: str, column: str | None = None, row: int | None = None):
        self.path = str(path)
        self.column = column
        self.row = row
        where = self.path
        if column is not None:
            where += f", column {column!r}"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {message}")


class ConfigError(LifelongError):
    """A configuration key or value is unknown or invalid."""


class StoreUnavailable(LifelongError):
    """A store cannot answer right now: unreachable, empty (nothing loaded), or holding data of
    another layout. The ranking service answers 503 with ``Retry-After`` and this reason, never a
    wrong 200; it recovers by itself when the store comes back.

    Args:
        url: the store.
        reason: what is wrong, e.g. "connection refused", "no version loaded".
    """

    def __init__(self, url: object, reason: str):
        self.url = str(url)
        self.reason = reason
        super().__init__(f"{self.url}: {reason}")


class WriterLocked(LifelongError):
    """Another writer holds the store's writer lock: a second ``store load`` fails at once.

    ``held_by`` is what the holder recorded (``role``, ``pid``, ``host``, ``since``), when known.
    """

    def __init__(self, message: str, held_by: dict | None = None):
        self.held_by = held_by
        super().__init__(message)
