"""Simulate a world and write it: the orchestration of catalogue, users and requests.

Users are simulated in fixed blocks of :data:`CHUNK_USERS`, each with its own random stream
spawned from the config seed (``SeedSequence``), so a world depends on nothing but its seed
and configuration, and memory is bounded by one block. :func:`simulate_to` streams each block
to Parquet inside an atomic output directory (use it for the large presets);
:func:`simulate` keeps everything in memory and :func:`write_world` writes it.

Example::

    >>> from lifelong.data.world import load_config, simulate
    >>> world = simulate(load_config("tiny"))
    >>> world.events.num_rows == world.oracle.num_rows
    True
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import lifelong
from lifelong.core.errors import ConfigError
from lifelong.core.progress import progress
from lifelong.data.io import ROW_GROUP_SIZE, atomic_output_dir, parquet_writer, write_json, write_parquet
from lifelong.data.protocol import Protocol
from lifelong.data.schema import EVENTS_SCHEMA, EXPLICIT_BITS, HEAD_BITS, HEADS, ORACLE_SCHEMA, USERS_SCHEMA
from lifelong.data.users import users_from_events
from lifelong.data.world.catalog import Catalog, make_catalog
from lifelong.data.world.config import WorldConfig, validate
from lifelong.data.world.population import Interests, Population, make_interests, make_schedule
from lifelong.data.world.requests import SOURCE_LABELS, Responses, simulate_requests

CHUNK_USERS = 512
"""Users per block. Part of the sampling definition: each block has its own random stream."""



@dataclass
class World:
    """A simulated world in memory.

    Args:
        items, events, users, oracle: the tables in their declared schemas.
        meta: the content of ``world.json``.
    """

    items: pa.Table
    events: pa.Table
    users: pa.Table
    oracle: pa.Table
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Chunk:
    events: pa.Table
    oracle: pa.Table
    users: pa.Table
    explicit_before_eval: np.ndarray
    source_counts: np.ndarray
    head_bits: np.ndarray
    head_p: np.ndarray
    n_requests: int


def _chunk_tables(cfg: WorldConfig, pop: Population, resp: Responses, request_base: int,
                  protocol: Protocol) -> _Chunk:
    sch = pop.schedule
    n = cfg.retrieval.items_per_request
    req_user = pop.user_ids[sch.user]
    events = pa.Table.from_arrays(
        [
            pa.array(np.repeat(req_user, n)),
            pa.array(resp.item),
            pa.array(np.repeat(sch.ts_ms, n)),
            pa.array(np.repeat(sch.surface, n)),
            pa.array(resp.action_mask),
            pa.array(resp.dwell_ms),
            pa.array(np.repeat(request_base + np.arange(sch.ts_ms.size, dtype=np.int64), n)),
        ],
        schema=EVENTS_SCHEMA,
    )
    oracle = pa.Table.from_arrays(
        [events.column("user_id"), events.column("item_id"), events.column("ts_ms"), events.column("request_id")]
        + [pa.array(resp.probs[h]) for h in range(len(HEADS))],
        schema=ORACLE_SCHEMA,
    )
    explicit = (resp.action_mask & EXPLICIT_BITS) != 0
    before = np.repeat(sch.ts_ms < protocol.eval_start_ms, n)
    local_user = np.repeat(sch.user, n)
    per_user = np.bincount(local_user[explicit & before], minlength=pop.user_ids.size)
    bits = np.array([int(((resp.action_mask & HEAD_BITS[h]) != 0).sum()) for h in HEADS], dtype=np.int64)
    return _Chunk(events=events, oracle=oracle, users=users_from_events(events), explicit_before_eval=per_user,
                  source_counts=resp.source_counts, head_bits=bits,
                  head_p=resp.probs.sum(axis=1, dtype=np.float64), n_requests=int(sch.ts_ms.size))


def _world_streams(cfg: WorldConfig) -> tuple[np.random.Generator, list[np.random.SeedSequence]]:
    world_seq, users_seq = np.random.SeedSequence(cfg.seed).spawn(2)
    n_chunks = -(-cfg.users.n_users // CHUNK_USERS)
    return np.random.Generator(np.random.PCG64(world_seq)), users_seq.spawn(n_chunks)


@dataclass
class WorldDraws:
    """What every user block of a world draws from: the catalogue, trending topics, the noise key.

    Args:
        catalog: the catalogue.
        trending: (days, trending_per_day) trending topics of each day.
        successor: (T,) the next topic of each topic, a permutation (``sessions.focus_next``).
        noise_key: key of the persistent user-item noise.
        protocol: the protocol dates.
        chunk_seqs: the random stream of each block of :data:`CHUNK_USERS` users.
    """

    catalog: Catalog
    trending: np.ndarray
    successor: np.ndarray
    noise_key: np.uint64
    protocol: Protocol
    chunk_seqs: list[np.random.SeedSequence]


def world_draws(cfg: WorldConfig) -> WorldDraws:
    """The world-level draws of ``cfg`` (validated), exactly as :func:`simulate` makes them."""
    validate(cfg)
    world_rng, chunk_seqs = _world_streams(cfg)
    catalog = make_catalog(cfg, world_rng)
    trending = world_rng.choice(catalog.topic_pop.size, (cfg.days, cfg.sessions.trending_per_day),
                                p=catalog.topic_pop)
    noise_key = np.uint64(world_rng.integers(0, 2**63))
    # Drawn last, so that every earlier draw is what it was before successors existed.
    successor = world_rng.permutation(catalog.topic_pop.size)
    return WorldDraws(catalog=catalog, trending=trending, successor=successor, noise_key=noise_key,
                      protocol=Protocol.fit(cfg.start_ms, cfg.end_ms), chunk_seqs=chunk_seqs)


def chunk_population(cfg: WorldConfig, draws: WorldDraws, c: int,
                     interest_days: int | None = None) -> tuple[Population, np.random.Generator, Interests]:
    """Block ``c``'s users, and its stream positioned where the request loop starts drawing.

    Args:
        cfg: the world configuration.
        draws: from :func:`world_draws`.
        c: the block index.
        interest_days: also draw the interests over this many days (at least ``cfg.days``):
            the world's periods come out identical (they are drawn period by period) and the
            random walk continues past its end. Returned third; else the world's interests.
    """
    rng = np.random.Generator(np.random.PCG64(draws.chunk_seqs[c]))
    lo = c * CHUNK_USERS
    n_users = min(CHUNK_USERS, cfg.users.n_users - lo)
    before = rng.bit_generator.state
    interests = make_interests(cfg, draws.catalog.topic_pop, n_users, rng)
    extended = interests
    if interest_days is not None and interest_days > cfg.days:
        again = np.random.Generator(np.random.PCG64())
        again.bit_generator.state = before
        extended = make_interests(dataclasses.replace(cfg, days=interest_days), draws.catalog.topic_pop, n_users,
                                  again)
    schedule = make_schedule(cfg, interests, draws.trending, draws.successor, n_users, rng)
    bias = (cfg.users.bias_std * rng.standard_normal(n_users)).astype(np.float32)
    pop = Population(user_ids=np.arange(lo, lo + n_users, dtype=np.int64), bias=bias,
                     interests=interests, schedule=schedule)
    return pop, rng, extended


def _generate(cfg: WorldConfig) -> tuple[Catalog, Protocol, Iterator[_Chunk]]:
    """The catalogue, the protocol, and a lazy stream of user blocks."""
    draws = world_draws(cfg)
    catalog, protocol = draws.catalog, draws.protocol
    need = cfg.users.min_explicit_before_eval

    def chunks() -> Iterator[_Chunk]:
        request_base = 0
        with progress("simulating users", total=cfg.users.n_users) as advance:
            for c in range(len(draws.chunk_seqs)):
                pop, rng, _ = chunk_population(cfg, draws, c)
                lo, n_users = int(pop.user_ids[0]), pop.user_ids.size
                resp = simulate_requests(cfg, catalog, pop, draws.noise_key, rng)
                chunk = _chunk_tables(cfg, pop, resp, request_base, protocol)
                short = chunk.explicit_before_eval < need
                if short.any():
                    raise ConfigError(
                        f"config key 'users.min_explicit_before_eval': {int(short.sum())} of the first "
                        f"{lo + n_users} users have fewer than {need} explicit events before the evaluation "
                        f"day (fewest: {int(chunk.explicit_before_eval.min())}); raise sessions.per_day or "
                        f"users.activity_min")
                request_base += pop.schedule.ts_ms.size
                advance(n_users)
                yield chunk

    return catalog, protocol, chunks()


class _Stats:
    """Running totals over blocks for ``world.json``."""

    def __init__(self) -> None:
        self.sources = np.zeros(len(SOURCE_LABELS), dtype=np.int64)
        self.head_bits = np.zeros(len(HEADS), dtype=np.int64)
        self.head_p = np.zeros(len(HEADS), dtype=np.float64)
        self.explicit: list[np.ndarray] = []
        self.per_user: list[np.ndarray] = []
        self.before_eval: list[np.ndarray] = []
        self.users = self.events = self.requests = 0

    def add(self, chunk: _Chunk) -> None:
        self.sources += chunk.source_counts
        self.head_bits += chunk.head_bits
        self.head_p += chunk.head_p
        self.explicit.append(chunk.users.column("n_explicit").to_numpy())
        self.per_user.append(chunk.users.column("n_events").to_numpy())
        self.before_eval.append(chunk.explicit_before_eval)
        self.users += chunk.users.num_rows
        self.events += chunk.events.num_rows
        self.requests += chunk.n_requests

    def meta(self, cfg: WorldConfig, catalog: Catalog, protocol: Protocol) -> dict[str, Any]:
        def joined(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)

        explicit, before = joined(self.explicit), joined(self.before_eval)
        shown = max(int(self.sources.sum()), 1)
        shares = {label: round(float(c) / shown, 6) for label, c in zip(SOURCE_LABELS, self.sources)}

        def quantiles(x: np.ndarray) -> dict[str, int]:
            if x.size == 0:
                return {"min": 0, "p50": 0, "p90": 0, "max": 0}
            p50, p90 = np.percentile(x, [50, 90])
            return {"min": int(x.min()), "p50": int(round(p50)), "p90": int(round(p90)), "max": int(x.max())}

        events = max(self.events, 1)
        return {
            "kind": "world",
            "preset": cfg.preset,
            "seed": cfg.seed,
            "config": cfg.to_dict(),
            "protocol": protocol.to_dict(),
            "lifelong_version": lifelong.__version__,
            "start_ms": cfg.start_ms,
            "end_ms": cfg.end_ms,
            "counts": {"users": self.users, "items": catalog.n_items, "events": self.events,
                       "impressions": self.events, "explicit": int(explicit.sum()), "requests": self.requests},
            "retrieval_mix": {"shares": shares, "long_term_not_recent": shares["long_term_not_recent"]},
            "heads": {h: {"rate": round(float(b) / events, 6), "mean_p": round(float(p) / events, 6)}
                      for h, b, p in zip(HEADS, self.head_bits, self.head_p)},
            "events_per_user": quantiles(joined(self.per_user)),
            "explicit_per_user": quantiles(explicit),
            "explicit_before_eval_per_user": quantiles(before),
            "simulator": {"chunk_users": CHUNK_USERS},
        }


def simulate(cfg: WorldConfig) -> World:
    """Simulate a world in memory.

    Args:
        cfg: a configuration, usually from :func:`load_config`.

    Raises:
        ConfigError: the configuration is invalid, or ``users.min_explicit_before_eval`` is
            not reached.

    Example::

        >>> from lifelong.data.world import load_config, simulate
        >>> world = simulate(load_config("tiny", overrides=["seed=1"]))
        >>> world.meta["counts"]["items"]
        500
    """
    catalog, protocol, chunks = _generate(cfg)
    stats = _Stats()
    events, oracle, users = [], [], []
    for chunk in chunks:
        stats.add(chunk)
        events.append(chunk.events)
        oracle.append(chunk.oracle)
        users.append(chunk.users)

    def concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
        return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()

    return World(items=catalog.table, events=concat(events, EVENTS_SCHEMA), users=concat(users, USERS_SCHEMA),
                 oracle=concat(oracle, ORACLE_SCHEMA), meta=stats.meta(cfg, catalog, protocol))


def write_world(world: World, out_dir: str | os.PathLike[str]) -> Path:
    """Write a world's tables and ``world.json`` atomically.

    Args:
        world: from :func:`simulate`.
        out_dir: the directory to create or replace.

    Example::

        >>> write_world(simulate(load_config("tiny")), "worlds/tiny")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        for name in ("items", "events", "users", "oracle"):
            write_parquet(getattr(world, name), tmp / f"{name}.parquet")
        write_json(world.meta, tmp / "world.json")
    return out_dir


def simulate_to(cfg: WorldConfig, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Simulate a world block by block, streaming it to ``out_dir`` (atomic; bounded memory).

    Args:
        cfg: a configuration, usually from :func:`load_config`.
        out_dir: the directory to create or replace.

    Returns:
        The content written to ``world.json``.

    Example::

        >>> meta = simulate_to(load_config("lifelong"), "worlds/lifelong")  # doctest: +SKIP
    """
    catalog, protocol, chunks = _generate(cfg)
    stats = _Stats()
    with atomic_output_dir(out_dir) as tmp:
        write_parquet(catalog.table, tmp / "items.parquet")
        users = []
        with (parquet_writer(tmp / "events.parquet", EVENTS_SCHEMA) as ev,
              parquet_writer(tmp / "oracle.parquet", ORACLE_SCHEMA) as orc):
            for chunk in chunks:
                stats.add(chunk)
                ev.write_table(chunk.events, row_group_size=ROW_GROUP_SIZE)
                orc.write_table(chunk.oracle, row_group_size=ROW_GROUP_SIZE)
                users.append(chunk.users)
        write_parquet(pa.concat_tables(users) if users else USERS_SCHEMA.empty_table(), tmp / "users.parquet")
        meta = stats.meta(cfg, catalog, protocol)
        write_json(meta, tmp / "world.json")
    return meta
