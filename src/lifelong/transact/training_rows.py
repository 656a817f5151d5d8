"""Training and evaluation rows with NN feature logging (TransAct V2 §3.3; docs/design.md, "NN feature logging").

``build_rows`` turns a dataset directory into rows, one per shown (request, candidate) pair:
training rows from the ``train_days`` before the protocol's cutoff, evaluation rows from the
evaluation day. Each row logs only what the model reads — the candidate's selected tokens

    S_all = NN(S_LL, c) ⊕ S_RT[:r] ⊕ NN(S_RT[:r], c) ⊕ NN(S_imp, c)

plus the Next Action Loss's targets and impression negatives — never the lifelong sequence.
Request-level parts (``S_RT[:r]``, NAL targets and negatives) are stored once per request and
referenced by the rows, as the serving path de-duplicates them.

A token is ``(item index, action mask, surface)``; item index -1 is padding. Embeddings stay in
the int8 item table and are dequantized when a batch is assembled (:mod:`rank_data`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

import lifelong
from lifelong.core.engines import ShardMap, map_local, open_engine
from lifelong.core.errors import ConfigError, DataError
from lifelong.core.progress import progress
from lifelong.core.quantization import dequantize_int8, quantize_int8
from lifelong.data.counters import COUNTER_FEATURES, SMOOTHING, EngagementCounters
from lifelong.data.io import Dataset, NpyWriter, atomic_output_dir, iter_parquet_batches, load_dataset, write_json
from lifelong.data.protocol import Protocol, utc_minute
from lifelong.data.schema import EMBED_DIM, HEAD_BITS, HEADS, POSITIVE_BITS, Action
from lifelong.data.timelines import EventIndex, Jagged, TimelineConfig, build_timelines
from lifelong.data.validate import validate_table
from lifelong.ops.nn_select import l2_normalize, nn_topk_segments
from lifelong.transact.sequence_layout import (
    BLOCK_SOURCES,
    NN_BLOCKS,
    SEGMENTS,
    SequenceLayout,
    nn_block_index,
    rt_block_index,
)


@dataclass(frozen=True)
class BuildConfig:
    """How rows are built.

    Args:
        layout: block sizes of S_all (default 64 + 64 + 32 + 32 = 192 tokens).
        ll_cap: most tokens of S_LL searched by NN(S_LL, c) (paper: O(10^4)).
        imp_cap: most tokens of S_imp searched by NN(S_imp, c).
        nal_negatives: impression negatives logged per request for the NAL (newest first).
        request_chunk: most requests whose sequences are materialised at once (a chunk: one
            task of the Ray engine).
        chunk_tokens: most sequence tokens (S_LL + S_RT + S_imp, after the caps) a chunk
            materialises: a chunk closes at whichever limit comes first. Its token embeddings are
            ``chunk_tokens x 32`` float32 (512 MiB at the default), so users with 10^4-long
            histories get chunks of ~400 requests instead of 4,096, and peak memory no longer grows
            with history length.
        train_negative_rate: share of training rows without any positive label that is kept
            (seeded); kept ones get weight ``1 / rate`` so the loss, hence calibration and NE,
            stays unbiased. 1.0 keeps every row.
        seed: seed of that sampling.
        protocol_days: ``(train_days, gap_days, eval_days)`` to re-place the protocol at the end
            of the data span (``Protocol.fit``) instead of the dataset's own dates — for data
            too sparse in time for a one-day evaluation window (MovieLens). None keeps them.

    Example::

        >>> BuildConfig().layout.total
        192
    """

    layout: SequenceLayout = field(default_factory=SequenceLayout)
    ll_cap: int = 10_000
    imp_cap: int = 100
    nal_negatives: int = 32
    request_chunk: int = 4096
    chunk_tokens: int = 1 << 22
    train_negative_rate: float = 1.0
    seed: int = 0
    protocol_days: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.train_negative_rate <= 1.0:
            raise ConfigError(f"train_negative_rate must be in (0, 1], got {self.train_negative_rate}")
        if min(self.ll_cap, self.imp_cap, self.nal_negatives, self.request_chunk, self.chunk_tokens) < 1:
            raise ConfigError("ll_cap, imp_cap, nal_negatives, request_chunk and chunk_tokens must be >= 1")


@dataclass
class ItemTable:
    """Items sorted by id, with int8 embeddings and their normalised dequantization."""

    item_id: np.ndarray
    emb_int8: np.ndarray
    author_id: np.ndarray
    topic_id: np.ndarray

    @classmethod
    def from_dataset(cls, ds: Dataset) -> ItemTable:
        ids = ds.items.column("item_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        emb = np.asarray(ds.items.column("embedding").combine_chunks().flatten()).reshape(-1, EMBED_DIM)
        return cls(ids[order], quantize_int8(emb[order].astype(np.float32)),
                   ds.items.column("author_id").to_numpy()[order], ds.items.column("topic_id").to_numpy()[order])

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.item_id, ids)

    def normalized(self) -> torch.Tensor:
        """Dequantized, L2-normalised embeddings: what NN search and the models see."""
        return l2_normalize(dequantize_int8(torch.from_numpy(self.emb_int8)))


#: A token's fields as stored: ``{block}_{field}.npy`` of rows, ``rt_{field}.npy`` of requests.
TOKEN_DTYPES = {"item": np.int32, "action": np.uint16, "surface": np.int8}


def _gather_tokens(event_rows: np.ndarray, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token fields for event rows, -1 rows becoming padding (item -1, action 0, surface 0)."""
    valid = event_rows >= 0
    safe = np.where(valid, event_rows, 0)
    source = {"item": "item_idx", "action": "action_mask", "surface": "surface"}
    pad = {"item": -1, "action": 0, "surface": 0}
    return {f: np.where(valid, cols[source[f]][safe], pad[f]).astype(dtype) for f, dtype in TOKEN_DTYPES.items()}


def _nal_positives(rt_tok: dict[str, np.ndarray]) -> np.ndarray:
    """NAL targets per request: position t of the RT block predicts the token at t + 1 when that
    is a positive action (-1 otherwise)."""
    n_req = rt_tok["item"].shape[0]
    next_item = np.concatenate([rt_tok["item"][:, 1:], np.full((n_req, 1), -1, np.int32)], axis=1)
    next_pos = np.concatenate([(rt_tok["action"][:, 1:] & POSITIVE_BITS) != 0, np.zeros((n_req, 1), bool)], axis=1)
    return np.where(next_pos & (next_item >= 0), next_item, -1).astype(np.int32)


def _left_aligned(j: Jagged, width: int, take_newest: bool) -> np.ndarray:
    """(n, width) matrix of a jagged int array, padded with -1; keeps the newest if too long."""
    lengths = j.lengths()
    keep = np.minimum(lengths, width)
    start = j.offsets[:-1] + (lengths - keep if take_newest else 0)
    out = np.full((len(j), width), -1, dtype=np.int64)
    rows = np.repeat(np.arange(len(j)), keep)
    cols = np.arange(keep.sum()) - np.repeat(np.r_[0, np.cumsum(keep)[:-1]], keep)
    out[rows, cols] = Jagged.from_ranges(j.values, start, keep).values
    return out


def _segment_table(segments: dict[str, Jagged]) -> tuple[np.ndarray, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The source segments of a chunk's requests laid end to end in one token table of event
    rows, and each segment's ``(starts, lengths)`` per request in it."""
    table, ranges, base = [], {}, 0
    for name in SEGMENTS:
        seq = segments[name]
        table.append(np.asarray(seq.values, dtype=np.int64))
        ranges[name] = (torch.from_numpy(base + seq.offsets[:-1].astype(np.int64)), torch.from_numpy(seq.lengths()))
        base += seq.values.size
    return np.concatenate(table), ranges


def _event_rows(table: np.ndarray, index: torch.Tensor) -> np.ndarray:
    """Event rows of token-table indices (-1 stays -1)."""
    index = index.numpy()
    return np.where(index >= 0, table[np.maximum(index, 0)] if table.size else -1, -1)


@dataclass
class SelectedTokens:
    """Event-row indices (-1 = padding) of every token a row logs.

    Args:
        nn: ``{"ll_nn" | "rt_nn" | "imp_nn": (n_rows, K)}``, descending similarity.
        rt: (n_requests, r) ``S_RT[:r]``, chronological, left-aligned.
        nal_negatives: (n_requests, M) the newest bare impressions, newest first.
    """

    nn: dict[str, np.ndarray]
    rt: np.ndarray
    nal_negatives: np.ndarray


def _timeline_config(cfg: BuildConfig) -> TimelineConfig:
    return TimelineConfig(ll_cap=cfg.ll_cap, rt_cap=cfg.layout.rt, imp_cap=max(cfg.imp_cap, cfg.nal_negatives))


def _select_chunk(index: EventIndex, emb: torch.Tensor, item_idx: np.ndarray, req_user: np.ndarray,
                  req_ts: np.ndarray, local_req: np.ndarray, row_item: np.ndarray,
                  cfg: BuildConfig) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The tokens of one chunk of requests (a shard): a pure function of its arguments, so that
    either engine runs it and the merged rows do not depend on where it ran.

    Returns ``(nn, rt, nal_negatives)`` as in :class:`SelectedTokens`, for the chunk's rows
    (``local_req`` is each row's request within the chunk) and requests.
    """
    layout = cfg.layout
    tl = build_timelines(index, req_user, req_ts, _timeline_config(cfg))
    rt, imp = tl.rt, tl.imp  # S_RT is capped at r: it is S_RT[:r]
    imp_nn_seq = Jagged.from_ranges(imp.values, imp.offsets[:-1] + np.maximum(0, imp.lengths() - cfg.imp_cap),
                                    np.minimum(imp.lengths(), cfg.imp_cap))
    # The chunk's segments in one token table; S_all's blocks cut from it as serving cuts them
    # (lifelong.transact.sequence_layout), S_RT[:r] once per request.
    table, segments = _segment_table({"ll": tl.ll, "rt": rt, "imp": imp_nn_seq})
    tokens = emb[torch.from_numpy(item_idx[table])]
    cand = emb[torch.from_numpy(np.asarray(row_item, dtype=np.int64))]
    cand_key = torch.from_numpy(np.asarray(local_req, dtype=np.int64))
    nn = {}
    for name in NN_BLOCKS:
        starts, lengths = segments[BLOCK_SOURCES[name]]
        picked = nn_block_index(layout, name, starts, lengths, cand_key, cand,
                                functools.partial(nn_topk_segments, tokens))
        nn[name] = _event_rows(table, picked)
    rt_rows = _event_rows(table, rt_block_index(layout, *segments["rt"]))
    # A user's event rows rise with time: sorting descending puts the newest first, padding last.
    neg_rows = np.sort(_left_aligned(imp, cfg.nal_negatives, take_newest=True), axis=1)[:, ::-1]
    return nn, rt_rows, neg_rows


def _chunk_bounds(index: EventIndex, req_user: np.ndarray, req_ts: np.ndarray, cfg: BuildConfig) -> list[tuple[int, int]]:
    """Consecutive request ranges ``[a, b)``, each at most ``cfg.request_chunk`` requests and
    ``cfg.chunk_tokens`` sequence tokens (a request longer than that alone is one chunk)."""
    ranges = build_timelines(index, req_user, req_ts, _timeline_config(cfg)).ranges
    tokens = sum(end - start for start, end in ranges.values())
    cum = np.r_[0, np.cumsum(tokens)]
    bounds, a, n_req = [], 0, req_user.size
    while a < n_req:
        by_tokens = int(np.searchsorted(cum, cum[a] + cfg.chunk_tokens, side="right")) - 1
        b = min(a + cfg.request_chunk, max(by_tokens, a + 1), n_req)
        bounds.append((a, b))
        a = b
    return bounds


def _selected_chunks(index: EventIndex, emb: torch.Tensor, item_idx: np.ndarray, req_user: np.ndarray,
                     req_ts: np.ndarray, row_req: np.ndarray, row_item: np.ndarray, cfg: BuildConfig,
                     shard_map: ShardMap) -> Iterator[tuple[tuple[int, int], tuple[int, int], tuple]]:
    """Each chunk's ``((a, b), (r0, r1), (nn, rt, nal_negatives))`` in order: its requests
    ``[a, b)``, its rows ``[r0, r1)`` and :func:`_select_chunk`'s result (engine ``shard_map``)."""
    n_req = req_user.size
    req_first = np.searchsorted(row_req, np.arange(n_req + 1))
    bounds = _chunk_bounds(index, req_user, req_ts, cfg)
    shards = [(req_user[a:b], req_ts[a:b], row_req[req_first[a]:req_first[b]] - a,
               row_item[req_first[a]:req_first[b]], cfg) for a, b in bounds]
    for (a, b), result in zip(bounds, shard_map(_select_chunk, (index, emb, item_idx), shards)):
        yield (a, b), (int(req_first[a]), int(req_first[b])), result


def select_tokens(index: EventIndex, emb: torch.Tensor, item_idx: np.ndarray, req_user: np.ndarray,
                  req_ts: np.ndarray, row_req: np.ndarray, row_item: np.ndarray, cfg: BuildConfig,
                  label: str = "rows", shard_map: ShardMap = map_local) -> SelectedTokens:
    """The S_all tokens of rows (request, candidate), from the full sequences before each request.

    Requests are cut into chunks of at most ``cfg.request_chunk`` requests and ``cfg.chunk_tokens``
    sequence tokens (consecutive requests, so users in order); each chunk is a shard that
    ``shard_map`` runs, and the shards are merged in order. The build itself streams the chunks
    to disk instead (:func:`build_split`); this holds every row's tokens in memory.

    Args:
        index: the events' :class:`EventIndex`.
        emb: (n_items, d) normalised item embeddings (what NN search compares).
        item_idx: item index of every event row.
        req_user, req_ts: user and time of each request.
        row_req: request of each row, non-decreasing.
        row_item: candidate item index of each row.
        cfg: block sizes and caps.
        label: progress-bar label.
        shard_map: the engine, :func:`~lifelong.core.engines.map_local` or :func:`~lifelong.core.engines.map_ray`.
    """
    layout = cfg.layout
    n_rows, n_req = row_req.size, req_user.size
    nn_rows = {b: np.full((n_rows, getattr(layout, b)), -1, dtype=np.int64) for b in NN_BLOCKS}
    rt_rows = np.full((n_req, layout.rt), -1, dtype=np.int64)
    neg_rows = np.full((n_req, cfg.nal_negatives), -1, dtype=np.int64)
    with progress(f"NN feature logging ({label})", total=n_req) as advance:
        for (a, b), (r0, r1), (nn, rt, neg) in _selected_chunks(index, emb, item_idx, req_user, req_ts, row_req,
                                                                row_item, cfg, shard_map):
            for name, picked in nn.items():
                nn_rows[name][r0:r1] = picked
            rt_rows[a:b] = rt
            neg_rows[a:b] = neg
            advance(b - a)
    return SelectedTokens(nn_rows, rt_rows, neg_rows)


def build_split(oracle: Path | None, items: ItemTable, cols: dict[str, np.ndarray], index: EventIndex,
                lo: int, hi: int, shown: np.ndarray, cfg: BuildConfig, label: str, out: Path,
                negative_rate: float = 1.0, shard_map: ShardMap = map_local,
                counters: EngagementCounters | None = None) -> dict:
    """Write the rows of shown events with ``lo <= ts < hi`` into ``out`` (one ``.npy`` per
    array), requests de-duplicated; their counts and label rates. With ``counters``, each row also
    gets its engagement counters as of its request (``counters.npy``, :mod:`lifelong.data.counters`).

    Rows without any head's label are kept with probability ``negative_rate`` and weighted
    ``1 / negative_rate``. ``oracle`` is the world's ``oracle.parquet`` (None for real data).
    ``shard_map`` is the engine that selects the tokens. The token arrays
    (most of the bytes: ~1 KB a row) go to disk chunk by chunk as they are selected, so memory
    holds one chunk's tokens, not the split's.
    """
    row_ev = np.flatnonzero(shown & (cols["ts_ms"] >= lo) & (cols["ts_ms"] < hi))
    any_label = (cols["action_mask"][row_ev] & sum(HEAD_BITS.values())) != 0
    weight = np.ones(row_ev.size, dtype=np.float32)
    if negative_rate < 1.0:
        keep = any_label | (np.random.default_rng(cfg.seed).random(row_ev.size) < negative_rate)
        row_ev, weight = row_ev[keep], np.where(any_label[keep], 1.0, 1.0 / negative_rate).astype(np.float32)
    user, req = cols["user_id"][row_ev], cols["request_id"][row_ev]
    # Rows are sorted by (user, ts, request): a request is a run of equal (user, request id).
    new_req = np.r_[True, (user[1:] != user[:-1]) | (req[1:] != req[:-1])] if row_ev.size else np.zeros(0, bool)
    req_first = np.flatnonzero(new_req)
    row_req = np.cumsum(new_req) - 1
    req_user, req_ts = user[req_first], cols["ts_ms"][row_ev][req_first]
    n_rows, n_req = row_ev.size, req_first.size
    layout = cfg.layout
    labels = (np.stack([(cols["action_mask"][row_ev] & HEAD_BITS[h]) != 0 for h in HEADS], axis=1).astype(np.uint8)
              if n_rows else np.zeros((0, len(HEADS)), np.uint8))
    arrays: dict[str, np.ndarray] = {
        "user_id": user.astype(np.int64),
        "item": cols["item_idx"][row_ev].astype(np.int32),
        "surface": cols["surface"][row_ev].astype(np.int8),
        "request": row_req.astype(np.int32),
        "ts_ms": cols["ts_ms"][row_ev],
        "weight": weight,
        "labels": labels,
        "req_id": req[req_first] if n_rows else np.zeros(0, np.int64),
        "req_user": req_user,
        "req_ts": req_ts,
    }
    if oracle is not None:
        arrays["oracle"] = _oracle_probs(oracle, cols, row_ev, items, lo, hi)
    if counters is not None:
        # As of the request's time, as its tokens are: a request spanning minutes (a KuaiRand
        # user-day) must not count its own earlier candidates.
        arrays["counters"] = counters.features(user, cols["item_idx"][row_ev], req_ts[row_req])
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", arr)
    del arrays
    shapes = {**{f"{b}_{f}": (n_rows, getattr(layout, b)) for b in NN_BLOCKS for f in TOKEN_DTYPES},
              **{f"rt_{f}": (n_req, layout.rt) for f in TOKEN_DTYPES},
              "nal_pos_item": (n_req, layout.rt), "nal_neg_item": (n_req, cfg.nal_negatives)}
    dtypes = {name: TOKEN_DTYPES[name.rsplit("_", 1)[1]] for name in shapes}
    with contextlib.ExitStack() as stack:
        sink = {name: stack.enter_context(NpyWriter(out / f"{name}.npy", dtypes[name], shape))
                for name, shape in shapes.items()}
        with progress(f"NN feature logging ({label})", total=n_req) as advance:
            for (a, b), _, (nn, rt, neg) in _selected_chunks(index, items.normalized(), cols["item_idx"], req_user,
                                                             req_ts, row_req, cols["item_idx"][row_ev], cfg, shard_map):
                for block, picked in nn.items():
                    for f, v in _gather_tokens(picked, cols).items():
                        sink[f"{block}_{f}"].write(v)
                rt_tok = _gather_tokens(rt, cols)
                for f, v in rt_tok.items():
                    sink[f"rt_{f}"].write(v)
                sink["nal_pos_item"].write(_nal_positives(rt_tok))
                sink["nal_neg_item"].write(_gather_tokens(neg, cols)["item"])
                advance(b - a)
    return {"rows": n_rows, "requests": n_req,
            "label_rates": dict(zip(HEADS, labels.mean(axis=0).round(4).tolist())) if n_rows else {}}


def _engagement_counters(cols: dict[str, np.ndarray], shown: np.ndarray, cutoff_ms: int) -> EngagementCounters:
    """Counters over every shown event, smoothed towards the head rates of those before the
    training cutoff (the evaluation period's rates are not known when the model is trained)."""
    labels = np.stack([(cols["action_mask"] & HEAD_BITS[h]) != 0 for h in HEADS], axis=1)
    before = shown & (cols["ts_ms"] < cutoff_ms)
    prior = labels[before].mean(axis=0) if before.any() else np.full(len(HEADS), 0.5)
    return EngagementCounters(cols["user_id"], cols["item_idx"], cols["ts_ms"], shown, labels, prior)


def _oracle_probs(path: Path, cols: dict[str, np.ndarray], row_ev: np.ndarray, items: ItemTable,
                  lo: int, hi: int) -> np.ndarray:
    """True head probabilities of each row, joined on (request id, item).

    The oracle file is streamed and only its rows with ``lo <= ts < hi`` (the split's window)
    are kept: one row per impression, it is as long as the events table.
    """
    names = ["request_id", "item_id", "ts_ms", *(f"p_{h}" for h in HEADS)]
    keys, probs = [], []
    for batch in iter_parquet_batches(path, names, batch_size=1 << 20):
        table = validate_table(pa.Table.from_batches([batch]), "oracle", path, columns=names)
        ts = table.column("ts_ms").to_numpy()
        keep = np.flatnonzero((ts >= lo) & (ts < hi))
        keys.append(table.column("request_id").to_numpy()[keep] * np.int64(items.item_id.size)
                    + items.index_of(table.column("item_id").to_numpy()[keep]))
        probs.append(np.stack([table.column(f"p_{h}").to_numpy()[keep] for h in HEADS], axis=1).astype(np.float32))
    okey, probs = np.concatenate(keys), np.concatenate(probs)
    rkey = cols["request_id"][row_ev] * np.int64(items.item_id.size) + cols["item_idx"][row_ev]
    order = np.argsort(okey, kind="stable")
    pos = order[np.minimum(np.searchsorted(okey[order], rkey), okey.size - 1)] if okey.size else np.zeros(rkey.size, int)
    found = okey[pos] == rkey if okey.size else np.zeros(rkey.size, bool)
    return np.where(found[:, None], probs[pos] if okey.size else np.nan, np.nan).astype(np.float32)


def build_rows(data: str | os.PathLike[str], out: str | os.PathLike[str], cfg: BuildConfig = BuildConfig(),
               engine: str = "local", ray_address: str | None = None) -> dict:
    """Build ``train/`` and ``eval/`` rows of a dataset directory into ``out`` (atomically).

    Args:
        data: a world or an ingested dataset directory.
        out: the rows directory to create.
        cfg: sizes and caps.
        engine: ``local`` (this process) or ``ray`` (one Ray task per chunk of requests); both
            write the same rows.
        ray_address: with ``ray``, the cluster to connect to [default: a local Ray].

    Returns:
        The metadata written to ``out/build.json`` (counts, rows/s, protocol, layout).

    Example::

        meta = build_rows("worlds/small", "datasets/small")
        print(meta["splits"]["train"]["rows"])
    """
    start = time.perf_counter()
    ds = load_dataset(data, with_oracle=False)
    items = ItemTable.from_dataset(ds)
    cols = _event_columns(ds.events, items)
    meta, oracle = ds.meta, Path(data) / "oracle.parquet"
    # The build reads the events through ``cols`` only: dropping the Arrow tables keeps one copy
    # of the events in memory, not two (the full `bench` world's events are 1.7 GB a copy).
    del ds
    pa.default_memory_pool().release_unused()
    # Opened before the output directory exists: an unreachable cluster leaves nothing behind.
    with open_engine(engine, ray_address) as shard_map:
        return _build_rows(meta, items, cols, oracle if oracle.exists() else None, data, out, cfg, shard_map, start)


def _event_columns(events: pa.Table, items: ItemTable) -> dict[str, np.ndarray]:
    """The events' columns the build reads, as numpy, and each event's item index."""
    cols = {name: events.column(name).to_numpy() for name in ("user_id", "ts_ms", "surface", "action_mask", "request_id")}
    cols["item_idx"] = items.index_of(events.column("item_id").to_numpy())
    return cols


def _build_rows(source_meta: dict, items: ItemTable, cols: dict[str, np.ndarray], oracle: Path | None,
                data: str | os.PathLike[str], out: str | os.PathLike[str], cfg: BuildConfig,
                shard_map: ShardMap, start: float) -> dict:
    """:func:`build_rows` once the dataset is read and the engine chosen."""
    n_events = cols["ts_ms"].size
    protocol = Protocol.from_meta(source_meta)
    if cfg.protocol_days is not None and n_events:
        protocol = Protocol.fit(int(cols["ts_ms"].min()), int(cols["ts_ms"].max()) + 1, *cfg.protocol_days)
    learned_until = source_meta.get("embedding_cutoff_ms", source_meta["protocol"]["cutoff_ms"]) \
        if source_meta.get("kind") == "ingest" else None
    if learned_until is not None and learned_until > protocol.cutoff_ms:
        raise DataError(data, f"its item embeddings were learned from events up to {utc_minute(learned_until)}, after this "
                              f"protocol's training cutoff {utc_minute(protocol.cutoff_ms)}: they have seen the evaluation "
                              "period. Ingest with the same --protocol (lifelong ingest ... --protocol "
                              f"{','.join(f'{d:g}' for d in cfg.protocol_days or ())}), then build")
    index = EventIndex(cols["user_id"], cols["ts_ms"], cols["action_mask"])
    has_impressions = bool(np.any(cols["action_mask"] & int(Action.IMPRESSION)))
    # Without impressions (MovieLens) every event is a shown item with its label.
    shown = (cols["action_mask"] & int(Action.IMPRESSION)) != 0 if has_impressions else np.ones(n_events, bool)
    meta: dict = {"kind": "rows", "data": str(Path(data).resolve()), "source_meta": source_meta,
                  "protocol": protocol.to_dict(), "heads": list(HEADS), "layout": asdict(cfg.layout),
                  "config": {k: v for k, v in asdict(cfg).items() if k != "layout"},
                  "has_impressions": has_impressions, "has_oracle": oracle is not None,
                  "n_items": int(items.item_id.size), "lifelong_version": lifelong.__version__, "splits": {}}
    counters = _engagement_counters(cols, shown, protocol.cutoff_ms)
    meta["counters"] = {"features": list(COUNTER_FEATURES), "smoothing": SMOOTHING,
                        "prior": dict(zip(HEADS, counters.prior.round(6).tolist()))}
    with atomic_output_dir(out) as tmp:
        (tmp / "items").mkdir()
        for name, arr in (("item_id", items.item_id), ("emb_int8", items.emb_int8),
                          ("author_id", items.author_id), ("topic_id", items.topic_id)):
            np.save(tmp / "items" / f"{name}.npy", arr)
        for split, (lo, hi) in (("train", (protocol.train_start_ms, protocol.cutoff_ms)),
                                ("eval", (protocol.eval_start_ms, protocol.eval_end_ms))):
            t0 = time.perf_counter()
            (tmp / split).mkdir()
            stats = build_split(oracle, items, cols, index, lo, hi, shown, cfg, split, tmp / split,
                                cfg.train_negative_rate if split == "train" else 1.0, shard_map, counters)
            seconds = time.perf_counter() - t0
            meta["splits"][split] = {"rows": stats["rows"], "requests": stats["requests"], "seconds": round(seconds, 2),
                                     "rows_per_s": round(stats["rows"] / max(seconds, 1e-9)),
                                     "label_rates": stats["label_rates"]}
        meta["seconds"] = round(time.perf_counter() - start, 2)
        write_json(meta, tmp / "build.json")
    return meta
