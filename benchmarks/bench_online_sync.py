"""Online training with live parameter sync under request load: failures, versions, latency.

Starts ``lifelong serve --online`` and ``lifelong monolith online --serve`` as two processes on
127.0.0.1, and keeps ``--clients`` closed-loop clients posting ``/rank`` requests (random users,
``--candidates`` random catalog items) from the first push to the job's end. Prints what the
trainer did (examples/s, pushes, rows and bytes per push, push latency), what the clients saw
(requests, non-200 answers, the versions that scored them, whether any client saw a version go
backwards) and the request latency within ``--near-ms`` of a push against the rest, as a ratio.

    python benchmarks/bench_online_sync.py --data worlds/small --last-days 2 --sync-every 2
    python benchmarks/bench_online_sync.py --dry-run    # a tiny world, seconds: keeps the script from rotting
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from lifelong.core.processes import free_port, start_server, stop_process
from lifelong.data.io import read_parquet

SYNC_LINE = re.compile(r"sync v(\d+): (full, )?([\d,]+) rows, ([\d,]+) KiB, (\d+) ms")


def _watch(proc: subprocess.Popen, lines: list[tuple[float, str]]) -> None:
    for line in proc.stderr:
        lines.append((time.monotonic(), line.rstrip()))


async def _load(url: str, users: np.ndarray, items: np.ndarray, n_candidates: int, clients: int,
                running: threading.Event, seed: int) -> list[tuple[float, float, int, str | None, int]]:
    """(start, latency s, status, version, client) of every request until ``running`` clears."""
    out: list[tuple[float, float, int, str | None, int]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient, k: int) -> None:
        rng = np.random.default_rng(seed + k)
        while running.is_set():
            body = {"user_id": int(rng.choice(users)),
                    "candidates": rng.choice(items, n_candidates, replace=False).tolist()}
            t0 = time.monotonic()
            try:
                r = await http.post(url, json=body)
                status, version = r.status_code, r.json().get("model_version") if r.status_code == 200 else None
            except httpx.HTTPError:
                status, version = 599, None
            out.append((t0, time.monotonic() - t0, status, version, k))

    async with httpx.AsyncClient(timeout=30.0, limits=limits) as http:
        await asyncio.gather(*(client(http, k) for k in range(clients)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("worlds/small"))
    ap.add_argument("--last-days", type=float, default=2.0)
    ap.add_argument("--sync-every", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--near-ms", type=float, default=500.0, help="a request this close to a push counts as during it")
    ap.add_argument("--dry-run", action="store_true", help="simulate a tiny world and run for seconds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.dry_run:
            args.data, args.last_days, args.sync_every, args.clients = Path(tmp) / "world", 3.0, 0.5, 2
            subprocess.run([sys.executable, "-m", "lifelong.cli", "simulate", "--preset", "tiny", "--out",
                            str(args.data), "--set", "users.n_users=12"], check=True, capture_output=True)
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    items = read_parquet(args.data / "items.parquet", columns=["item_id"]).column("item_id").to_numpy()
    users = np.unique(read_parquet(args.data / "users.parquet", columns=["user_id"]).column("user_id").to_numpy())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, ["--online", "--data", str(args.data)])
    lines: list[tuple[float, str]] = []
    job = None
    try:
        t_job = time.monotonic()
        job = subprocess.Popen([sys.executable, "-m", "lifelong.cli", "online", "--data", str(args.data), "--ckpt",
                                str(tmp / "ckpt"), "--serve", url, "--sync-every", str(args.sync_every),
                                "--last-days", str(args.last_days)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"})
        watcher = threading.Thread(target=_watch, args=(job, lines), daemon=True)
        watcher.start()
        while httpx.get(f"{url}/healthz").json()["model_version"] is None:
            if job.poll() is not None:
                raise SystemExit(f"lifelong monolith online exited with {job.returncode} before its first push: "
                                 f"{[line for _, line in lines][-5:]}")
            time.sleep(0.05)
        running = threading.Event()
        running.set()
        threading.Thread(target=lambda: (job.wait(), running.clear()), daemon=True).start()
        reqs = asyncio.run(_load(f"{url}/rank", users, items, min(args.candidates, len(items)), args.clients,
                                 running, seed=0))
        job_s = time.monotonic() - t_job
        watcher.join(timeout=10)
        summary = job.stdout.read()
        if job.returncode != 0:
            raise SystemExit(f"lifelong monolith online failed ({job.returncode}): {[line for _, line in lines][-5:]}")
    finally:
        if job is not None and job.poll() is None:
            stop_process(job)
        stop_process(server)
    report(args, reqs, lines, summary, job_s)


def report(args, reqs, lines, summary: str, job_s: float) -> None:
    syncs = [(t, SYNC_LINE.search(line)) for t, line in lines if SYNC_LINE.search(line)]
    sync_t = np.array([t for t, _ in syncs])
    rows = np.array([int(m.group(3).replace(",", "")) for _, m in syncs])
    kib = np.array([int(m.group(4).replace(",", "")) for _, m in syncs])
    push_ms = np.array([int(m.group(5)) for _, m in syncs])
    start, lat, status, version, client = (np.array(c) for c in zip(*reqs))
    ok = status == 200
    numbers = np.array([int(v.removeprefix("online-v")) if v else -1 for v in version])
    backwards = any(np.any(np.diff(numbers[(client == k) & ok]) < 0) for k in np.unique(client))
    near = np.zeros(len(start), bool)
    if len(sync_t):
        # A push is logged when it returns: a request is "during" it when it overlaps [done - push, done] +- near.
        lo = sync_t - push_ms / 1000 - args.near_ms / 1000
        hi = sync_t + args.near_ms / 1000
        idx = np.searchsorted(hi, start)
        near = (idx < len(hi)) & (start + lat >= lo[np.minimum(idx, len(lo) - 1)])
    p = lambda x, q: float(np.percentile(x, q) * 1000) if len(x) else float("nan")  # noqa: E731
    trained = re.search(r"trained ([\d,]+) examples", summary)
    print(f"world {args.data}, last {args.last_days:g} days, sync every {args.sync_every:g} s, "
          f"{args.clients} clients x {args.candidates} candidates")
    print(f"job: {job_s:.1f} s, {trained.group(1) if trained else '?'} examples trained; "
          f"{len(syncs)} pushes: rows/push median {np.median(rows):,.0f}, "
          f"KiB/push median {np.median(kib):,.0f} (first, full: {kib[0]:,} KiB); push ms p50 {np.median(push_ms):.0f} "
          f"max {push_ms.max():.0f}")
    print(f"requests: {len(reqs):,}, non-200: {int((~ok).sum())}, versions seen: {len(set(numbers[ok]))}, "
          f"a client saw a version go backwards: {backwards}")
    print("| requests | n | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, sel in (("during a push", near), ("otherwise", ~near)):
        print(f"| {name} | {int(sel.sum()):,} | {p(lat[sel], 50):.1f} | {p(lat[sel], 99):.1f} | "
              f"{p(lat[sel], 100):.1f} |")
    if near.any() and (~near).any():
        print(f"p99 during a push / otherwise: {p(lat[near], 99) / p(lat[~near], 99):.2f}x")
    print(summary.strip())


if __name__ == "__main__":
    main()
