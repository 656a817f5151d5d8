"""Incremental parameter sync: the trainer's deltas on the wire to a running ``lifelong serve``.

The delta, its wire format and the replicas that apply it are shared with every ranker that
takes pushes (:mod:`lifelong.serving.sync`); this module is the trainer's side. A delta travels
as one ``application/octet-stream`` body naming the model's kind and configuration
(:meth:`~lifelong.monolith.online.OnlineModel.wire_model`): Monolith's online ranker's is its
:class:`~lifelong.monolith.ranker.OnlineRankerConfig` (serving builds the dense layers from it),
TransAct's names its run.

:class:`Syncer` pushes: each :meth:`Syncer.sync` takes the next delta of the trainer (whatever
model it trains) and posts it to ``<serve>/admin/sync``. The service answers 200 when it applied
it, 409 when the delta does not follow the version it holds (it restarted, or an earlier push
was lost): the next sync is then a full snapshot, as it is after any failed push, because a
delta once taken cannot be taken again.

Example::

    syncer = Syncer(trainer, "http://127.0.0.1:8000")
    trainer.run(max_seconds=10)
    reply = syncer.sync()          # SyncReply(version=7, applied=True, rows=1234, full=False, ...)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import numpy as np  # noqa: F401 - the doctests build deltas

from lifelong.monolith.ranker import SLOTS, OnlineRanker, OnlineRankerConfig
from lifelong.serving import sync as wire
from lifelong.serving.ranking import SYNC_PATH, MalformedDelta
from lifelong.serving.sync import Delta, TableDelta  # noqa: F401 - TableDelta: the doctests

if TYPE_CHECKING:
    from lifelong.monolith.online import OnlineTrainer

__all__ = ["SYNC_PATH", "MalformedDelta", "SyncReply", "Syncer", "decode_delta", "encode_delta"]


def encode_delta(delta: Delta, model: OnlineRankerConfig) -> bytes:
    """The wire form of ``delta`` of an online ranker shaped by ``model``.

    Example::

        >>> d = Delta(3, 2, 1_000, 17, {"user_id": TableDelta(np.array([5]), np.ones((1, 16), np.float16),
        ...           np.zeros(0, np.int64), np.zeros(16, np.float32))}, None)
        >>> back, cfg = decode_delta(encode_delta(d, OnlineRankerConfig()))
        >>> back.version, back.base_version, back.tables["user_id"].ids.tolist(), back.dense, cfg == OnlineRankerConfig()
        (3, 2, [5], None, True)
    """
    return wire.encode_delta(delta, OnlineRanker.KIND, model.to_dict())


def decode_delta(payload: bytes) -> tuple[Delta, OnlineRankerConfig]:
    """Inverse of :func:`encode_delta`, checked against the online ranker's slots and widths.

    Raises:
        MalformedDelta: the payload is not a delta of this format (truncated, foreign, inconsistent),
            or of another model.
    """
    delta, kind, model_dict = wire.decode_delta(payload)
    if kind != OnlineRanker.KIND:
        raise MalformedDelta(f"a delta of a {kind!r} model, this service serves {OnlineRanker.KIND!r}")
    try:
        model = OnlineRankerConfig.from_dict(model_dict)
    except Exception as exc:  # noqa: BLE001 - a bad config: the payload is wrong
        raise MalformedDelta(f"inconsistent delta ({type(exc).__name__}: {exc})") from None
    for slot, t in delta.tables.items():
        if slot not in SLOTS:
            raise MalformedDelta(f"unknown id slot {slot!r}")
        dim = model.tables[slot].dim
        if t.values.shape != (len(t.ids), dim) or t.default.shape != (dim,):
            raise MalformedDelta(f"table {slot}: {t.ids.shape} ids, values {t.values.shape} and default "
                                 f"{t.default.shape} do not fit rows of width {dim}")
    if delta.full and (set(delta.tables) != set(SLOTS) or delta.dense is None):
        raise MalformedDelta(f"full snapshot {delta.version} must carry every table and the dense weights")
    return delta, model


@dataclass(frozen=True)
class SyncReply:
    """The outcome of one push.

    Args:
        version: the delta's version.
        applied: the service applied it.
        full: it was a full snapshot.
        rows: table rows it carried.
        bytes: payload size.
        seconds: wall time of the push (encoding, transfer, apply).
        error: why it was not applied (None when it was).
    """

    version: int
    applied: bool
    full: bool
    rows: int
    bytes: int
    seconds: float
    error: str | None = None


class Syncer:
    """Pushes a trainer's deltas to a ranking service; see the module docstring.

    Args:
        trainer: the online trainer whose :meth:`~lifelong.monolith.online.OnlineTrainer.delta` to push
            (of any :class:`~lifelong.monolith.online.OnlineModel`).
        serve_url: the service's base URL, e.g. ``http://127.0.0.1:8000``.
        timeout_s: per-push HTTP timeout.
    """

    def __init__(self, trainer: OnlineTrainer, serve_url: str, timeout_s: float = 30.0):
        self.trainer = trainer
        self.url = serve_url.rstrip("/") + SYNC_PATH
        self._http = httpx.Client(timeout=timeout_s)
        self._need_full = True

    def sync(self, dense: bool = False) -> SyncReply:
        """Take the next delta (full after a failure; with the dense weights when ``dense``) and
        push it; never raises for a failed push."""
        t0 = time.perf_counter()
        delta = self.trainer.delta(full=self._need_full, dense=dense)
        payload = wire.encode_delta(delta, *self._wire_model())
        error = None
        try:
            r = self._http.post(self.url, content=payload, headers={"content-type": "application/octet-stream"})
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._need_full = error is not None
        return SyncReply(version=delta.version, applied=error is None, full=delta.full, rows=delta.n_rows,
                         bytes=len(payload), seconds=time.perf_counter() - t0, error=error)

    def _wire_model(self) -> tuple[str, dict]:
        """The trained model's kind and configuration; a trainer without a model object (a stand-in
        with ``delta`` and ``cfg``) trains Monolith's ranker of ``cfg.model``."""
        model = getattr(self.trainer, "model", None)
        if model is not None:
            return model.wire_model()
        return OnlineRanker.KIND, self.trainer.cfg.model.to_dict()

    def close(self) -> None:
        self._http.close()
