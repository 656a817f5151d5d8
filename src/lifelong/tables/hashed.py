"""A modulo-hashed embedding: a fixed number of rows shared by colliding ids (the baseline of collision-less tables).

:class:`ModuloEmbedding` is what most recommenders do instead of Monolith's collision-less
tables: ``buckets`` rows, and each id reads row ``hash(id) mod buckets``. With ``buckets`` below
the number of distinct ids, several ids share a row (and its gradient updates); even at one
bucket per id about 37% of the buckets are empty and 63% of the ids share theirs, as with any
hash of arbitrary ids. The raw id is mixed (:func:`~lifelong.tables.cuckoo.mix64`) before the
modulo so that the collisions are those of arbitrary 64-bit ids: the simulator numbers its ids
densely from 0, and ``id mod n`` of ids ``0..n-1`` would collide nowhere.

Everything but the id -> row map is the collision-less module's: the rows live in an
:class:`~lifelong.tables.table.EmbeddingTable` keyed by bucket, with the same admission
filter (it counts bucket occurrences), row initialisation and sparse optimizer, so comparing
the two isolates the collisions. :func:`~lifelong.tables.embedding.sparse_step` trains it like
any :class:`~lifelong.tables.embedding.CollisionlessEmbedding`; its table, export and deltas
are keyed by bucket number, not by raw id.
"""

from __future__ import annotations

import numpy as np
import torch

from lifelong.core.errors import ConfigError
from lifelong.tables.cuckoo import mix64
from lifelong.tables.embedding import CollisionlessEmbedding
from lifelong.tables.table import EmbeddingTable, TableConfig

__all__ = ["ModuloEmbedding", "bucket_of"]


def bucket_of(ids: np.ndarray, buckets: int) -> np.ndarray:
    """``mix64(id) mod buckets`` of int64 ids (same shape, int64 in ``[0, buckets)``).

    Example::

        >>> b = bucket_of(np.arange(1_000), 1_000)
        >>> int(b.min()) >= 0 and int(b.max()) < 1_000, 500 < np.unique(b).size < 700
        (True, True)
    """
    mixed = mix64(np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64))
    return (mixed % np.uint64(buckets)).astype(np.int64)


class ModuloEmbedding(CollisionlessEmbedding):
    """Embeddings of raw int64 ids (any shape) from ``buckets`` shared rows: ``mix64(id) mod buckets``.

    Same interface as :class:`~lifelong.tables.embedding.CollisionlessEmbedding` (training and
    eval modes, :meth:`step`, extra state); the wrapped table never holds more than ``buckets``
    rows.

    Args:
        cfg: the table's configuration (or an existing table keyed by bucket).
        buckets: number of rows.

    Raises:
        ConfigError: ``buckets < 1``.

    Example::

        >>> emb = ModuloEmbedding(TableConfig(dim=4, init_scale=0.1), buckets=2)
        >>> out = emb(torch.tensor([[1, 2, 3, 4, 5]]))  # five ids, two rows
        >>> out.shape, len(emb.table)
        (torch.Size([1, 5, 4]), 2)
        >>> len({tuple(v) for v in out[0].tolist()})
        2
    """

    def __init__(self, cfg: TableConfig | EmbeddingTable, buckets: int):
        if buckets < 1:
            raise ConfigError(f"buckets must be >= 1, got {buckets}")
        super().__init__(cfg)
        self.buckets = int(buckets)

    def forward(self, ids: torch.Tensor, now_ms: int | None = None) -> torch.Tensor:
        """Rows of ``ids`` (shape ``ids.shape + (dim,)``); ids of one bucket read one row."""
        buckets = torch.from_numpy(bucket_of(ids.detach().cpu().numpy(), self.buckets)).to(ids.device)
        return super().forward(buckets, now_ms)

    def extra_repr(self) -> str:
        return f"buckets={self.buckets}, {super().extra_repr()}"

    def get_extra_state(self) -> dict[str, object]:
        return {**super().get_extra_state(), "buckets": self.buckets}

    def set_extra_state(self, state: dict[str, object]) -> None:
        super().set_extra_state(state)
        self.buckets = int(state["buckets"])
