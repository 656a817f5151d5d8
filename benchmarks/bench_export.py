"""DV365 export and reads: users/s written and read through the versioned store, LMDB vs Redis.

The tower is replaced by precomputed random embeddings (``--users`` x ``--rows`` x ``--dim``
fp32, default the tower's (66, 32)), so that the figures are the export's own cost: 4-bit
quantization, int64 word packing, the store writes, the switch and garbage collection. For each
backend (LMDB in a temporary directory; Redis on a private ``redis-server`` on 127.0.0.1, if
one is on PATH) it times, best of ``--repeats``:

- **export**: :func:`export_embeddings` of all users (a new version each time, ``keep=2``);
- **read**: :meth:`EmbeddingReader.get` (pointer, one multi-get, dequantize) of random users in
  batches of 1, 64 and 512, as requests per second and users per second.

Prints a markdown table, the bytes a user takes against fp32, and the machine.

    .venv/bin/python benchmarks/bench_export.py [--users 20000] [--rows 66] [--dim 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from lifelong.bench.machine import cpu_model
from lifelong.core.processes import free_port, stop_process
from lifelong.core.quantization import compression_ratio
from lifelong.dv365.export import EmbeddingReader, ExportConfig, export_embeddings


class PrecomputedTower:
    """Hands out rows of a fixed array: the export's cost without a tower's."""

    def __init__(self, emb: np.ndarray):
        self.emb = emb

    def embed_users(self, world_dir, user_ids, as_of_ms, gap_ms=None):
        return self.emb[user_ids]


def start_redis() -> tuple[subprocess.Popen, str] | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(url: str, emb: np.ndarray, repeats: int, batch_users: int) -> dict[str, float]:
    users = np.arange(emb.shape[0])
    tower = PrecomputedTower(emb)
    cfg = ExportConfig(batch_users=batch_users)
    result = {"export": emb.shape[0] / best(lambda: export_embeddings(tower, ".", url, 0, cfg, user_ids=users),
                                            repeats)}
    rng = np.random.default_rng(0)
    with EmbeddingReader(url) as reader:
        for batch in (1, 64, 512):
            n_requests = max(20, 2_000 // batch)
            requests = [rng.choice(users, batch, replace=False) for _ in range(n_requests)]
            seconds = best(lambda requests=requests: [reader.get(r) for r in requests], repeats)
            result[f"read {batch}"] = n_requests / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=66)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch-users", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    emb = np.random.default_rng(0).standard_normal((args.users, args.rows, args.dim)).astype(np.float32)
    backends = {}
    redis = start_redis()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            backends["LMDB"] = bench(f"lmdb://{tmp}/emb", emb, args.repeats, args.batch_users)
            if redis is not None:
                backends["Redis"] = bench(redis[1], emb, args.repeats, args.batch_users)
        finally:
            if redis is not None:
                stop_process(redis[0])
    print(f"{args.users:,} users x ({args.rows}, {args.dim}) fp32; export batches of {args.batch_users}; "
          f"best of {args.repeats}")
    print("| backend | export users/s | read 1 user (req/s) | read 64 (req/s, users/s) | read 512 (req/s, users/s) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in backends.items():
        print(f"| {name} | {r['export']:,.0f} | {r['read 1']:,.0f} | {r['read 64']:,.0f}, {64 * r['read 64']:,.0f} | "
              f"{r['read 512']:,.0f}, {512 * r['read 512']:,.0f} |")
    words = -(-args.dim // 16) + 1
    print(f"bytes a user: {8 * args.rows * words:,} (int64 words: {args.rows} x {words}) vs fp32 "
          f"{4 * args.rows * args.dim:,}: {4 * args.dim / (8 * words):.2f}x; paper shape 200 x 256: "
          f"{compression_ratio((200, 256)):.2f}x")
    print(f"machine: nproc {os.cpu_count()}, {cpu_model()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
