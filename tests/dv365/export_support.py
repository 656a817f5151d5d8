"""For the export and schedule tests: a deterministic stand-in for the DV365 user tower, and checks of a store."""

from __future__ import annotations

import json

import numpy as np

from lifelong.core.quantization import quantize_4bit
from lifelong.data.protocol import DAY_MS
from lifelong.dv365.export import REGISTRY_KEY, EmbeddingReader, version_prefix
from lifelong.store.feature_store import open_store

ROWS, DIM = 3, 40  # 40 values a row: 3 code words (the last one part-filled) + 1 scale/offset word


class FakeTower:
    """Deterministic embeddings of (user, as-of time); counts the users it embedded."""

    def __init__(self, rows: int = ROWS, dim: int = DIM):
        self.rows, self.dim, self.calls = rows, dim, []

    def embed_users(self, world_dir, user_ids, as_of_ms, gap_ms=None):
        self.calls.append((np.asarray(user_ids).copy(), as_of_ms, gap_ms))
        return fake_embeddings(np.asarray(user_ids), as_of_ms, self.rows, self.dim)


def fake_embeddings(user_ids: np.ndarray, as_of_ms: int, rows: int = ROWS, dim: int = DIM) -> np.ndarray:
    u = user_ids.astype(np.float64)[:, None, None]
    r, c = np.arange(rows)[None, :, None], np.arange(dim)[None, None, :]
    return (np.sin(0.7 * u + 1.3 * r + 0.11 * c * (1 + u % 3) + as_of_ms / DAY_MS) * (1 + r)).astype(np.float32)


def bound_4bit(x: np.ndarray) -> np.ndarray:
    """The codec's documented bound per row: half a step plus two float32 ulps of the row's magnitude."""
    q = quantize_4bit(x)
    return q.scale.astype(np.float64)[..., None] / 2 + 2 * np.spacing(np.abs(x).max(axis=-1, keepdims=True))


def assert_served(url, user_ids, as_of_ms, version, rows=ROWS, dim=DIM):
    with EmbeddingReader(url) as reader:
        emb, got = reader.get(user_ids)
        assert reader.current()["version"] == version
    want = fake_embeddings(np.asarray(user_ids), as_of_ms, rows, dim)
    assert got == version and emb.dtype == np.float32 and emb.shape == want.shape
    assert np.all(np.abs(emb.astype(np.float64) - want) <= bound_4bit(want))


def listed_versions(url) -> list[int]:
    with open_store(url) as store, store.reader() as r:
        return json.loads(bytes(r.values([REGISTRY_KEY])[0]))["versions"]


def rows_left(url, version) -> int:
    """Rows of ``version`` still stored (deletes them: call it on versions that should be gone)."""
    with open_store(url, writable=True) as store:
        return store.delete_prefix(version_prefix(version))
