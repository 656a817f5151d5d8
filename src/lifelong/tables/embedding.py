"""``nn.Module`` face of an :class:`~lifelong.tables.table.EmbeddingTable`, a drop-in for ``HashedEmbedding``.

The table's rows are not ``nn.Parameter`` s: they grow, shrink and carry per-row optimizer
state, so a dense ``torch.optim`` optimizer cannot own them. Instead each training forward
gathers the rows it reads into a fresh leaf tensor (which autograd fills with their
gradient), remembers (ids, leaf), and :meth:`CollisionlessEmbedding.step` hands the gradients to
the table's sparse optimizer. A training loop therefore looks like::

    model = Ranker(...)              # some layers are CollisionlessEmbedding
    opt = torch.optim.Adam(model.parameters())   # the dense weights only
    for batch in stream:
        loss = loss_fn(model(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparse_step(model, now_ms=batch.time_ms)  # every table: rows read since the last step
        if time_to_expire:
            for emb in collisionless_modules(model):
                emb.table.expire(now_ms)

``model.state_dict()`` carries each table as the module's extra state (tensors and a JSON
string, so ``torch.load(weights_only=True)`` reads it back).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from lifelong.tables.table import EmbeddingTable, TableConfig


class CollisionlessEmbedding(nn.Module):
    """Embeddings of raw int64 ids (any shape) from a collision-less table.

    In training mode a forward shows the ids without a row to the table's admission filter
    (inserting the admitted ones) and records the rows it read for :meth:`step`; in eval mode it
    only looks up, and unknown ids read the default vector. Outputs land on the ids' device.
    Recorded outputs are kept until :meth:`step`: call it after every backward, and run
    forwards that get no backward in eval mode or under ``torch.no_grad()``.

    Args:
        cfg: the table's configuration, or an existing table to wrap.

    Example::

        >>> emb = CollisionlessEmbedding(TableConfig(dim=4, init_scale=0.1))
        >>> out = emb(torch.tensor([[3, 2**40], [3, -1]]))
        >>> out.shape, len(emb.table)
        (torch.Size([2, 2, 4]), 3)
        >>> out.sum().backward(); emb.step(now_ms=1_000)  # one sparse Adagrad step on 3 rows
        3
        >>> _ = emb.eval(); emb(torch.tensor([77])).abs().sum().item(), len(emb.table)
        (0.0, 3)
    """

    def __init__(self, cfg: TableConfig | EmbeddingTable):
        super().__init__()
        self.table = cfg if isinstance(cfg, EmbeddingTable) else EmbeddingTable(cfg)
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []

    @property
    def embedding_dim(self) -> int:
        return self.table.dim

    def forward(self, ids: torch.Tensor, now_ms: int | None = None) -> torch.Tensor:
        """Rows of ``ids`` (shape ``ids.shape + (dim,)``, float32).

        Args:
            ids: int64 ids.
            now_ms: time stamped on rows admitted by this call (default: the table's clock,
                the latest time it has seen).
        """
        flat = ids.detach().reshape(-1).cpu().numpy()
        rows = self.table.admit(flat, now_ms) if self.training else self.table.lookup(flat)
        out = torch.from_numpy(self.table.vectors(rows))
        if self.training and torch.is_grad_enabled():
            out.requires_grad_(True)
            self._pending.append((flat, out))
        return out.to(ids.device).reshape(*ids.shape, self.table.dim)

    def pending_ids(self) -> np.ndarray:
        """The ids (flat, repeats kept) of every forward recorded since the last :meth:`step`:
        the rows the next step may move (an online trainer pushes them)."""
        parts = [ids for ids, _ in self._pending]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def step(self, now_ms: int) -> int:
        """Apply the table's optimizer to the gradients of every forward since the last step.

        Forwards whose output got no gradient are skipped. Returns the number of rows updated.
        """
        pending, self._pending = self._pending, []
        done = [(ids, leaf.grad) for ids, leaf in pending if leaf.grad is not None]
        if not done:
            return 0
        ids = np.concatenate([i for i, _ in done])
        grads = torch.cat([g for _, g in done]).numpy()
        return self.table.apply_gradients(ids, grads, now_ms)

    def extra_repr(self) -> str:
        cfg = self.table.cfg
        return f"dim={cfg.dim}, rows={len(self.table)}, filter={cfg.filter.kind}, optimizer={cfg.optimizer.kind}"

    def get_extra_state(self) -> dict[str, object]:
        meta, arrays = self.table.state_dict()
        return {"meta": json.dumps(meta), "arrays": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}}

    def set_extra_state(self, state: dict[str, object]) -> None:
        meta = json.loads(state["meta"])
        table = EmbeddingTable(TableConfig.from_dict(meta["config"]))
        table.load_state_dict(meta, {k: v.numpy() for k, v in state["arrays"].items()})
        self.table = table
        self._pending = []


def collisionless_modules(model: nn.Module) -> Iterator[CollisionlessEmbedding]:
    """Every :class:`CollisionlessEmbedding` inside ``model``."""
    return (m for m in model.modules() if isinstance(m, CollisionlessEmbedding))


def sparse_step(model: nn.Module, now_ms: int) -> int:
    """:meth:`CollisionlessEmbedding.step` on every table of ``model``; returns the rows updated."""
    return sum(m.step(now_ms) for m in collisionless_modules(model))
