"""The request path of the ranking service: feature store -> NN search -> model -> sorted scores.

Two paths, chosen at start-up, give the same scores:

- ``optimized``: a batch of requests holds each (user, request time) history once in a token
  table (values + offsets) assembled in a reusable :class:`Arena`; the NN search runs over that
  jagged layout through the op dispatcher. A model declaring the ``token_table`` ability
  (:mod:`lifelong.transact.abilities`; TransAct) scores the rows over token indices with its own
  ``score_token_table``, never over per-candidate copies of the tokens; any other model gets
  the gathered :class:`~lifelong.transact.batch.RankBatch` and its ``forward``.
- ``naive``: the paper's baseline, one request at a time: every candidate gets its own copy of
  its user's sequences (:func:`~lifelong.ops.nn_search.nn_search_naive`), the rows are gathered
  into a full :class:`~lifelong.transact.batch.RankBatch` and the model's own ``forward`` (plain
  PyTorch layers) scores them.

Both assemble ``S_all`` with :func:`~lifelong.transact.sequence_layout.assemble_s_all`, the
rule ``lifelong transact build`` logged it with (same timelines, same tie rule), which is what
makes the scores of served and offline rows equal. Only the blocks the model declares it reads
are searched. Nothing here depends on the model's name or class: only on its abilities.

Each batch reads one version of the feature store: one pinned reader
(:meth:`~lifelong.store.feature_store.FeatureStore.reader`) serves all its users, and every
result names that version (``RankResult.store_version``). When a batch pins a version other
than the last one, the item table and the caps are read again before the batch is scored, so a
``lifelong store load`` takes effect between two batches, never inside one.

A model that prepends DV365 user tokens (``abilities.user_tokens``, trained with ``--user-emb``)
is served with an :class:`~lifelong.store.embeddings.EmbeddingReader`: each batch reads the
export's pointer and its distinct users' 4-bit records once (so a new ``lifelong dv365 export``
takes effect at the next batch), decodes them, and fills a user the version lacks with
:data:`USER_EMB_FILL`, as training did. Every result names that version (``user_emb_version``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from lifelong.core.config import build
from lifelong.core.errors import ConfigError, DataError, StoreUnavailable
from lifelong.core.metrics import DEFAULT_HEAD_WEIGHTS
from lifelong.core.precision import check_precision, forward_precision
from lifelong.core.quantization import INT8_SCALE, dequantize_int8
from lifelong.data.schema import EMBED_DIM
from lifelong.ops.nn_search import nn_search, nn_search_naive
from lifelong.ops.nn_select import l2_normalize
from lifelong.serving.metrics import StageClock
from lifelong.serving.ranking import RankRequest, RankResult
from lifelong.store.embeddings import EmbeddingReader, decode_records
from lifelong.store.feature_store import FeatureStore, ItemRecords, StoreReader, VersionGone
from lifelong.transact.abilities import abilities_of
from lifelong.transact.batch import RankBatch
from lifelong.transact.experiments import run_name
from lifelong.transact.sequence_layout import SEGMENTS, SequenceLayout, assemble_s_all
from lifelong.transact.trainer import TrainConfig, saved_model_config

T = TypeVar("T")

PATHS = ("optimized", "naive")


class Arena:
    """Pre-allocated host buffers for batch assembly, grown (doubled) only when a batch needs more.

    Every batch writes its token table and row tensors into views of these buffers, so the hot
    path allocates no new input tensors; with CUDA present the buffers are pinned so that a copy
    to the device can be asynchronous.

    Args:
        rows: initial candidate rows (grown as needed).
        tokens: initial token-table capacity (grown as needed).
        seq_len: |S_all|.
    """

    def __init__(self, rows: int, tokens: int, seq_len: int):
        self.seq_len = seq_len
        self.grows = 0
        self._alloc_rows(rows)
        self._alloc_tokens(tokens)

    @staticmethod
    def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())

    def _alloc_rows(self, n: int) -> None:
        self.row_capacity = n
        self.tok_index = self._empty((n, self.seq_len), torch.int64)
        self.cand_user = self._empty((n,), torch.int64)
        self.ids = self._empty((5, n), torch.int64)  # user, item, author, topic, surface
        self.cand_int8 = self._empty((n, EMBED_DIM), torch.int8)

    def _alloc_tokens(self, n: int) -> None:
        self.token_capacity = n
        self.tok_int8 = self._empty((n, EMBED_DIM), torch.int8)
        self.tok_action = self._empty((n,), torch.int64)
        self.tok_surface = self._empty((n,), torch.int64)

    def reserve(self, rows: int, tokens: int) -> None:
        if rows > self.row_capacity:
            self._alloc_rows(max(rows, 2 * self.row_capacity))
            self.grows += 1
        if tokens > self.token_capacity:
            self._alloc_tokens(max(tokens, 2 * self.token_capacity))
            self.grows += 1


@dataclass
class _History:
    """Where one (user, request time) history sits in the batch's token table."""

    ll: tuple[int, int]  # (start, length) in the token table
    rt: tuple[int, int]
    imp: tuple[int, int]


@dataclass(frozen=True)
class _StoreVersion:
    """What the ranker keeps of one store version: its item table (a private copy) and caps.

    Requests carry item rows of the ranker's *catalog*, every item id it has seen in the order
    first seen, so a row validated against one version (``item_rows``) still names the same item
    when the batch reads the next one; ``row_of`` maps catalog rows to this version's table.
    """

    name: str
    id: str  # StoreReader.version_id: unique even across a wiped and reloaded store
    items: ItemRecords
    item_emb: torch.Tensor
    item_unit: torch.Tensor
    ll_cap: int
    imp_cap: int
    scale: float
    row_of: np.ndarray      # catalog row -> row of this version's item table (-1: not in it)
    catalog_of: np.ndarray  # row of this version's item table -> catalog row


READINESS_TTL_S = 1.0
"""``Ranker.readiness`` reads the store's pointer at most this often."""

USER_EMB_FILL = 0.0
"""Every element of the DV365 embedding of a user the served export lacks: the value training
filled such users with (:meth:`~lifelong.transact.rank_data.RankData` decodes with ``fill=0.0``)."""


def user_emb_reader(run: str | Path, model: nn.Module, meta: dict, user_emb: str | None) -> EmbeddingReader | None:
    """The DV365 export store a run's model reads its user tokens from: ``user_emb``, else the
    store its ``run.json`` names; None for a model without user tokens.

    Raises:
        ConfigError: a model with user tokens and no store to read them from, or ``user_emb``
            given for a model without them.
    """
    if abilities_of(model).user_tokens:
        url = user_emb or meta.get("train", {}).get("user_emb")
        if url is None:
            raise ConfigError(f"{run} reads DV365 user tokens and its run.json names no export store: give --user-emb")
        return EmbeddingReader(url)  # read-only, as the feature store (it may be the same LMDB environment)
    if user_emb is not None:
        raise ConfigError(f"{run} was trained without a user embedding; drop --user-emb")
    return None


def model_version(run: str | Path) -> str:
    """Which model a run is: ``<model>-<config hash>/<run directory name>@<weights hash>``.

    ``<model>-<config hash>`` names the run's training configuration, seed aside, exactly as the
    experiment harness names its run directories (:func:`~lifelong.transact.experiments.run_name`),
    read from ``run.json`` (from ``model.pt`` for a run without one). ``<weights hash>`` is the
    start of the SHA-256 of ``model.pt``: it changes whenever the served weights do.

    Example::

        model_version("reports/quickstart/runs/transact_v2-3f2a9c1d07/seed0")
        # 'transact_v2-3f2a9c1d07/seed0@ab12cd34ef56'
    """
    run = Path(run)
    weights = (run / "model.pt").read_bytes()
    try:
        saved = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or "train" not in saved:
        saved = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=False)
    cfg = build(TrainConfig, saved["train"])
    name = run_name(cfg, saved_model_config(saved, cfg))
    return f"{name}/{run.name}@{hashlib.sha256(weights).hexdigest()[:12]}"


class Ranker:
    """Scores ranking requests with a trained model over a feature store.

    Args:
        model: a trained ranker (``load_model``), in eval mode.
        store: the feature store the model's dataset was loaded into.
        path: ``optimized`` or ``naive`` (see the module docstring).
        backend: op backend of the optimized path (``reference``, ``cpu``, ``triton``; None = default).
        head_weights: ``w_h`` of the final score by head name.
        user_emb: the DV365 export store a model with ``abilities.user_tokens`` reads (required
            then, refused otherwise); read per batch, so a new export is served from the next one.
        precision: ``fp32``, or ``bf16``: the model's forward under bfloat16 autocast
            (:mod:`lifelong.core.precision`; scores then differ from float32's by about 1e-3).
        forward_rows: the optimized path scores a batch in chunks of this many rows.
        stages: where the time of each batch's stages is summed (``fetch``: the store read and the
            rows' ids; ``nn_search``: every row's ``S_all``; ``prepare``: the tokens and tensors the
            model reads; ``forward``; ``finish``: probabilities and scores); a new clock by default.

    Example::

        ranker = Ranker(*load_model("runs/v2")[:1], open_store("lmdb:///tmp/store"))
        [result] = ranker.rank([RankRequest(user_id=7, items=np.array([3, 9]), surface=0)])
    """

    def __init__(self, model: nn.Module, store: FeatureStore, path: str = "optimized",
                 backend: str | None = None, head_weights: dict[str, float] = DEFAULT_HEAD_WEIGHTS,
                 user_emb: EmbeddingReader | None = None, stages: StageClock | None = None,
                 precision: str = "fp32", forward_rows: int = 256):
        if path not in PATHS:
            raise ConfigError(f"unknown serving path {path!r}; choose one of {', '.join(PATHS)}")
        if forward_rows < 1:
            raise ConfigError(f"forward_rows must be >= 1, got {forward_rows}")
        self.abilities = abilities_of(model)
        if self.abilities.counters:
            raise ConfigError("the model reads engagement counters (model.row.counters), which the feature store does "
                              "not keep: serve a model trained without them")
        self.precision, self.forward_rows = check_precision(precision), forward_rows
        self.model, self.store, self.path, self.backend = model.eval(), store, path, backend
        meta = store.meta()  # StoreUnavailable when nothing is loaded: serve after `lifelong store load`
        self.layout = SequenceLayout(**meta["layout"])
        model_layout = getattr(getattr(model, "cfg", None), "layout", None)
        if model_layout is not None and model_layout != self.layout:
            raise ConfigError(f"the model was trained on layout {model_layout}, the store holds {self.layout}; "
                              "load the store from the model's dataset")
        self.user_emb, self.user_emb_version = user_emb, None
        if self.abilities.user_tokens != (user_emb is not None):
            raise ConfigError("the model prepends DV365 user tokens: give the export store it reads (--user-emb)"
                              if user_emb is None else "the model reads no DV365 user tokens: drop --user-emb")
        if user_emb is not None:
            pointer = user_emb.current()
            if pointer is None:
                raise ConfigError(f"no DV365 embeddings exported to {user_emb.url} yet (run lifelong dv365 export)")
            self._check_user_emb_shape(pointer, at_start=True)
            self.user_emb_version = int(pointer["version"])
        self.heads: tuple[str, ...] = tuple(meta["heads"])
        n_heads = getattr(getattr(model, "cfg", None), "n_heads", len(self.heads))
        if n_heads != len(self.heads):
            raise ConfigError(f"the model has {n_heads} heads, the store's dataset {len(self.heads)} ({', '.join(self.heads)})")
        self.weights = np.array([head_weights.get(h, 0.0) for h in self.heads], dtype=np.float32)
        self._catalog = np.zeros(0, dtype=np.int64)  # item ids, in the order first seen
        self._catalog_sort = np.zeros(0, dtype=np.int64)  # argsort of _catalog
        with store.reader() as r:
            self._version = self._read_version(r)
        self._lock = threading.Lock()
        self._health: tuple[bool, str, float] = (True, "ok", time.monotonic())
        # The positions of S_all the model reads, in its order: what its token-table path indexes.
        self.read_positions = self.layout.positions(self.abilities.blocks)
        self.token_table = path == "optimized" and self.abilities.token_table
        self.arena = Arena(rows=4096, tokens=1 << 16, seq_len=self.layout.total)
        self.stages = stages or StageClock()

    # -- DV365 user embeddings ----------------------------------------------------------------

    def _check_user_emb_shape(self, pointer: dict, at_start: bool = False) -> None:
        """ConfigError at start-up, else StoreUnavailable (503): the export is not ``cfg.user_tokens``-shaped."""
        shape = (int(pointer["rows"]), int(pointer["dim"]))
        want = tuple(getattr(self.model.cfg, "user_tokens", None) or ())
        if shape != want:
            message = (f"DV365 export version {pointer['version']} in {self.user_emb.url} holds {shape[0]} x {shape[1]} "
                       f"embeddings, the model reads {want[0]} x {want[1]}; export with the model's tower")
            raise ConfigError(message) if at_start else StoreUnavailable(self.user_emb.url, message)

    def _user_embeddings(self, requests: list[RankRequest]) -> tuple[torch.Tensor, np.ndarray, int] | None:
        """The served export's embeddings of the batch's distinct users ``(U, R, C)``, each
        request's row of it, and the version; None for a model without user tokens.

        One pointer read and one read of the U records, decoded here; a user the version lacks
        gets :data:`USER_EMB_FILL`, as in training.

        Raises:
            StoreUnavailable: nothing exported, a corrupt record, an export of another shape, or
                the store unreachable (the service answers 503).
        """
        if self.user_emb is None:
            return None
        users, request_user = np.unique(np.array([r.user_id for r in requests], dtype=np.int64), return_inverse=True)
        try:
            words, found, pointer = self.user_emb.get_words(users)
        except DataError as exc:
            raise StoreUnavailable(self.user_emb.url, str(exc)) from None
        self._check_user_emb_shape(pointer)
        emb = decode_records(words, found, int(pointer["dim"]), USER_EMB_FILL)
        return torch.from_numpy(emb), request_user.reshape(-1), int(pointer["version"])

    # -- store versions -----------------------------------------------------------------------

    @property
    def items(self) -> ItemRecords:
        """The item table of the last version read."""
        return self._version.items

    @property
    def store_version(self) -> str:
        """The name of the store version the last batch read."""
        return self._version.name

    def _read_version(self, reader: StoreReader) -> _StoreVersion:
        """The pinned version of ``reader``: its meta checked against the model, its item table copied."""
        name, version_id, meta = reader.version, reader.version_id, reader.meta()
        if SequenceLayout(**meta["layout"]) != self.layout or tuple(meta["heads"]) != self.heads:
            raise StoreUnavailable(self.store.url, f"version {name} holds layout {meta['layout']} and heads "
                                                   f"{meta['heads']}, the model serves {self.layout} and "
                                                   f"{list(self.heads)}; load the model's dataset")
        # The item table is small and read on every request: one private copy outlives the reader.
        items = reader.items().copy()
        scale = float(meta.get("int8_scale", INT8_SCALE))
        item_emb = dequantize_int8(torch.from_numpy(items.emb_int8), scale)
        previous = getattr(self, "_version", None)
        if previous is not None and np.array_equal(previous.items.item_id, items.item_id):
            row_of, catalog_of = previous.row_of, previous.catalog_of  # the same ids: the same rows
        else:
            row_of, catalog_of = self._extend_catalog(items.item_id)
        return _StoreVersion(name, version_id, items, item_emb, l2_normalize(item_emb), int(meta["ll_cap"]),
                             int(meta["imp_cap"]), scale, row_of, catalog_of)

    def _extend_catalog(self, item_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add the ids the catalog lacks (at its end: earlier rows never move); returns the
        version's ``row_of`` and ``catalog_of``."""
        if self._catalog.size:
            pos = np.searchsorted(self._catalog, item_id, sorter=self._catalog_sort)
            hit = self._catalog_sort[np.minimum(pos, self._catalog.size - 1)]
            found = self._catalog[hit] == item_id
        else:
            hit, found = np.zeros(item_id.size, dtype=np.int64), np.zeros(item_id.size, dtype=bool)
        catalog_of = hit.astype(np.int64, copy=True)
        catalog_of[~found] = self._catalog.size + np.arange(int((~found).sum()))
        catalog = np.concatenate([self._catalog, item_id[~found]])
        row_of = np.full(catalog.size, -1, dtype=np.int64)
        row_of[catalog_of] = np.arange(item_id.size)
        # Published whole, sort last: item_rows of another thread reads a version, never these.
        self._catalog, self._catalog_sort = catalog, np.argsort(catalog, kind="stable")
        return row_of, catalog_of

    def _pin(self, reader: StoreReader) -> _StoreVersion:
        """The version ``reader`` pinned, read anew when it is not the last batch's."""
        if reader.version_id != self._version.id:
            self._version = self._read_version(reader)
        return self._version

    def readiness(self) -> tuple[bool, str]:
        """Whether the store can serve now: the last batch's outcome, or at most one pointer read
        a second (:data:`READINESS_TTL_S`). ``(False, reason)`` when it is unreachable, empty or
        serves a version of another layout."""
        ok, reason, at = self._health
        if time.monotonic() - at < READINESS_TTL_S:
            return ok, reason
        try:
            with self.store.reader() as r:
                name = r.version
                if r.version_id != self._version.id:  # a new version: is it servable? (meta only, no item table)
                    meta = r.meta()
                    if SequenceLayout(**meta["layout"]) != self.layout or tuple(meta["heads"]) != self.heads:
                        raise StoreUnavailable(self.store.url, f"version {name} holds layout {meta['layout']}, "
                                                               f"the model serves {self.layout}")
            if self.user_emb is not None:  # the export store too (its own reader: never nested)
                pointer = self.user_emb.current()
                if pointer is None:
                    raise StoreUnavailable(self.user_emb.url, "no DV365 embeddings exported yet")
                self._check_user_emb_shape(pointer)
            self._health = (True, "ok", time.monotonic())
        except StoreUnavailable as exc:
            self._health = (False, exc.reason, time.monotonic())
        return self._health[:2]

    # -- validation ---------------------------------------------------------------------------

    def item_rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``item_ids`` (in the ranker's catalog) and the ids the served item table lacks."""
        version = self._version
        rows, known = version.items.index_of(np.asarray(item_ids, dtype=np.int64))
        catalog_rows = np.full(rows.shape, -1, dtype=np.int64)
        catalog_rows[known] = version.catalog_of[rows[known]]
        return catalog_rows, np.asarray(item_ids)[~known]

    # -- scoring ------------------------------------------------------------------------------

    @torch.inference_mode()
    def rank(self, requests: list[RankRequest]) -> list[RankResult]:
        """Score a batch of requests, all from one store version; results in the same order.

        Raises:
            StoreUnavailable: the store is unreachable or empty, or serves a version of another
                layout (the service answers 503).
        """
        if not requests:
            return []
        with self._lock:  # one batch at a time: the arena and the version are the batch's
            try:
                results = self._rank_pinned(requests)
            except StoreUnavailable as exc:
                self._health = (False, exc.reason, time.monotonic())
                raise
            self._health = (True, "ok", time.monotonic())
            return results

    def _read_pinned(self, read: Callable[[StoreReader, _StoreVersion], T]) -> tuple[T, _StoreVersion]:
        """``read(reader, version)`` on one pinned store version, pinned again (three tries) when
        Redis deleted it mid-read."""
        for _ in range(3):
            try:
                with self.store.reader() as reader:
                    version = self._pin(reader)
                    return read(reader, version), version
            except VersionGone:  # Redis: the pinned version was deleted mid-batch; pin the served one
                continue
        raise StoreUnavailable(self.store.url, "the served version changed during each of three reads (loads too frequent)")

    def _rank_pinned(self, requests: list[RankRequest]) -> list[RankResult]:
        # Read before the feature store's reader opens (an LMDB export store may be the same
        # environment): once per distinct user per batch, from the export served now.
        users = self._user_embeddings(requests)

        def score(reader: StoreReader, version: _StoreVersion) -> list[RankResult]:
            rows = [self._version_rows(r.items, version) for r in requests]
            if self.path == "naive":
                return [self._rank_naive(r, rows_, reader, version, None if users is None else users[0][users[1][k]])
                        for k, (r, rows_) in enumerate(zip(requests, rows))]
            return self._rank_optimized(requests, rows, reader, version, users)

        results, version = self._read_pinned(score)
        if users is not None:
            self.user_emb_version = users[2]
        for result in results:
            result.store_version, result.user_emb_version = version.name, self.user_emb_version
        return results

    def gather_batch(self, requests: list[RankRequest]) -> RankBatch:
        """The rows of ``requests`` as the optimized path assembles them, gathered into a
        :class:`~lifelong.transact.batch.RankBatch` over all of ``S_all`` (one row per candidate,
        request order; labels and NAL fields empty): what online training featurises, so that
        a model's ``forward`` on it is what the service scores (within 1e-5).

        Not under inference mode: the batch may feed a training step. A model with user tokens
        gets each row's DV365 embedding from the export served now, as :meth:`rank` does.

        Raises:
            StoreUnavailable: the store (or the export store) cannot answer, or kept switching versions.
        """
        users = self._user_embeddings(requests)  # before the feature store's reader, as in rank

        def gather(reader: StoreReader, version: _StoreVersion) -> RankBatch:
            rows = [self._version_rows(r.items, version) for r in requests]
            ids, items, counts, _, tok_index, tok_emb, tok_action, tok_surface = self._assemble(requests, rows,
                                                                                                reader, version)
            user_emb = None if users is None else users[0][torch.from_numpy(np.repeat(users[1], counts))]
            return _gather_batch(ids.clone(), version.item_emb[items], tok_index, tok_emb, tok_action, tok_surface,
                                 user_emb)

        with self._lock:  # the arena is the ranker's: one batch at a time
            return self._read_pinned(gather)[0]

    def _version_rows(self, catalog_rows: np.ndarray, version: _StoreVersion) -> np.ndarray:
        rows = np.asarray(catalog_rows, dtype=np.int64)
        inside = rows < version.row_of.size
        out = np.where(inside, version.row_of[np.where(inside, rows, 0)], -1)
        if (out < 0).any():
            raise StoreUnavailable(self.store.url, f"a candidate is not in the item table of version {version.name} "
                                                   "(the store switched while the request was validated); retry")
        return out

    def _finish(self, logits: torch.Tensor, counts: list[int], cold: list[bool]) -> list[RankResult]:
        with self.stages.stage("finish"):
            probs = torch.sigmoid(logits).numpy()
            scores = probs @ self.weights
            bounds = np.cumsum([0, *counts])
            return [RankResult(probs[a:b], scores[a:b], c) for a, b, c in zip(bounds[:-1], bounds[1:], cold)]

    def _histories(self, requests: list[RankRequest], reader: StoreReader,
                   version: _StoreVersion) -> tuple[np.ndarray, list[bool], list[_History]]:
        """Each request's (user, time) key, whether each request is cold-start, and where each
        key's history sits in the arena's token table (keys de-duplicated). One read of
        ``reader`` (the batch's pinned version) fetches every user."""
        t_key = np.array([-1 if r.request_ms is None else r.request_ms for r in requests], dtype=np.int64)
        keys = np.stack([np.array([r.user_id for r in requests], dtype=np.int64), t_key], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        users = reader.users([int(u) for u in np.unique(uniq[:, 0])])
        by_id = dict(zip(np.unique(uniq[:, 0]).tolist(), users))
        spans = []
        for user_id, t in uniq.tolist():
            seq = by_id[user_id]
            spans.append(None if seq is None else
                         (seq, seq.timeline(None if t < 0 else t, version.ll_cap, self.layout.rt, version.imp_cap)))
        # Copy what the batch needs out of the store's buffers while the reader is open.
        inverse = inverse.reshape(-1)
        return inverse, [spans[k] is None for k in inverse], self._fill_tokens(spans)

    def _fill_tokens(self, spans: list) -> list[_History]:
        """Write each key's LL + RT and impression tokens into the arena's token table."""
        total = sum(0 if s is None else (s[1].rt_hi - s[1].ll_lo) + (s[1].imp_hi - s[1].imp_lo) for s in spans)
        self.arena.reserve(0, max(total, 1))
        a = self.arena
        out, pos = [], 0
        for span in spans:
            if span is None:
                out.append(_History((pos, 0), (pos, 0), (pos, 0)))
                continue
            seq, tl = span
            n_exp, n_imp = tl.rt_hi - tl.ll_lo, tl.imp_hi - tl.imp_lo
            for dst, src in ((a.tok_int8, (seq.emb[tl.ll_lo:tl.rt_hi], seq.imp_emb[tl.imp_lo:tl.imp_hi])),
                             (a.tok_action, (seq.action[tl.ll_lo:tl.rt_hi], seq.imp_action[tl.imp_lo:tl.imp_hi])),
                             (a.tok_surface, (seq.surface[tl.ll_lo:tl.rt_hi], seq.imp_surface[tl.imp_lo:tl.imp_hi]))):
                view = dst.numpy()
                view[pos:pos + n_exp] = src[0]
                view[pos + n_exp:pos + n_exp + n_imp] = src[1]
            ll_len = tl.ll_hi - tl.ll_lo
            out.append(_History((pos, ll_len), (pos + (tl.rt_lo - tl.ll_lo), tl.rt_hi - tl.rt_lo), (pos + n_exp, n_imp)))
            pos += n_exp + n_imp
        if pos == 0:  # an all-cold batch: one zero token keeps every gather well-defined
            a.tok_int8[0], a.tok_action[0], a.tok_surface[0] = 0, 0, 0
        self.n_tokens = max(pos, 1)
        return out

    def _token_index(self, hist: list[_History], key_of_row: np.ndarray, cand_unit: torch.Tensor,
                     tokens: torch.Tensor, search, scale: float) -> torch.Tensor:
        """(N, |S_all|) token-table index of every row's ``S_all`` (-1 = padding; blocks the model
        does not read stay padding)."""
        segments = {seg: (torch.tensor([getattr(h, seg)[0] for h in hist], dtype=torch.int64),
                          torch.tensor([getattr(h, seg)[1] for h in hist], dtype=torch.int64)) for seg in SEGMENTS}

        def search_segments(starts, lengths, cand_key, cand, k):
            return search(tokens, starts, lengths, cand_key, cand, k, scale)[0]

        return assemble_s_all(self.layout, segments, torch.from_numpy(key_of_row), cand_unit, search_segments,
                              out=self.arena.tok_index[:key_of_row.size], blocks=self.abilities.blocks)

    def _rows(self, requests: list[RankRequest], rows: list[np.ndarray], n: int,
              version: _StoreVersion) -> tuple[torch.Tensor, ...]:
        ids = self.arena.ids[:, :n]
        items = np.concatenate(rows)
        ids[0].numpy()[:] = np.repeat([r.user_id for r in requests], [r.items.size for r in requests])
        ids[1].numpy()[:] = version.items.item_id[items]
        ids[2].numpy()[:] = version.items.author_id[items]
        ids[3].numpy()[:] = version.items.topic_id[items]
        ids[4].numpy()[:] = np.repeat([r.surface for r in requests], [r.items.size for r in requests])
        return ids, torch.from_numpy(items)

    def _assemble(self, requests: list[RankRequest], rows: list[np.ndarray], reader: StoreReader,
                  version: _StoreVersion, positions: torch.Tensor | None = None) -> tuple:
        """The optimized path's rows over a compact token table: ``ids``, ``items``, ``counts``,
        ``cold``, ``tok_index`` (positions ``positions`` of ``S_all``, all when None) into the
        tokens some row selected, and those tokens' dequantized embeddings, actions, surfaces."""
        counts = [int(r.items.size) for r in requests]
        n = sum(counts)
        with self.stages.stage("fetch"):
            self.arena.reserve(n, 0)
            key_of_request, cold, hist = self._histories(requests, reader, version)
            ids, items = self._rows(requests, rows, n, version)
        tokens = self.arena.tok_int8[:self.n_tokens]
        search = functools.partial(nn_search, backend=self.backend)
        with self.stages.stage("nn_search"):
            tok_index = self._token_index(hist, np.repeat(key_of_request, counts), version.item_unit[items], tokens,
                                          search, version.scale)
        with self.stages.stage("prepare"):
            if positions is not None:
                tok_index = tok_index.index_select(1, positions)
            # Only the tokens some row selected enter the model: a 10^4-token S_LL contributes a few
            # hundred, and per-token work (dequantization, the fused first layer) scales with those.
            used, tok_index = _compact(tok_index)
            return (ids, items, counts, cold, tok_index, dequantize_int8(tokens[used], version.scale),
                    self.arena.tok_action[used], self.arena.tok_surface[used])

    def _rank_optimized(self, requests: list[RankRequest], rows: list[np.ndarray], reader: StoreReader,
                        version: _StoreVersion, users: tuple[torch.Tensor, np.ndarray, int] | None) -> list[RankResult]:
        ids, items, counts, cold, tok_index, tok_emb, tok_action, tok_surface = self._assemble(
            requests, rows, reader, version, self.read_positions if self.token_table else None)
        cand_emb = version.item_emb[items]
        user_emb = user_index = None
        if users is not None:  # each distinct user's embedding once; rows index it
            user_emb, user_index = users[0], torch.from_numpy(np.repeat(users[1], counts))
        n = tok_index.shape[0]
        if self.token_table:
            def score(rows: slice) -> torch.Tensor:
                user = {} if user_emb is None else {"user_emb": user_emb, "user_index": user_index[rows]}
                # Each chunk reads only its own rows' tokens: the per-token work is not redone
                # for the whole batch's tokens in every chunk.
                used, index = _compact(tok_index[rows]) if n > self.forward_rows else (slice(None), tok_index)
                return self.model.score_token_table(tok_emb[used], tok_action[used], tok_surface[used], index,
                                                    cand_emb[rows], _RowInputs(ids[:, rows], cand_emb[rows]),
                                                    backend=self.backend, **user)
        else:
            with self.stages.stage("prepare"):
                batch = _gather_batch(ids, cand_emb, tok_index, tok_emb, tok_action, tok_surface,
                                      None if user_emb is None else user_emb[user_index])

            def score(rows: slice) -> torch.Tensor:
                return self.model(_slice_batch(batch, rows)).logits
        with self.stages.stage("forward"), forward_precision(self.precision):
            # In chunks of rows: a forward over thousands of rows at once runs slower per row,
            # its activations no longer fitting in cache.
            logits = torch.cat([score(slice(a, a + self.forward_rows)).float() for a in range(0, n, self.forward_rows)])
        return self._finish(logits, counts, cold)

    def _rank_naive(self, request: RankRequest, rows: np.ndarray, reader: StoreReader,
                    version: _StoreVersion, user_emb: torch.Tensor | None = None) -> RankResult:
        n = int(request.items.size)
        with self.stages.stage("fetch"):
            _, cold, hist = self._histories([request], reader, version)
            tokens = self.arena.tok_int8[:self.n_tokens].clone()
            ids, items = self._rows([request], [rows], n, version)
            ids = ids.clone()
        with self.stages.stage("nn_search"):
            tok_index = self._token_index(hist, np.zeros(n, dtype=np.int64), version.item_unit[items], tokens,
                                          nn_search_naive, version.scale).clone()
        with self.stages.stage("prepare"):
            cand_emb = version.item_emb[items]
            batch = _gather_batch(ids, cand_emb, tok_index, dequantize_int8(tokens, version.scale),
                                  self.arena.tok_action[:self.n_tokens].clone(),
                                  self.arena.tok_surface[:self.n_tokens].clone(),
                                  None if user_emb is None else user_emb.unsqueeze(0).repeat(n, 1, 1))  # a copy per row
        with self.stages.stage("forward"), forward_precision(self.precision):
            logits = self.model(batch).logits.float()
        return self._finish(logits, [n], cold)[0]


def _slice_batch(batch: RankBatch, rows: slice) -> RankBatch:
    """The rows ``rows`` of a batch (every field is per row)."""
    return dataclasses.replace(batch, **{f.name: value[rows] for f in dataclasses.fields(batch)
                                         if (value := getattr(batch, f.name)) is not None})


def _compact(tok_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct tokens ``tok_index`` uses (sorted) and the index rewritten into them (-1 kept)."""
    used, inverse = torch.unique(tok_index, return_inverse=True)
    if used.numel() and int(used[0]) < 0:  # padding sorts first
        return used[1:], inverse - 1
    return used, inverse


@dataclass
class _RowInputs:
    """The row features :class:`~lifelong.modules.row_features.RowFeatures` reads, without sequences."""

    ids: torch.Tensor
    cand_emb: torch.Tensor

    user_id = property(lambda self: self.ids[0])
    item_id = property(lambda self: self.ids[1])
    author_id = property(lambda self: self.ids[2])
    topic_id = property(lambda self: self.ids[3])
    surface = property(lambda self: self.ids[4])
    counters = None  # a served model reads none (Abilities.counters is refused by the Ranker)


def _gather_batch(ids, cand_emb, tok_index, tok_emb, tok_action, tok_surface, user_emb=None) -> RankBatch:
    """A full RankBatch from token indices (the per-row copies the naive path makes); ``user_emb``
    ``(N, R, C)``: each row's DV365 embedding, for a model with user tokens."""
    n, s = tok_index.shape
    valid = tok_index >= 0
    idx = tok_index.clamp_min(0)
    if tok_emb.shape[0] == 0:  # cold start: every row is padding
        tok_emb = torch.zeros(1, EMBED_DIM)
        tok_action = tok_surface = torch.zeros(1, dtype=torch.int64)
    empty_f, empty_i, empty_b = torch.zeros(n, 1, EMBED_DIM), torch.full((n, 1), -1), torch.zeros(n, 1, dtype=torch.bool)
    return RankBatch(
        user_id=ids[0], item_id=ids[1], author_id=ids[2], topic_id=ids[3], surface=ids[4], cand_emb=cand_emb,
        seq_emb=tok_emb[idx] * valid.unsqueeze(-1), seq_item=torch.full((n, s), -1),
        seq_action=torch.where(valid, tok_action[idx], 0), seq_surface=torch.where(valid, tok_surface[idx], 0),
        seq_valid=valid, nal_pos_emb=empty_f, nal_pos_item=empty_i, nal_pos_valid=empty_b,
        nal_neg_emb=empty_f, nal_neg_item=empty_i, nal_neg_valid=empty_b,
        labels=torch.zeros(n, 1), request_id=torch.zeros(n, dtype=torch.int64), user_emb=user_emb)
