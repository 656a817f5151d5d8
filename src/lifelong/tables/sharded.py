"""A collision-less embedding table sharded over the ranks of a data-parallel run.

Each rank holds the rows of the ids it owns, ``rank = splitmix64(id) % world``
(:func:`owner`), in an ordinary :class:`~lifelong.tables.table.EmbeddingTable` (its *shard*).
A lookup sends every id of the rank's batch to its owner (two ``all_to_all_single`` over the
process group: the counts, then the ids), the owner admits or looks them up in its shard and
the vectors come back the same way. :meth:`ShardedCollisionlessEmbedding.step` sends each
gradient to the owner of its id, which applies its sparse optimizer.

So every decision about a row is taken by one table, the owner's, on the occurrences of that
id in the global batch, in the order a single table fed the ranks' batches one after another
would see them: row initialisation (a hash of id and seed), admission by the ``"none"`` and
``"counting"`` filters, the optimizer step on the summed gradient and expiry are the single
table's. Two caveats: a counting filter is a count-min sketch, and a shard's sketch counts only
the ids it owns, so where the single table's sketch would have over-counted an id through a
collision the shard may admit it later (never earlier); and a ``"probabilistic"`` filter draws
per shard, so its decisions have the same law but other draws. A learned default vector is
refused with more than one rank: every shard would train its own from its own unadmitted ids.

Every rank must make the same calls in the same order (forward, :meth:`step`, train/eval mode),
as with any collective: a rank with no ids still takes part.

Checkpoints and deltas are per shard: :meth:`ShardedCollisionlessEmbedding.save` writes this
rank's table to ``DIR/shard-<rank>`` (and rank 0 ``DIR/shards.json``, the world size), and
:meth:`ShardedCollisionlessEmbedding.export` is the shard's rows (``since_ms`` for a delta).
Serving reads one table holding every shard's rows: :func:`assemble_shards` builds it from a
checkpoint, :func:`merge_exports` joins the shards' exports (or deltas).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lifelong.core.distributed import Ranks
from lifelong.core.errors import ConfigError, DataError
from lifelong.data.io import write_json
from lifelong.tables.cuckoo import GOLDEN, as_id_array
from lifelong.tables.table import EmbeddingTable, ExportedRows, TableConfig

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def owner(ids: object, world: int) -> np.ndarray:
    """The rank owning each id (flat int64): the splitmix64 output with state ``id``, modulo ``world``.

    A full 64-bit mix, so that ids sharing low bits (sequential ids, ids of one range) spread
    evenly over the ranks.

    Example::

        >>> owner([1, 2, 3, 2**40], world=1).tolist()
        [0, 0, 0, 0]
        >>> bool(np.bincount(owner(np.arange(10_000), world=4), minlength=4).min() > 2_400)
        True
    """
    x = as_id_array(ids).view(np.uint64) + GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(world)).astype(np.int64)


def _exchange(send: np.ndarray, counts: np.ndarray, ranks: Ranks,
              recv: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All-to-all of ``send`` (rows grouped by destination, ``counts[r]`` rows for rank r).

    Returns the rows received, grouped by source rank, and how many came from each. ``recv``,
    when the caller already knows those counts (a reply, or a second payload routed the same
    way), saves the collective that exchanges them.
    """
    if not ranks.parallel:
        return send, counts
    send_counts = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))
    if recv is None:
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
    else:
        recv_counts = torch.from_numpy(np.ascontiguousarray(recv, dtype=np.int64))
    payload = torch.from_numpy(np.ascontiguousarray(send))
    out = payload.new_empty((int(recv_counts.sum()), *payload.shape[1:]))
    dist.all_to_all_single(out, payload, output_split_sizes=recv_counts.tolist(),
                           input_split_sizes=send_counts.tolist())
    return out.numpy(), recv_counts.numpy()


class ShardedCollisionlessEmbedding(nn.Module):
    """Embeddings of raw int64 ids from a collision-less table whose rows are split over the ranks.

    The face of :class:`~lifelong.tables.embedding.CollisionlessEmbedding` (forward in training
    mode admits, in eval mode only looks up; :meth:`step` after every backward), with the rows
    of the ids a rank does not own kept by their owner. With one rank it is that module.

    Args:
        cfg: the table's configuration (the same on every rank).
        ranks: this process's place in the run; the default process group must be up when
            ``ranks.parallel``.

    Raises:
        ConfigError: a learned default vector with more than one rank.

    Example::

        >>> emb = ShardedCollisionlessEmbedding(TableConfig(dim=4, init_scale=0.1), Ranks())
        >>> out = emb(torch.tensor([[3, 2**40], [3, -1]]))
        >>> out.sum().backward(); emb.step(now_ms=1_000)
        3
    """

    def __init__(self, cfg: TableConfig, ranks: Ranks):
        super().__init__()
        if cfg.default == "learned" and ranks.parallel:
            raise ConfigError("a sharded table cannot learn its default vector: each shard would train its own; "
                              "use default='zeros'")
        self.ranks = ranks
        self.table = EmbeddingTable(cfg)
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []

    @property
    def embedding_dim(self) -> int:
        return self.table.dim

    def _route(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(order grouping ``flat`` by owner, stable; rows for each owner)."""
        dest = owner(flat, self.ranks.size)
        return np.argsort(dest, kind="stable"), np.bincount(dest, minlength=self.ranks.size)

    def forward(self, ids: torch.Tensor, now_ms: int | None = None) -> torch.Tensor:
        """Rows of ``ids`` (shape ``ids.shape + (dim,)``, float32); collective.

        Args:
            ids: int64 ids of this rank's batch.
            now_ms: time stamped on rows admitted by this call (default: the owner's clock).
        """
        flat = ids.detach().reshape(-1).cpu().numpy().astype(np.int64, copy=False)
        order, counts = self._route(flat)
        recv_ids, recv_counts = _exchange(flat[order], counts, self.ranks)
        rows = self.table.admit(recv_ids, now_ms) if self.training else self.table.lookup(recv_ids)
        back, _ = _exchange(self.table.vectors(rows), recv_counts, self.ranks, recv=counts)
        vecs = np.empty((flat.size, self.table.dim), np.float32)
        vecs[order] = back
        out = torch.from_numpy(vecs)
        if self.training and torch.is_grad_enabled():
            out.requires_grad_(True)
            self._pending.append((flat, out))
        return out.to(ids.device).reshape(*ids.shape, self.table.dim)

    def step(self, now_ms: int) -> int:
        """Send the gradients of every forward since the last step to their owners, which apply
        their optimizer; collective. Returns the rows this rank's shard updated."""
        pending, self._pending = self._pending, []
        done = [(ids, leaf.grad) for ids, leaf in pending if leaf.grad is not None]
        ids = np.concatenate([i for i, _ in done]) if done else np.zeros(0, np.int64)
        grads = (torch.cat([g for _, g in done]).numpy() if done
                 else np.zeros((0, self.table.dim), np.float32))
        order, counts = self._route(ids)
        recv_ids, recv_counts = _exchange(ids[order], counts, self.ranks)
        recv_grads, _ = _exchange(grads[order], counts, self.ranks, recv=recv_counts)
        return self.table.apply_gradients(recv_ids, recv_grads, now_ms)

    def expire(self, now_ms: int) -> np.ndarray:
        """Expire this rank's shard (:meth:`EmbeddingTable.expire`); returns the ids it dropped."""
        return self.table.expire(now_ms)

    def export(self, fmt: str = "fp16", since_ms: int | None = None) -> ExportedRows:
        """This shard's rows for serving (:meth:`EmbeddingTable.export`); ``since_ms`` gives a delta."""
        return self.table.export(fmt, since_ms)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write this rank's shard to ``directory/shard-<rank>`` (rank 0 also writes ``shards.json``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.table.save(directory / f"shard-{self.ranks.rank}")
        if self.ranks.main:
            write_json({"world": self.ranks.size}, directory / "shards.json")

    def load(self, directory: str | os.PathLike[str]) -> None:
        """Resume this rank's shard from a checkpoint of :meth:`save` taken with the same world size.

        Raises:
            DataError: no checkpoint, or one of another world size.
        """
        world = _world(Path(directory))
        if world != self.ranks.size:
            raise DataError(directory, f"saved by {world} ranks, this run has {self.ranks.size}; "
                            "the ids' owners differ, so assemble_shards() it and re-shard")
        self.table = EmbeddingTable.load(Path(directory) / f"shard-{self.ranks.rank}")
        self._pending = []

    def extra_repr(self) -> str:
        return f"dim={self.table.dim}, shard={self.ranks.rank}/{self.ranks.size}, rows={len(self.table)}"


def _world(directory: Path) -> int:
    try:
        return int(json.loads((directory / "shards.json").read_text())["world"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(directory, f"not a sharded table checkpoint: {exc}") from exc


def merge_exports(parts: list[ExportedRows]) -> ExportedRows:
    """The exports (or deltas) of every shard as one, sorted by id; the shards own disjoint ids."""
    ids = np.concatenate([p.ids for p in parts])
    order = np.argsort(ids, kind="stable")
    scales = [p.scale for p in parts]
    scale = None if any(s is None for s in scales) else np.concatenate(scales)[order]
    return ExportedRows(ids=ids[order], values=np.concatenate([p.values for p in parts])[order], scale=scale,
                        updated_ms=np.concatenate([p.updated_ms for p in parts])[order], default=parts[0].default)


def assemble_shards(directory: str | os.PathLike[str]) -> EmbeddingTable:
    """One table with the rows (values and update times) of every shard of a :meth:`save` checkpoint.

    What a serving replica reads: the rows, their times and the default vector. The shards'
    optimizer state and admission filters are not carried over (a replica does not train).

    Raises:
        DataError: the checkpoint is missing or incomplete.
    """
    directory = Path(directory)
    shards = [EmbeddingTable.load(directory / f"shard-{r}") for r in range(_world(directory))]
    rows = merge_exports([s.export("fp32") for s in shards])
    table = EmbeddingTable(shards[0].cfg)
    table.reserve(rows.ids.size)
    table.assign(rows.ids, rows.values, now_ms=max(s.clock_ms for s in shards))
    table.updated_ms[table.lookup(rows.ids)] = rows.updated_ms
    table.default[:] = rows.default
    return table
