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
