"""Summaries of a dataset directory: sizes, action rates, history lengths, surfaces, oracle.

Used by ``lifelong inspect`` and by the quickstart. Reads only the columns it needs, through
the validating reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from lifelong.core.atomic import write_atomic
from lifelong.core.metrics import DEFAULT_HEAD_WEIGHTS, final_score, hit_at_k, hit_at_k_random
from lifelong.core.progress import progress
from lifelong.data.io import read_meta, read_table
from lifelong.data.protocol import DAY_MS, Protocol
from lifelong.data.schema import EXPLICIT_BITS, HEAD_BITS, HEADS, SURFACES, Action


@dataclass
class OracleCheck:
    """HIT@K on the evaluation day: ranking by the oracle's true probabilities vs random order."""

    k: int
    requests: int
    users: int
    oracle: dict[str, float]
    random: dict[str, float]


@dataclass
class InspectReport:
    """What ``lifelong inspect`` prints. Percentiles are over users."""

    path: Path
    meta: dict
    users: int
    items: int
    events: int
    impressions: int
    explicit: int
    span_days: float
    action_rates: dict[str, float]
    surface_shares: dict[str, float]
    history_lengths: np.ndarray = field(repr=False)
    impression_lengths: np.ndarray = field(repr=False)
    oracle: OracleCheck | None = None

    def percentiles(self, lengths: np.ndarray) -> tuple[int, int, int]:
        if lengths.size == 0:
            return (0, 0, 0)
        p50, p90 = np.percentile(lengths, [50, 90])
        return int(round(p50)), int(round(p90)), int(lengths.max())


def _per_user_counts(user_id: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Count of flagged events per user (every user, zero included), users grouped in order."""
    starts = np.flatnonzero(np.r_[True, user_id[1:] != user_id[:-1]]) if user_id.size else np.array([], int)
    if starts.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.add.reduceat(flags.astype(np.int64), starts)


def oracle_check(directory: Path, protocol: Protocol, k: int = 3) -> OracleCheck:
    """Rank each evaluation-day request by ``S = Σ w_h p_h`` on the oracle and score HIT@K."""
    oracle = read_table(directory / "oracle.parquet", "oracle")  # noqa: F841 (read by duckdb)
    events = read_table(directory / "events.parquet", "events",  # noqa: F841 (read by duckdb)
                        columns=["user_id", "item_id", "ts_ms", "action_mask", "request_id"])
    lo, hi = protocol.eval_start_ms, protocol.eval_end_ms
    # duckdb reads the two Arrow tables above through their Python variable names.
    joined = duckdb.sql(
        f"""
        SELECT o.*, e.action_mask FROM oracle o JOIN events e USING (request_id, item_id)
        WHERE o.ts_ms >= {lo} AND o.ts_ms < {hi} AND (e.action_mask & {int(Action.IMPRESSION)}) <> 0
        """
    ).arrow()
    if isinstance(joined, pa.RecordBatchReader):
        joined = joined.read_all()
    groups = joined.column("request_id").to_numpy()
    users = joined.column("user_id").to_numpy()
    mask = joined.column("action_mask").to_numpy().astype(np.int64)
    score = final_score({h: joined.column(f"p_{h}").to_numpy() for h in HEADS}, DEFAULT_HEAD_WEIGHTS)
    oracle_hit, random_hit = {}, {}
    for head in ("repin", "hide"):
        labels = (mask & HEAD_BITS[head]) != 0
        oracle_hit[head] = hit_at_k(groups, users, score, labels, k)
        random_hit[head] = hit_at_k_random(groups, users, labels, k)
    return OracleCheck(k, int(np.unique(groups).size), int(np.unique(users).size), oracle_hit, random_hit)


def inspect_dataset(directory: str | os.PathLike[str]) -> InspectReport:
    """Summarise a dataset directory (a simulated world or an ingested real dataset).

    Example::

        report = inspect_dataset("worlds/small")
        print(report.percentiles(report.history_lengths))   # LL length p50, p90, max
    """
    directory = Path(directory)
    meta = read_meta(directory)
    with progress(f"inspecting {directory.name}", total=None):
        return _inspect(directory, meta)


def _inspect(directory: Path, meta: dict) -> InspectReport:
    events = read_table(directory / "events.parquet", "events",  # noqa: F841 (read by duckdb)
                        columns=["user_id", "ts_ms", "surface", "action_mask"])
    items = read_table(directory / "items.parquet", "items")
    user_id = events.column("user_id").to_numpy()
    mask = events.column("action_mask").to_numpy()
    ts = events.column("ts_ms").to_numpy()
    n = mask.size
    explicit = (mask & EXPLICIT_BITS) != 0
    bare_impression = mask == int(Action.IMPRESSION)
    rates = {a.name.lower(): float(((mask & int(a)) != 0).mean()) if n else 0.0 for a in Action}
    surf = np.bincount(events.column("surface").to_numpy().astype(np.int64), minlength=len(SURFACES))
    report = InspectReport(
        path=directory,
        meta=meta,
        users=int(np.unique(user_id).size),
        items=items.num_rows,
        events=n,
        impressions=int(((mask & int(Action.IMPRESSION)) != 0).sum()),
        explicit=int(explicit.sum()),
        span_days=float((ts.max() - ts.min()) / DAY_MS) if n else 0.0,
        action_rates={k: v for k, v in rates.items() if v > 0},
        surface_shares={SURFACES[i]: float(c / max(n, 1)) for i, c in enumerate(surf) if c},
        history_lengths=_per_user_counts(user_id, explicit),
        impression_lengths=_per_user_counts(user_id, bare_impression),
    )
    if (directory / "oracle.parquet").exists() and "protocol" in meta:
        report.oracle = oracle_check(directory, Protocol.from_meta(meta))
    return report


def plot_history_lengths(report: InspectReport, png: str | os.PathLike[str]) -> Path:
    """Write a log-scale histogram of per-user explicit-history (LL) and bare-impression lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, lengths, title in ((axes[0], report.history_lengths, "explicit actions per user (S_LL source)"),
                               (axes[1], report.impression_lengths, "bare impressions per user (S_imp source)")):
        positive = lengths[lengths > 0]
        if positive.size:
            bins = np.logspace(0, np.log10(positive.max() + 1), 40)
            ax.hist(positive, bins=bins, color="#3b6ea8")
            ax.set_xscale("log")
            p50, p90, mx = report.percentiles(lengths)
            for value, style in ((p50, "-"), (p90, "--")):
                ax.axvline(max(value, 1), color="#c0392b", linestyle=style, linewidth=1)
            ax.text(0.98, 0.95, f"p50 {p50:,}\np90 {p90:,}\nmax {mx:,}", transform=ax.transAxes,
                    ha="right", va="top", fontsize=9)
        else:
            ax.text(0.5, 0.5, "none", transform=ax.transAxes, ha="center")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("events (log scale)")
        ax.set_ylabel("users")
    fig.suptitle(f"{report.path.name}: {report.users:,} users, {report.events:,} events", fontsize=11)
    fig.tight_layout()
    try:
        write_atomic(png, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return png
