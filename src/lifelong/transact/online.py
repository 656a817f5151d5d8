"""TransAct V2 trained online from Monolith's stream, and served with the parameters it pushes.

Two halves of one loop, both over the same feature store:

- :class:`TransActOnline` is Monolith's :class:`~lifelong.monolith.online.OnlineModel` for a
  TransAct run (``lifelong monolith online --model-run RUN --store URL``; the command line
  composes the two rooms, neither imports the other). Each joined example (an impression and its
  labels) becomes a row whose ``S_all`` is read from the store **at the impression's time**:
  the user's :meth:`~lifelong.store.sequences.UserSequences.timeline` before it, its blocks
  chosen by :func:`~lifelong.transact.sequence_layout.assemble_s_all` with the serving path's own
  NN search (:meth:`~lifelong.transact.serving.Ranker.gather_batch` runs the optimized path's
  assembly), so training sees exactly the features serving computes. The dense weights train with the trainer's optimizer; the
  run's collision-less id tables (``row.tables``) with their own sparse optimizers; the Next
  Action Loss is not used online. A run trained with DV365 user tokens reads each example's
  user embedding from the export store its service reads, so both see the same export.
- :class:`SyncedTransActRanker` is the optimized path (:class:`~lifelong.transact.serving.Ranker`)
  taking pushes (``lifelong serve --run RUN --store URL --accept-sync``): a delta is decoded off
  the request path, then applied between two batches **in place** to the served model's own
  tables and dense tensors (:class:`~lifelong.serving.sync.InPlaceReplica`), so nothing is
  rebuilt and no snapshot goes stale. Every result names the version that scored it
  (``<run version>+v<delta version>``; the run's version before the first push).

Example::

    online = TransActOnline.from_run("runs/v2", open_store("lmdb:///stores/small"))
    trainer = OnlineTrainer(cfg, stream, None, "ckpt", model=online)   # lifelong.monolith.online
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.schema import HEADS
from lifelong.serving.ranking import MalformedDelta, RankRequest, RankResult
from lifelong.serving.sync import InPlaceReplica, decode_delta
from lifelong.store.embeddings import EmbeddingReader
from lifelong.store.feature_store import FeatureStore
from lifelong.tables.embedding import CollisionlessEmbedding
from lifelong.transact.batch import RankBatch
from lifelong.transact.serving import Ranker, model_version, user_emb_reader
from lifelong.transact.trainer import load_model

__all__ = ["KIND", "SyncedTransActRanker", "TransActOnline", "dense_tensors", "id_tables",
           "run_config"]

KIND = "transact"
"""The model kind a TransAct delta names on the wire."""


def run_config(run: str | os.PathLike[str]) -> dict[str, Any]:
    """What a TransAct delta names as its model: the run's model name, training config, layout and
    heads (``model.pt`` without the weights), as plain data. Trainer and service compare it."""
    saved = torch.load(Path(run) / "model.pt", map_location="cpu", weights_only=False)
    keep = {k: saved[k] for k in ("name", "train", "model_config", "layout", "n_heads", "user_tokens") if k in saved}
    return json.loads(json.dumps(keep, default=list))


def id_tables(model: nn.Module) -> dict[str, CollisionlessEmbedding]:
    """Slot -> collision-less table of a ranker's row features (``row.tables``); ``{}`` when all are hashed."""
    row = getattr(model, "row", None)
    return dict(getattr(row, "tables", {}) or {})


def dense_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers by ``state_dict`` name, detached but sharing
    storage (so ``copy_`` into them updates the model); never the tables' rows, which are not
    tensors of the module (and whose extra state a plain ``state_dict()`` would serialise)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        head = f"{prefix}." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                out[head + name] = p.detach()
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                out[head + name] = b.detach()
    return out


@dataclass
class TransActOnlineBatch:
    """A featurized batch of joined examples: the gathered rows, their labels, and how many were known."""

    rows: RankBatch
    labels: torch.Tensor
    known_items: int

    def __len__(self) -> int:
        return len(self.rows)


class TransActOnline:
    """A TransAct ranker as Monolith's online trainer sees it (:class:`~lifelong.monolith.online.OnlineModel`).

    Args:
        model: the ranker (e.g. ``load_model(run)[0]``); put in training mode.
        store: the feature store its rows are read from (the real-time store the service reads).
        config: what its deltas name as the model (:func:`run_config` of its run).
        backend: op backend of the NN search.

        user_emb: the DV365 export store a model with user tokens reads (the one its service
            reads: each example gets the embedding serving would give its user).

    Raises:
        ConfigError: a model with user tokens without ``user_emb`` (or the reverse), heads that
            are not the stream's labels, or a store of another layout.
    """

    KIND = KIND

    def __init__(self, model: nn.Module, store: FeatureStore, config: Mapping[str, Any], backend: str | None = None,
                 user_emb: EmbeddingReader | None = None):
        # The serving path's own assembly (and user embeddings): training sees what serving scores.
        self.features = Ranker(model, store, path="optimized", backend=backend, user_emb=user_emb)
        if self.features.heads != HEADS:
            raise ConfigError(f"the store's heads {self.features.heads} are not the stream's labels {HEADS}")
        self.model = model.train()
        self.config = dict(config)
        self.tables: dict[str, CollisionlessEmbedding] = id_tables(model)
        self._dense = dense_tensors(model)

    @classmethod
    def from_run(cls, run: str | os.PathLike[str], store: FeatureStore, backend: str | None = None,
                 user_emb: str | None = None) -> TransActOnline:
        """Start from a ``lifelong transact train`` run's weights (and tables); a run trained with
        user tokens reads them from ``user_emb`` or the export store its ``run.json`` names, as
        its service does."""
        model, meta = load_model(run)
        return cls(model, store, run_config(run), backend, user_emb_reader(run, model, meta, user_emb))

    def featurize(self, examples: np.ndarray) -> tuple[TransActOnlineBatch, np.ndarray]:
        """Rows of the examples whose item the store knows, read at each impression's time."""
        item_rows, _ = self.features.item_rows(examples["item_id"].astype(np.int64))
        kept = np.flatnonzero(item_rows >= 0)
        users, surfaces, times = (examples[k][kept].astype(np.int64) for k in ("user_id", "surface", "ts_ms"))
        requests = [RankRequest(int(u), item_rows[i:i + 1], int(s), int(t))
                    for i, u, s, t in zip(kept, users, surfaces, times)]
        labels = torch.from_numpy(examples["labels"][kept].astype(np.float32))
        if not requests:
            return TransActOnlineBatch(None, labels, 0), kept  # type: ignore[arg-type]
        return TransActOnlineBatch(self.features.gather_batch(requests), labels, len(kept)), kept

    def logits(self, batch: TransActOnlineBatch, now_ms: int) -> torch.Tensor:
        return self.model(batch.rows).logits

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._dense)

    @torch.no_grad()
    def load_dense_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self._dense):
            raise DataError("dense weights", f"keys differ from the model's: {sorted(set(state) ^ set(self._dense))[:5]}")
        for key, value in state.items():
            self._dense[key].copy_(value)

    def wire_model(self) -> tuple[str, dict[str, Any]]:
        return KIND, self.config


class SyncedTransActRanker(Ranker):
    """The TransAct ranking path taking parameter pushes (a :class:`~lifelong.serving.ranking.SyncedRanker`).

    Args:
        model, store, path, backend, head_weights, **kwargs: as :class:`~lifelong.transact.serving.Ranker`.
        run_version: the run's version (:func:`~lifelong.transact.serving.model_version`),
            reported until the first push and as the prefix of every pushed version.
        config: the run's :func:`run_config`: a push of another model is refused (422).

    Example::

        ranker = SyncedTransActRanker.from_run("runs/v2", open_store("lmdb:///stores/small"))
        ranker.apply_sync(payload)        # from `lifelong monolith online --model-run runs/v2 --serve ...`
        ranker.rank(requests)[0].model_version   # 'transact_v2-.../seed0@...+v3'
    """

    def __init__(self, model: nn.Module, store: FeatureStore, run_version: str, config: Mapping[str, Any],
                 **kwargs: Any):
        super().__init__(model, store, **kwargs)
        self.run_version = run_version
        self.config = json.loads(json.dumps(dict(config)))
        self._replica = InPlaceReplica({slot: emb.table for slot, emb in id_tables(model).items()},
                                       dense_tensors(model))
        self._params_lock = threading.Lock()  # held by a batch, and by an apply: never both at once
        self._apply_lock = threading.Lock()   # one push at a time
        self.syncs = 0

    @classmethod
    def from_run(cls, run: str | os.PathLike[str], store: FeatureStore, **kwargs: Any) -> SyncedTransActRanker:
        model, _ = load_model(run)
        return cls(model, store, model_version(Path(run)), run_config(run), **kwargs)

    @property
    def version(self) -> str:
        """The version the next batch is scored with."""
        held = self._replica.version
        return self.run_version if held is None else f"{self.run_version}+v{held}"

    def apply_sync(self, payload: bytes) -> dict[str, object]:
        """Apply one pushed delta between two batches, in place; returns what was applied.

        Raises:
            MalformedDelta: not a delta, a delta of another model, or of other shapes (422).
            DataError: it does not follow the held version or lineage (409; the trainer then
                sends a full snapshot).
        """
        delta, kind, model = decode_delta(payload)  # off the request path
        if kind != KIND or model != self.config:
            raise MalformedDelta(f"a delta of another model ({kind} {model.get('name', '?')}): this service serves "
                                 f"the run {self.run_version}")
        with self._apply_lock:
            self._replica.check(delta)
            t0 = time.perf_counter()
            with self._params_lock:  # between two batches
                self._replica.apply(delta)
                self.syncs += 1
            apply_ms = (time.perf_counter() - t0) * 1000
        return {"version": f"{self.run_version}+v{delta.version}", "full": delta.full, "rows": delta.n_rows,
                "dense": delta.dense is not None, "apply_ms": round(apply_ms, 3)}

    def rank(self, requests: list[RankRequest]) -> list[RankResult]:
        """:meth:`Ranker.rank`, every result naming the parameters' version that scored it."""
        with self._params_lock:
            results = super().rank(requests)
            version = self.version
        for result in results:
            result.model_version = version
        return results
