"""DV365 user embeddings as exported to a key-value store: the keys, the 4-bit records and
their reader.

The exporter (:mod:`lifelong.dv365.export`) writes each version under its own key prefix and
then switches one pointer key; any ranker reads the served version through
:class:`EmbeddingReader`. Both sides share this module, so the format lives in one place.
"""

from __future__ import annotations

import json
import os
from typing import Any, Self

import numpy as np

from lifelong.core.errors import DataError
from lifelong.core.quantization import dequantize_4bit, from_words_4bit, words_per_row_4bit
from lifelong.store.feature_store import EMBEDDINGS_PREFIX, FeatureStore, open_store, user_key

# All under EMBEDDINGS_PREFIX: ``lifelong store load`` keeps them, ``--drop-embeddings`` deletes them.
POINTER_KEY = EMBEDDINGS_PREFIX + b"current"
REGISTRY_KEY = EMBEDDINGS_PREFIX + b"versions"
_VERSION_PREFIX = EMBEDDINGS_PREFIX + b"v:"


def version_prefix(version: int) -> bytes:
    """The key prefix of every row of ``version``.

    Example::

        >>> version_prefix(7)
        b'dv365:v:000000000007:'
    """
    return _VERSION_PREFIX + b"%012d:" % version


def read_json(store: FeatureStore, key: bytes) -> dict[str, Any] | None:
    """The JSON value at ``key``, None when absent."""
    with store.reader() as r:
        [value] = r.values([key])
        return None if value is None else json.loads(bytes(value))


def decode_records(words: np.ndarray, found: np.ndarray, dim: int, fill: float | None) -> np.ndarray:
    """float32 ``(U, rows, dim)`` of records read by :meth:`EmbeddingReader.get_words`, ``fill``
    for the users not found."""
    out = dequantize_4bit(from_words_4bit(words, dim))
    out[~found] = fill
    return out


class EmbeddingReader:
    """Reads the served version of exported embeddings, dequantized.

    Args:
        store: a store URL (opened read-only, closed with the reader), or an open store (e.g.
            the exporter's own, in the same process: LMDB opens a path in one mode per process).
        default: the value of every element of a user the served version lacks (not active at
            its time); None raises a :class:`~lifelong.core.errors.DataError` instead.

    Example::

        with EmbeddingReader("redis://127.0.0.1:6379/0") as reader:
            emb, version = reader.get(np.array([3, 5]))  # float32 (2, rows, dim)
    """

    def __init__(self, store: str | os.PathLike[str] | FeatureStore, default: float | None = None):
        self._owned = not isinstance(store, FeatureStore)
        self._store = open_store(store) if self._owned else store
        self.default = default

    @property
    def url(self) -> str:
        """The store's URL."""
        return self._store.url

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._store.close()

    def current(self) -> dict[str, Any] | None:
        """The pointer of the served version (``version``, ``rows``, ``dim``, ``as_of_ms``, ...), None if none."""
        return read_json(self._store, POINTER_KEY)

    def get(self, user_ids: np.ndarray | list[int]) -> tuple[np.ndarray, int]:
        """The served embeddings of ``user_ids``, and the version they come from.

        Returns:
            float32 ``(len(user_ids), rows, dim)`` (users in the order given, repeats allowed)
            and the version number: all rows come from that one version.

        Raises:
            DataError: nothing exported yet, a corrupt record, or (``default=None``) a user the
                version lacks.
        """
        words, found, pointer = self.get_words(user_ids)
        if not found.all() and self.default is None:
            missing = np.asarray(user_ids, dtype=np.int64).reshape(-1)[~found]
            raise DataError(self._store.url, f"{missing.size} of {found.size} users have no embedding in version "
                                             f"{pointer['version']} (not active at its time), e.g. user {int(missing[0])}")
        return decode_records(words, found, int(pointer["dim"]), self.default), int(pointer["version"])

    def get_words(self, user_ids: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The served records of ``user_ids``, still quantized, from one version.

        Returns:
            int64 words ``(U, rows, words_per_row_4bit(dim))`` (zeros for a user the version
            lacks; :func:`~lifelong.core.quantization.from_words_4bit` decodes them), a bool
            ``(U,)`` of the users it has, and the version's pointer (``version``, ``rows``, ``dim``, ...).

        Raises:
            DataError: nothing exported yet, or a corrupt record.
        """
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        # LMDB reads pointer and rows in one transaction, one snapshot; Redis in two round trips,
        # so rows missing there may mean the version was collected in between: then read again.
        snapshot = self._store.snapshot_reads
        for _ in range(3):
            with self._store.reader() as r:
                [raw] = r.values([POINTER_KEY])
                if raw is None:
                    raise DataError(self._store.url, "no DV365 embeddings exported here yet (run lifelong dv365 export)")
                pointer = json.loads(bytes(raw))
                values = r.values([version_prefix(pointer["version"]) + user_key(u) for u in ids.tolist()])
                found = np.array([v is not None for v in values], dtype=bool)
                if snapshot or found.all() or self.current() == pointer:
                    return self._words(values, found, pointer), found, pointer
        raise DataError(self._store.url, "the served version changed during each of three reads (exports too frequent)")

    def _words(self, values: list, found: np.ndarray, pointer: dict[str, Any]) -> np.ndarray:
        rows, dim = int(pointer["rows"]), int(pointer["dim"])
        width = words_per_row_4bit(dim)
        present = [v for v in values if v is not None]
        if any(len(v) != 8 * rows * width for v in present):
            raise DataError(self._store.url, f"a record of version {pointer['version']} is not {8 * rows * width} "
                                             "bytes (corrupt, or written by another format)")
        out = np.zeros((found.size, rows, width), dtype=np.int64)
        if present:
            out[found] = np.frombuffer(b"".join(present), dtype="<i8").reshape(len(present), rows, width)
        return out
