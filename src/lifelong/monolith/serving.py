"""Serving the Monolith :class:`~lifelong.monolith.ranker.OnlineRanker` from the parameters the trainer pushes.

:class:`OnlineServingRanker` is the request path of ``lifelong serve --online``. It holds no
trainer tables: its parameters are a :class:`~lifelong.serving.sync.ParameterReplica` that
deltas (``POST /admin/sync``, :mod:`lifelong.monolith.sync`) bring up to date, and dense layers
built from the configuration the deltas carry.

**Applied between batches, one version per response.** A push is decoded and applied to a
private replica off the request path; the result is frozen into an immutable snapshot (the
replica's arrays are replaced, never written in place, so a shallow copy is a consistent
picture) and published by one reference assignment. A batch reads that reference once, so every
request in it is scored by exactly one version and says which; no request waits for or fails
because of a sync.

Example::

    ranker = OnlineServingRanker(ItemCatalog.from_dataset("worlds/small"))
    ranker.apply_sync(payload)                 # the trainer's first, full, snapshot
    [result] = ranker.rank([RankRequest(user_id=7, items=ranker.item_rows(ids)[0], surface=0)])
    result.model_version                       # 'online-v1'
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lifelong.core.errors import DataError
from lifelong.core.metrics import DEFAULT_HEAD_WEIGHTS
from lifelong.data.schema import HEADS
from lifelong.monolith.ranker import SLOTS, ItemCatalog, OnlineRankerConfig, build_dense, dense_logits
from lifelong.monolith.sync import decode_delta
from lifelong.serving.ranking import RankRequest, RankResult
from lifelong.serving.sync import Delta, ParameterReplica

__all__ = ["NoModelYet", "OnlineServingRanker", "online_version"]


def online_version(version: int) -> str:
    """The model version a response of the online service reports."""
    return f"online-v{version}"


class NoModelYet(RuntimeError):
    """No full snapshot has arrived yet: there is nothing to score with."""


@dataclass(frozen=True)
class _Snapshot:
    version: int
    replica: ParameterReplica
    dense: nn.ModuleDict


class OnlineServingRanker:
    """Scores requests with the latest synced parameters; see the module docstring.

    Args:
        catalog: item metadata (author, topic, content embedding); candidates outside it are
            refused by :meth:`item_rows`, as the batch service refuses unknown items.
        head_weights: ``w_h`` of the final score by head name.
    """

    path = "online"

    def __init__(self, catalog: ItemCatalog, head_weights: dict[str, float] = DEFAULT_HEAD_WEIGHTS):
        self.catalog = catalog
        self.heads: tuple[str, ...] = HEADS
        self.weights = np.array([head_weights.get(h, 0.0) for h in self.heads], dtype=np.float32)
        self._replica = ParameterReplica()
        self._model: OnlineRankerConfig | None = None
        self._dense: nn.ModuleDict | None = None
        self._apply_lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self.syncs = 0

    @property
    def version(self) -> str | None:
        """The version requests are scored with now (None before the first full snapshot)."""
        snap = self._snapshot
        return None if snap is None else online_version(snap.version)

    def readiness(self) -> tuple[bool, str]:
        """Ready once the first full snapshot has arrived (``/readyz``)."""
        if self._snapshot is None:
            return False, "no model yet: waiting for the trainer's first sync"
        return True, "ok"

    # -- sync ------------------------------------------------------------------------------------

    def apply_sync(self, payload: bytes) -> dict[str, object]:
        """Apply one pushed delta and publish the new version; returns what was applied.

        Raises:
            DataError: the payload is malformed, or does not follow the held version (the
                trainer then sends a full snapshot).
        """
        delta, model = decode_delta(payload)
        t0 = time.perf_counter()
        with self._apply_lock:
            self._check_model(delta, model)
            self._replica.apply(delta)
            if delta.dense is not None:
                dense = build_dense(model).eval()
                dense.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in delta.dense.items()})
                self._dense, self._model = dense, model
            replica = copy.copy(self._replica)
            for name in ("ids", "values", "defaults"):
                setattr(replica, name, dict(getattr(self._replica, name)))
            self._snapshot = _Snapshot(delta.version, replica, self._dense)
            self.syncs += 1
        return {"version": online_version(delta.version), "full": delta.full, "rows": delta.n_rows,
                "dense": delta.dense is not None, "apply_ms": round((time.perf_counter() - t0) * 1000, 3)}

    def _check_model(self, delta: Delta, model: OnlineRankerConfig) -> None:
        if not delta.full and self._model is not None and model != self._model:
            raise DataError(f"delta {delta.version}", "its ranker configuration differs from the served one "
                                                      "(send a full snapshot)")

    # -- requests --------------------------------------------------------------------------------

    def item_rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Catalog rows of ``item_ids`` and the ids the catalog does not know."""
        ids = np.asarray(item_ids, dtype=np.int64)
        pos, known = self.catalog.index_of(ids)
        return pos, ids[~known]

    @torch.inference_mode()
    def rank(self, requests: list[RankRequest]) -> list[RankResult]:
        """Score a batch of requests with one version; results in the same order.

        Raises:
            NoModelYet: no full snapshot has been applied.
        """
        snap = self._snapshot  # read once: the whole batch sees one version
        if snap is None:
            raise NoModelYet("no parameters synced yet")
        if not requests:
            return []
        counts = [len(r.items) for r in requests]
        rows = np.concatenate([r.items for r in requests])
        request_users = np.array([r.user_id for r in requests], dtype=np.int64)
        users = np.repeat(request_users, counts)
        ids = {"user_id": users, "item_id": self.catalog.item_ids[rows], "author_id": self.catalog.author_ids[rows],
               "topic_id": self.catalog.topic_ids[rows]}
        id_rows = [torch.from_numpy(snap.replica.vectors(slot, ids[slot])) for slot in SLOTS]
        surface = torch.from_numpy(np.repeat(np.array([r.surface for r in requests], dtype=np.int64), counts))
        logits = dense_logits(snap.dense, id_rows, surface, torch.from_numpy(self.catalog.embeddings[rows]))
        probs = torch.sigmoid(logits).numpy()
        scores = probs @ self.weights
        cold = ~snap.replica.has_rows("user_id", request_users)
        version = online_version(snap.version)
        bounds = np.cumsum([0, *counts])
        return [RankResult(probs[a:b], scores[a:b], bool(c), version) for a, b, c in zip(bounds[:-1], bounds[1:], cold)]
