"""``lifelong bench serve``: closed-loop HTTP load against real servers of each serving path.

Each path runs as its own ``lifelong serve`` process on 127.0.0.1; the load generator replays
the evaluation requests of a rows directory (the same users, request times and candidates the
offline evaluation scores) from ``c`` concurrent clients, each sending its next request as soon
as the previous one is answered. Reported per (path, concurrency): requests/s, examples/s
(candidates scored per second), latency percentiles, non-200 answers and 5xx.

Its servers are started and stopped with :mod:`lifelong.core.processes` (shared with
``lifelong abtest``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from lifelong.core.errors import DataError
from lifelong.core.processes import free_port, start_server, stop_process
from lifelong.data.schema import SURFACES
from lifelong.transact.rank_data import RankData


def eval_requests(data_dir: str | os.PathLike[str], limit: int | None = None) -> list[dict]:
    """The evaluation split's requests as ``POST /rank`` bodies (request order)."""
    data = RankData(data_dir, "eval")
    a = data.arrays
    req = np.asarray(a["request"])
    if req.size == 0:
        raise DataError(data_dir, "the eval split has no rows to replay")
    starts = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
    ends = np.r_[starts[1:], req.size]
    item_ids = data.item_id.numpy()[np.asarray(a["item"])]
    surfaces = np.asarray(a["surface"])
    req_user, req_ts = np.asarray(a["req_user"]), np.asarray(a["req_ts"])
    bodies = []
    for s, e in zip(starts[:limit], ends[:limit]):
        r = int(req[s])
        bodies.append({"user_id": int(req_user[r]), "candidates": item_ids[s:e].tolist(),
                       "surface": SURFACES[int(surfaces[s])], "request_time": int(req_ts[r])})
    return bodies


@contextmanager
def serve_in_thread(app, timeout_s: float = 30.0) -> Iterator[str]:
    """Run an ASGI ``app`` under uvicorn in a daemon thread on a free port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def closed_loop(url: str, bodies: list[dict], concurrency: int, seconds: float,
                      track_versions: bool = False) -> dict:
    """``concurrency`` clients replaying ``bodies`` round robin for ``seconds``.

    With ``track_versions``, the result also holds ``versions``: per client, the ``model_version``
    of its 200 answers in the order it got them, repeats of the previous one left out (a client
    waits for each answer before sending its next request, so this is the order they were scored in).
    """
    latencies: list[float] = []
    examples = errors = server_errors = 0
    next_body = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    versions: list[list[str]] = [[] for _ in range(concurrency)]

    async def client(http: httpx.AsyncClient, seen: list[str]) -> None:
        nonlocal next_body, examples, errors, server_errors
        while time.perf_counter() < deadline:
            body = bodies[next_body % len(bodies)]
            next_body += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url, json=body)
                status = r.status_code
            except httpx.HTTPError:
                status = 599
            latencies.append(time.perf_counter() - t0)
            if status == 200:
                examples += len(body["candidates"])
                if track_versions:
                    version = r.json()["model_version"]
                    if not seen or seen[-1] != version:
                        seen.append(version)
            else:
                errors += 1
                server_errors += status >= 500

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as http:
        await asyncio.gather(*(client(http, seen) for seen in versions))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    result = {"concurrency": concurrency, "seconds": round(wall, 2), "requests": len(latencies),
              "requests_per_s": len(latencies) / wall, "examples_per_s": examples / wall,
              "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
              "p99_ms": float(np.percentile(lat, 99)), "errors": errors, "server_errors": server_errors}
    if track_versions:
        result["versions"] = versions
    return result


def run_serve_bench(run: str | os.PathLike[str], store: str, data_dir: str | os.PathLike[str],
                    concurrency: list[int], seconds: float = 10.0, sustain_seconds: float = 60.0,
                    paths: tuple[str, ...] = ("naive", "optimized"), report: Path | None = None,
                    warmup_s: float = 2.0) -> dict:
    """Load steps for every path and concurrency, then a sustained run of the optimized path.

    Returns ``{"steps": [...], "sustained": {...} | None, "requests": n, "mean_candidates": m,
    "ratios": ratios(steps)}``, also written as JSON to ``report`` when given.
    """
    bodies = eval_requests(data_dir)
    steps, sustained = [], None
    for path in paths:
        port = free_port()
        # A throughput benchmark measures the model, not the load shedder: the queue bound and the
        # deadline are lifted far above what the closed loop of clients can queue.
        log = Path(tempfile.gettempdir()) / f"lifelong-bench-serve-{path}-{port}.log"  # a pipe nobody reads fills up
        proc = start_server(port, ["--run", str(run), "--store", store, "--path", path,
                                   "--max-queue-examples", "10000000", "--max-latency-ms", "600000"], log=log)
        url = f"http://127.0.0.1:{port}/rank"
        try:
            asyncio.run(closed_loop(url, bodies, max(concurrency), warmup_s))
            for c in concurrency:
                steps.append({"path": path, **asyncio.run(closed_loop(url, bodies, c, seconds))})
                print(json.dumps(steps[-1]), file=sys.stderr, flush=True)
            if path == "optimized" and sustain_seconds > 0:
                best = max((s for s in steps if s["path"] == path), key=lambda s: s["examples_per_s"])
                sustained = {"path": path, **asyncio.run(closed_loop(url, bodies, best["concurrency"], sustain_seconds))}
                sustained["metrics_5xx"] = _scraped_5xx(f"http://127.0.0.1:{port}/metrics")
        finally:
            stop_process(proc)
    result = {"steps": steps, "sustained": sustained, "requests": len(bodies),
              "mean_candidates": float(np.mean([len(b["candidates"]) for b in bodies])), "ratios": ratios(steps)}
    if report is not None:
        Path(report).write_text(json.dumps(result, indent=2))
    return result


def _scraped_5xx(url: str) -> int:
    text = httpx.get(url, timeout=5.0).text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith('lifelong_requests_total{status="5'))


def ratios(steps: list[dict]) -> dict:
    """Optimized over naive, the figures :func:`render` prints: ``best`` compares each path's
    best-throughput step, ``by_concurrency`` the two paths at each client count both ran.
    ``throughput`` is examples/s optimized over naive, ``p99`` the p99 latency optimized over
    naive; ``{}`` unless both paths ran.

    Example::

        >>> step = {"concurrency": 4, "examples_per_s": 100.0, "p99_ms": 50.0}
        >>> ratios([{"path": "naive", **step}, {"path": "optimized", **step, "examples_per_s": 300.0}])["best"]["throughput"]
        3.0
    """
    best = {p: max((s for s in steps if s["path"] == p), key=lambda s: s["examples_per_s"], default=None)
            for p in ("naive", "optimized")}
    if best["naive"] is None or best["optimized"] is None:
        return {}

    def compare(o: dict, n: dict) -> dict:
        return {"optimized_concurrency": o["concurrency"], "naive_concurrency": n["concurrency"],
                "optimized_examples_per_s": o["examples_per_s"], "naive_examples_per_s": n["examples_per_s"],
                "optimized_p99_ms": o["p99_ms"], "naive_p99_ms": n["p99_ms"],
                "throughput": o["examples_per_s"] / max(n["examples_per_s"], 1e-9),
                "p99": o["p99_ms"] / max(n["p99_ms"], 1e-9)}

    by = {(s["path"], s["concurrency"]): s for s in steps}
    return {"best": compare(best["optimized"], best["naive"]),
            "by_concurrency": [compare(by[("optimized", c)], s) for (p, c), s in by.items()
                               if p == "naive" and ("optimized", c) in by]}


def render(result: dict) -> str:
    """Markdown tables: every step, the optimized/naive ratios (:func:`ratios`), the sustained run."""
    lines = [f"{result['requests']:,} replayed requests, {result['mean_candidates']:.1f} candidates each on average", "",
             "| path | clients | req/s | examples/s | p50 ms | p90 ms | p99 ms | errors | 5xx |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result["steps"]:
        lines.append(f"| {s['path']} | {s['concurrency']} | {s['requests_per_s']:,.1f} | {s['examples_per_s']:,.0f} | "
                     f"{s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | {s['errors']} | {s['server_errors']} |")
    r = ratios(result["steps"])
    if r:
        b = r["best"]
        lines += ["", f"best throughput: optimized {b['optimized_examples_per_s']:,.0f} examples/s "
                      f"({b['optimized_concurrency']} clients, p99 {b['optimized_p99_ms']:.1f} ms) vs naive "
                      f"{b['naive_examples_per_s']:,.0f} ({b['naive_concurrency']} clients, p99 {b['naive_p99_ms']:.1f} ms): "
                      f"{b['throughput']:.1f}x"]
        lines += [f"at {c['naive_concurrency']} clients: {c['throughput']:.1f}x throughput, p99 "
                  f"{c['optimized_p99_ms']:.1f} vs {c['naive_p99_ms']:.1f} ms" for c in r["by_concurrency"]]
    s = result.get("sustained")
    if s:
        lines += ["", f"sustained {s['seconds']:.0f} s at {s['concurrency']} clients (optimized): {s['requests']:,} requests, "
                      f"{s['examples_per_s']:,.0f} examples/s, p50/p90/p99 {s['p50_ms']:.1f}/{s['p90_ms']:.1f}/{s['p99_ms']:.1f} ms, "
                      f"{s['errors']} errors, {s['server_errors']} 5xx seen by clients, {s['metrics_5xx']} 5xx in /metrics"]
    return "\n".join(lines)
