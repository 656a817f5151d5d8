"""What the HTTP service needs of a ranker, and what a ranker may declare it can do.

Every ranker the service runs (TransAct's :class:`~lifelong.transact.serving.Ranker`,
Monolith's :class:`~lifelong.monolith.serving.OnlineServingRanker`) takes a batch of
:class:`RankRequest` and answers :class:`RankResult` in the same order. A ranker whose
parameters are pushed to it while it serves also implements :class:`SyncedRanker`; the service
asks for that ability, not for a class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from lifelong.core.errors import DataError

SYNC_PATH = "/admin/sync"
"""Where a :class:`SyncedRanker`'s service takes parameter pushes."""


class MalformedDelta(DataError):
    """A sync body that is not a delta of the ranker's format (the service answers 422, not 409)."""

    def __init__(self, message: str):
        super().__init__("sync payload", message)


@dataclass(frozen=True)
class RankRequest:
    """One validated request: candidates already mapped to item-table rows.

    Args:
        user_id: the user; one without stored sequences is served cold-start.
        items: (N,) int64 rows of the item table, one per candidate.
        surface: surface code of the request.
        request_ms: only events strictly before it are visible; None = all stored events.
    """

    user_id: int
    items: np.ndarray
    surface: int
    request_ms: int | None = None


@dataclass
class RankResult:
    """Per-head probabilities ``(N, H)`` and final scores ``(N,)`` in the request's order.

    ``model_version`` names the parameters that scored it when they change while serving
    (online sync); None means the service's fixed version. ``store_version`` names the feature
    store version the whole batch read (None for rankers without a store). ``user_emb_version``
    names the DV365 export version whose user embeddings the batch read (None for a model
    without user tokens).
    """

    probs: np.ndarray
    scores: np.ndarray
    cold_start: bool
    model_version: str | None = None
    store_version: str | None = None
    user_emb_version: int | None = None


class ServedRanker(Protocol):
    """A request path the service can run."""

    path: str
    """``optimized``, ``naive`` or ``online``: the naive path is served one request per batch."""
    heads: tuple[str, ...]

    def item_rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Item-table rows of ``item_ids`` and the ids that are not in the table."""

    def rank(self, requests: list[RankRequest]) -> list[RankResult]:
        """Score a batch of requests; results in the same order.

        Raises:
            StoreUnavailable: the store cannot answer (the service answers 503, never a wrong 200).
        """

    def readiness(self) -> tuple[bool, str]:
        """Whether the ranker can answer now, and why not (``(True, "ok")`` when it can).

        Cheap: ``/readyz`` calls it on every probe."""


@runtime_checkable
class SyncedRanker(Protocol):
    """A ranker whose parameters arrive while it serves (``POST`` :data:`SYNC_PATH`).

    ``version`` is None until the first full snapshot has arrived; the service answers 503
    until then, and every response names the version that scored it.
    """

    @property
    def version(self) -> str | None: ...

    def apply_sync(self, payload: bytes) -> dict[str, object]:
        """Apply a pushed delta; raises :class:`MalformedDelta` (422) or another DataError (409)."""
