"""Collision-less embedding index: batched lookups/s and inserts/s, and memory per id, side by side.

For each size N (default 1e6 and 1e7 random int64 ids) and one batch size (default 65,536), all
single-threaded on this process:

- **cuckoo**: :class:`CuckooIndex` with its default configuration, grown automatically from
  64 buckets by inserting the N ids batch by batch; then batched lookups of random present ids
  (hits), of absent ids (misses), and lookup + gather of the dim-16 fp32 rows;
- **dict**: a Python dict id -> row filled and queried batch by batch (``dict.update`` /
  ``[d.get(k, -1) for k in batch.tolist()]``, conversions included); above ``--dict-max`` ids
  it holds a random sample of ``--dict-max`` ids instead (it is slow and ~100 bytes per id);
- **modulo**: the fixed-size table of ``HashedEmbedding``: ``ids % N`` (no insert; it never
  says an id is absent, and a share of the ids collide: reported).

Memory: bytes per id of the index alone; of the serving form, index + exactly N rows, against
the raw rows (dim 16 fp32, N x 64 bytes); and of the trainer's :class:`EmbeddingTable` built by
``admit`` (index, rows with their growth slack, 8-byte last-update times), grown automatically
with the default ``row_growth`` and sized up front by ``reserve(N)``. Its Adagrad state (one
more fp32 per value) is counted apart: it is the optimizer's, and serving never holds it.
Targets: >= 10M batched lookups/s single-threaded at 1e6 ids; memory <= 1.5x raw rows.

    .venv/bin/python benchmarks/bench_cuckoo.py [--sizes 1000000 10000000] [--batch 65536] [--dict-max 2000000]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Callable

import numba
import numpy as np

from lifelong.bench.machine import cpu_model
from lifelong.tables.cuckoo import CuckooIndex
from lifelong.tables.table import EmbeddingTable, TableConfig

DIM = 16


def best_rate(fn: Callable[[], object], n_items: int, repeats: int = 3) -> float:
    """Items per second of the fastest of ``repeats`` runs of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_items / best


def batches(a: np.ndarray, batch: int) -> list[np.ndarray]:
    return [a[i: i + batch] for i in range(0, a.size, batch)]


def dict_nbytes(d: dict[int, int]) -> int:
    """The dict plus its key and value objects (ids and rows are distinct ints, one object each)."""
    return sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in d.items())


def bench_cuckoo(ids: np.ndarray, q_batches: list, miss_batches: list, rows: np.ndarray, batch: int) -> dict:
    index = CuckooIndex()
    t0 = time.perf_counter()
    for b in batches(ids, batch):
        index.insert(b)
    out = {"insert": ids.size / (time.perf_counter() - t0)}
    n_queries = sum(b.size for b in q_batches)
    out["hit"] = best_rate(lambda: [index.lookup(b) for b in q_batches], n_queries)
    out["miss"] = best_rate(lambda: [index.lookup(b) for b in miss_batches], n_queries)
    out["gather"] = best_rate(lambda: [rows[index.lookup(b)] for b in q_batches], n_queries)
    assert (index.lookup(ids[:batch]) == np.arange(min(batch, ids.size))).all()
    return {**out, "bytes": index.nbytes, "load": index.load, "buckets": index.n_buckets}


def bench_dict(sample: np.ndarray, queries: np.ndarray, miss_batches: list, batch: int) -> dict:
    d: dict[int, int] = {}
    t0 = time.perf_counter()
    for start in range(0, sample.size, batch):
        d.update(zip(sample[start: start + batch].tolist(), range(start, start + batch)))
    out = {"insert": sample.size / (time.perf_counter() - t0)}
    q_batches = batches(queries, batch)
    # One run each: at ~100 ns per id a repeat would add seconds and change nothing.
    out["hit"] = best_rate(lambda: [np.array([d.get(k, -1) for k in b.tolist()]) for b in q_batches], queries.size, 1)
    out["miss"] = best_rate(lambda: [np.array([d.get(k, -1) for k in b.tolist()]) for b in miss_batches],
                            queries.size, 1)
    return {**out, "bytes_per_id": dict_nbytes(d) / sample.size}


def bench_modulo(ids: np.ndarray, q_batches: list, rows: np.ndarray) -> dict:
    n, n_queries = ids.size, sum(b.size for b in q_batches)
    _, counts = np.unique(ids % n, return_counts=True)
    return {"lookup": best_rate(lambda: [b % n for b in q_batches], n_queries),
            "gather": best_rate(lambda: [rows[b % n] for b in q_batches], n_queries),
            "collide": counts[counts > 1].sum() / n}


def bench_table(ids: np.ndarray, batch: int, reserve: bool) -> dict:
    table = EmbeddingTable(TableConfig(dim=DIM))
    t0 = time.perf_counter()
    if reserve:
        table.reserve(ids.size)
    for b in batches(ids, batch):
        table.admit(b, now_ms=0)
    admit = ids.size / (time.perf_counter() - t0)
    opt_bytes = sum(a.nbytes for a in table.state.values())
    return {"admit": admit, "bytes": table.nbytes - opt_bytes, "opt_bytes": opt_bytes, "capacity": table.capacity}


def bench_size(n: int, batch: int, dict_max: int, n_queries: int, rng: np.random.Generator) -> tuple[list, list]:
    ids = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    q_batches = batches(ids[rng.integers(0, n, n_queries)], batch)
    # Absent but for a ~1e-12 chance.
    miss_batches = batches(rng.integers(-2**63, 2**63 - 1, n_queries, dtype=np.int64), batch)
    rows = np.zeros((n, DIM), dtype=np.float32)  # raw rows, for the gathers
    c = bench_cuckoo(ids, q_batches, miss_batches, rows, batch)
    mod = bench_modulo(ids, q_batches, rows)
    del rows
    m = min(n, dict_max)
    sample = ids if m == n else ids[rng.choice(n, m, replace=False)]
    d = bench_dict(sample, sample[rng.integers(0, m, n_queries)], miss_batches, batch)
    del sample
    gc.collect()
    t = bench_table(ids, batch, reserve=False)
    gc.collect()
    r = bench_table(ids, batch, reserve=True)
    gc.collect()

    dict_note = "" if m == n else f" (sample of {m:,})"

    def ms(rate: float) -> str:
        return f"{rate / 1e6:,.2f}"

    speed = [
        (n, "insert (new ids, growing)", ms(c["insert"]), ms(d["insert"]) + dict_note, "n/a",
         f"{c['insert'] / d['insert']:.1f}x", ""),
        (n, "lookup (hits)", ms(c["hit"]), ms(d["hit"]) + dict_note, ms(mod["lookup"]),
         f"{c['hit'] / d['hit']:.1f}x", f"{c['hit'] / mod['lookup']:.2f}x"),
        (n, "lookup (misses)", ms(c["miss"]), ms(d["miss"]) + dict_note, "n/a", f"{c['miss'] / d['miss']:.1f}x", ""),
        (n, f"lookup + gather dim-{DIM} rows", ms(c["gather"]), "", ms(mod["gather"]), "",
         f"{c['gather'] / mod['gather']:.2f}x"),
        (n, "EmbeddingTable.admit (new ids: insert + init rows)", ms(t["admit"]), "", "", "", ""),
        (n, "EmbeddingTable.admit after reserve(N)", ms(r["admit"]), "", "", "", ""),
    ]
    raw = DIM * 4

    def table_cell(x: dict) -> str:
        return f"{x['bytes'] / n:.1f} = {x['bytes'] / n / raw:.2f}x (row capacity {x['capacity'] / n:.2f}x)"

    memory = [(n, f"{c['bytes'] / n:.1f}", f"{c['load']:.2f} ({c['buckets']:,} buckets)",
               f"{(c['bytes'] / n + raw) / raw:.2f}x", table_cell(t), table_cell(r), f"+{t['opt_bytes'] / n:.1f}",
               f"{d['bytes_per_id']:.0f}{dict_note}", f"0 ({mod['collide']:.1%} of ids share a row)")]
    return speed, memory


def markdown(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{c:,}" if isinstance(c, int) else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--dict-max", type=int, default=2_000_000)
    parser.add_argument("--queries", type=int, default=2**21, help="lookups per measurement")
    args = parser.parse_args()

    print(f"# bench_cuckoo — nproc {os.cpu_count()}, {cpu_model()}, Python {platform.python_version()}, "
          f"numpy {np.__version__}, numba {numba.__version__}; single thread; batch {args.batch:,}; "
          f"{args.queries:,} queries per lookup measurement (best of 3; dict: 1 run)\n")
    t0 = time.perf_counter()
    warm = CuckooIndex()
    warm.lookup(warm.insert(np.arange(10)))
    warm.remove([1])
    EmbeddingTable(TableConfig(dim=DIM)).admit(np.arange(10))
    print(f"first calls (numba compile or cache load): {time.perf_counter() - t0:.2f} s\n")

    rng = np.random.default_rng(0)
    speed, memory = [], []
    for n in args.sizes:
        s, m = bench_size(n, args.batch, args.dict_max, args.queries, rng)
        speed += s
        memory += m
    print("Throughput, millions of ids per second:\n")
    print(markdown(("ids", "operation", "cuckoo", "dict", "modulo", "cuckoo / dict", "cuckoo / modulo"), speed))
    print(f"\nMemory, bytes per id (raw dim-{DIM} fp32 row = {DIM * 4} B):\n")
    print(markdown(("ids", "cuckoo index", "load", "serving: index + exact rows / raw rows",
                    "EmbeddingTable grown (index, rows, timestamps) / raw rows", "EmbeddingTable after reserve(N)",
                    "Adagrad state", "dict", "modulo index"), memory))


if __name__ == "__main__":
    main()
