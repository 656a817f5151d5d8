"""``lifelong bench serve``: closed-loop HTTP load against real servers of each serving path.

Each path runs as its own ``lifelong serve`` process on 127.0.0.1; the load generator replays
the evaluation requests of a rows directory (the same users, request times and candidates the
offline evaluation scores) from ``c`` concurrent clients, each sending its next request as soon
as the previous one is answered. Reported per (path, concurrency): requests/s, examples/s
(candidates scored per second), latency percentiles, non-200 answers and 5xx.

With ``workers=[1, 2]`` the optimized path is served once per worker count (``lifelong serve
--workers N``), and :func:`worker_ratios` compares each count with the first at every
concurrency; the naive path stays one process, the baseline of :func:`ratios`.

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

from lifelong.core.errors import ConfigError, DataError
from lifelong.core.processes import free_port, start_server, stop_process
from lifelong.data.schema import SURFACES
from lifelong.serving.app import WORKER_HEADER
from lifelong.serving.metrics import parse_stage_seconds
from lifelong.transact.rank_data import RankData


def eval_requests(data_dir: str | os.PathLike[str], limit: int | None = None, n_candidates: int | None = None,
                  seed: int = 0) -> list[dict]:
    """The evaluation split's requests as ``POST /rank`` bodies (request order).

    With ``n_candidates`` every request has exactly that many distinct candidates: its own
    first (cut to the first ``n_candidates`` when it has more), then candidates of the split's
    other requests drawn at random (``seed``), as a ranker scoring hundreds of candidates per
    request sees them.

    Raises:
        DataError: the eval split has no rows, or fewer distinct candidates than ``n_candidates``.
    """
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
    pool = rng = None
    if n_candidates is not None:
        pool, rng = np.unique(item_ids), np.random.default_rng(seed)
        if pool.size < n_candidates:
            raise DataError(data_dir, f"the eval split has {pool.size} distinct candidates, fewer than {n_candidates}")
    bodies = []
    for s, e in zip(starts[:limit], ends[:limit]):
        r = int(req[s])
        candidates = item_ids[s:e]
        if n_candidates is not None:
            # Draw a few more than needed so that dropping repeats rarely leaves too few.
            drawn = np.concatenate([candidates, pool[rng.integers(0, pool.size, n_candidates + 16)]])
            while True:
                _, first = np.unique(drawn, return_index=True)
                if first.size >= n_candidates:
                    break
                drawn = np.concatenate([drawn, pool[rng.integers(0, pool.size, n_candidates)]])
            candidates = drawn[np.sort(first)[:n_candidates]]
        bodies.append({"user_id": int(req_user[r]), "candidates": candidates.tolist(),
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

    Against ``lifelong serve --workers N``, ``by_worker`` counts the 200 answers of each worker
    (its index, from the answers' ``x-lifelong-worker`` header): how the connections spread.
    """
    latencies: list[float] = []
    by_worker: dict[str, int] = {}
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
                if (worker := r.headers.get(WORKER_HEADER)) is not None:
                    index = worker.split(";", 1)[0]
                    by_worker[index] = by_worker.get(index, 0) + 1
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
              "mean_ms": float(lat.mean()), "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
              "p99_ms": float(np.percentile(lat, 99)), "errors": errors, "server_errors": server_errors}
    if track_versions:
        result["versions"] = versions
    if by_worker:
        result["by_worker"] = dict(sorted(by_worker.items(), key=lambda kv: int(kv[0])))
    return result


def run_serve_bench(run: str | os.PathLike[str], store: str, data_dir: str | os.PathLike[str],
                    concurrency: list[int], seconds: float = 10.0, sustain_seconds: float = 60.0,
                    paths: tuple[str, ...] = ("naive", "optimized"), report: Path | None = None,
                    warmup_s: float = 2.0, workers: tuple[int, ...] = (1,),
                    candidates: tuple[int | None, ...] = (None,), max_requests: int | None = 5000,
                    precision: str = "fp32") -> dict:
    """Load steps for every candidate count, path, worker count and concurrency, then a sustained
    run of the optimized path.

    ``candidates`` are the candidates per request to replay (:func:`eval_requests`), one group of
    steps each; None replays the requests as logged. The first ``max_requests`` requests of the
    eval split are replayed, round robin (None: all). ``workers`` are the worker counts (``lifelong
    serve --workers``) the optimized path is served with, one server after the other; the naive
    path runs one process. ``precision`` is the optimized path's (``lifelong serve --precision``);
    the naive path, the baseline, runs in float32. The sustained run uses the first worker count
    and the first candidate count. Every step names its ``workers`` and ``candidates``; one served by one process also has
    ``stages_ms`` (:func:`stage_profile`): the server's time per request in each stage over
    the step, the mean wait for a batch and how busy the batch thread was.

    Returns ``{"steps": [...], "sustained": {...} | None, "requests": n, "mean_candidates": m,
    "ratios": ..., "worker_ratios": ..., "by_candidates": [...]}``, also written as JSON to
    ``report`` when given. ``by_candidates`` holds, per candidate count, its ``requests``,
    ``mean_candidates`` and ``ratios`` (:func:`ratios` of its steps); the top-level ``requests``,
    ``mean_candidates``, ``ratios`` and ``worker_ratios`` are those of the first count.

    Raises:
        ConfigError: a worker count below 1, counts other than ``1`` without the optimized path,
            or a candidate count below 1.
    """
    if not workers or min(workers) < 1:
        raise ConfigError(f"--workers: worker counts of at least 1, got {','.join(map(str, workers))}")
    if list(workers) != [1] and "optimized" not in paths:
        raise ConfigError("--workers compares worker counts of the optimized path: add it to --paths")
    if not candidates or any(n is not None and n < 1 for n in candidates):
        raise ConfigError(f"--candidates: counts of at least 1, got {','.join(map(str, candidates))}")
    if max_requests is not None and max_requests < 1:
        raise ConfigError(f"--max-requests: at least 1, got {max_requests}")
    steps, sustained, groups = [], None, []
    for n_cand in candidates:
        bodies = eval_requests(data_dir, limit=max_requests, n_candidates=n_cand)
        first = len(steps)
        for path in paths:
            for n in workers if path == "optimized" else (1,):
                port = free_port()
                # A throughput benchmark measures the model, not the load shedder: the queue bound and the
                # deadline are lifted far above what the closed loop of clients can queue.
                log = Path(tempfile.gettempdir()) / f"lifelong-bench-serve-{path}-{port}.log"  # a pipe nobody reads fills up
                step_precision = precision if path == "optimized" else "fp32"
                proc = start_server(port, ["--run", str(run), "--store", store, "--path", path, "--workers", str(n),
                                           "--max-queue-examples", "10000000", "--max-latency-ms", "600000",
                                           "--precision", step_precision], log=log)
                base = f"http://127.0.0.1:{port}"
                try:
                    _wait_for_workers(base, n)
                    asyncio.run(closed_loop(f"{base}/rank", bodies, max(concurrency), warmup_s))
                    for c in concurrency:
                        # A scrape reads one worker: a profile only of a single process.
                        before = _scraped_stages(base) if n == 1 else None
                        step = {"path": path, "workers": n, "candidates": n_cand, "precision": step_precision,
                                **asyncio.run(closed_loop(f"{base}/rank", bodies, c, seconds))}
                        if before is not None:
                            step["stages_ms"] = stage_profile(before, _scraped_stages(base), step)
                        steps.append(step)
                        print(json.dumps(steps[-1]), file=sys.stderr, flush=True)
                    if path == "optimized" and n == workers[0] and sustain_seconds > 0 and sustained is None:
                        best = max((s for s in steps[first:] if s["path"] == path), key=lambda s: s["examples_per_s"])
                        sustained = {"path": path, "workers": n, "candidates": n_cand,
                                     **asyncio.run(closed_loop(f"{base}/rank", bodies, best["concurrency"], sustain_seconds))}
                        # With several workers a scrape reads one of them: the figure is that worker's.
                        sustained["metrics_5xx"] = _scraped_5xx(f"{base}/metrics")
                finally:
                    stop_process(proc)
        groups.append({"candidates": n_cand, "requests": len(bodies),
                       "mean_candidates": float(np.mean([len(b["candidates"]) for b in bodies])),
                       "ratios": ratios(steps[first:]), "worker_ratios": worker_ratios(steps[first:])})
    head = groups[0]
    result = {"steps": steps, "sustained": sustained, "precision": precision, "requests": head["requests"],
              "mean_candidates": head["mean_candidates"], "ratios": head["ratios"],
              "worker_ratios": head["worker_ratios"], "by_candidates": groups}
    if report is not None:
        Path(report).write_text(json.dumps(result, indent=2))
    return result


BATCH_STAGES = ("fetch", "nn_search", "prepare", "forward", "finish")
"""The ranker's stages of a batch, in order (:class:`~lifelong.transact.serving.Ranker`)."""


def stage_profile(before: dict[str, float], after: dict[str, float], step: dict) -> dict[str, float]:
    """Where a load step's time went, from two ``/metrics`` scrapes of one process around it
    (:func:`~lifelong.serving.metrics.parse_stage_seconds`).

    Each batch stage (:data:`BATCH_STAGES`) as server milliseconds per answered request (the
    batch's time shared among its requests: what bounds throughput); ``queue``, the mean wait of
    a request for its batch; ``server``, the mean time from a request's arrival to its answer in
    the server (what the clients waited beyond it, ``mean_ms - server``, is HTTP and the load
    generator); and ``busy``, the share of the step's wall time the batch thread worked. Below
    1, requests did not arrive fast enough: the HTTP front, the event loop or the load generator
    (on the same cores) held them back.

    Example::

        >>> stage_profile({"forward": 1.0}, {"forward": 3.0, "queue": 1.0, "answered": 4.0, "answers": 100},
        ...               {"requests": 100, "seconds": 4.0})
        {'fetch': 0.0, 'nn_search': 0.0, 'prepare': 0.0, 'forward': 20.0, 'finish': 0.0, 'queue': 10.0, 'server': 40.0, 'busy': 0.5}
    """
    n = max(step["requests"], 1)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (*BATCH_STAGES, "queue", "answered", "answers")}
    out = {k: 1000 * delta[k] / n for k in BATCH_STAGES}
    out["queue"] = 1000 * delta["queue"] / n
    out["server"] = 1000 * delta["answered"] / max(delta["answers"], 1)
    out["busy"] = sum(delta[k] for k in BATCH_STAGES) / max(step["seconds"], 1e-9)
    return out


def _wait_for_workers(base: str, n: int, timeout_s: float = 120.0) -> None:
    """Wait until every one of ``n`` workers has answered ``/healthz``: :func:`start_server`
    returns at the first answer, which one worker that finished loading its model can give.
    Each check opens a new connection, which the kernel hashes to any listening worker."""
    if n == 1:
        return
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"lifelong serve --workers {n}: only workers {sorted(seen)} answered within {timeout_s:.0f} s")
        try:
            seen.add(httpx.get(f"{base}/healthz", timeout=1.0).json()["worker"])
        except httpx.HTTPError:
            time.sleep(0.2)


def _scraped_stages(base: str) -> dict[str, float]:
    return parse_stage_seconds(httpx.get(f"{base}/metrics", timeout=5.0).text)


def _scraped_5xx(url: str) -> int:
    text = httpx.get(url, timeout=5.0).text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith('lifelong_requests_total{status="5'))


def ratios(steps: list[dict]) -> dict:
    """Optimized over naive, the figures :func:`render` prints: ``best`` compares each path's
    best-throughput step, ``by_concurrency`` the two paths at each client count both ran.
    ``throughput`` is examples/s optimized over naive, ``p99`` the p99 latency optimized over
    naive; ``{}`` unless both paths ran. The optimized path's steps are those of its fewest
    workers (one, unless ``--workers`` left it out); :func:`worker_ratios` compares the others.

    Example::

        >>> step = {"concurrency": 4, "examples_per_s": 100.0, "p99_ms": 50.0}
        >>> ratios([{"path": "naive", **step}, {"path": "optimized", **step, "examples_per_s": 300.0}])["best"]["throughput"]
        3.0
    """
    base = min((s.get("workers", 1) for s in steps if s["path"] == "optimized"), default=1)
    steps = [s for s in steps if s.get("workers", 1) == (base if s["path"] == "optimized" else 1)]
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


def worker_ratios(steps: list[dict]) -> dict:
    """The optimized path with more workers over its fewest, the figures :func:`render` prints.

    ``baseline_workers`` is the fewest; ``by_concurrency`` has, for every other count and every
    client count both ran, ``throughput`` (examples/s, more workers over the baseline) and
    ``p99`` (p99 latency, the same way); ``best`` compares each count's best-throughput step
    with the baseline's. ``{}`` unless the optimized path ran with two worker counts or more.

    Example::

        >>> step = {"path": "optimized", "concurrency": 4, "examples_per_s": 100.0, "p99_ms": 50.0}
        >>> worker_ratios([{**step, "workers": 1}, {**step, "workers": 2, "examples_per_s": 180.0}])["by_concurrency"][0]["throughput"]
        1.8
    """
    opt = [s for s in steps if s["path"] == "optimized"]
    counts = sorted({s.get("workers", 1) for s in opt})
    if len(counts) < 2:
        return {}
    base = counts[0]

    def compare(w: dict, b: dict) -> dict:
        return {"workers": w["workers"], "concurrency": w["concurrency"], "baseline_concurrency": b["concurrency"],
                "examples_per_s": w["examples_per_s"], "baseline_examples_per_s": b["examples_per_s"],
                "p99_ms": w["p99_ms"], "baseline_p99_ms": b["p99_ms"],
                "throughput": w["examples_per_s"] / max(b["examples_per_s"], 1e-9), "p99": w["p99_ms"] / max(b["p99_ms"], 1e-9)}

    by = {(s["workers"], s["concurrency"]): s for s in opt}
    best = {n: max((s for s in opt if s["workers"] == n), key=lambda s: s["examples_per_s"]) for n in counts}
    return {"baseline_workers": base,
            "by_concurrency": [compare(s, by[(base, c)]) for (n, c), s in by.items() if n != base and (base, c) in by],
            "best": [compare(best[n], best[base]) for n in counts[1:]]}


def render(result: dict) -> str:
    """Markdown tables per candidate count: every step, the optimized/naive ratios (:func:`ratios`),
    the worker ratios, where the time went (:func:`stage_profile`); then the sustained run."""
    several = any(s.get("workers", 1) != 1 for s in result["steps"])  # a workers column only when it varies
    groups = result.get("by_candidates") or [{"candidates": None, "requests": result["requests"],
                                              "mean_candidates": result["mean_candidates"]}]
    lines: list[str] = []
    for g in groups:
        steps = [s for s in result["steps"] if s.get("candidates") == g["candidates"]]
        asked = "as logged" if g["candidates"] is None else "per request"
        lines += [f"{g['requests']:,} replayed requests, {g['mean_candidates']:.1f} candidates each ({asked})", "",
                  f"| path |{' workers |' if several else ''} clients | req/s | examples/s | p50 ms | p90 ms | p99 ms | errors | 5xx |",
                  f"|---|{'---|' if several else ''}---|---|---|---|---|---|---|---|"]
        for s in steps:
            workers = f" {s.get('workers', 1)} |" if several else ""
            lines.append(f"| {s['path']} |{workers} {s['concurrency']} | {s['requests_per_s']:,.1f} | "
                         f"{s['examples_per_s']:,.0f} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | "
                         f"{s['errors']} | {s['server_errors']} |")
        lines += _render_ratios(steps)
        profiled = [s for s in steps if "stages_ms" in s]
        if profiled:
            lines += ["", "ms per request by stage (batch stages: the batch's time shared among its requests; queue: "
                          "the mean wait for a batch; server / client: mean latency in the server / at the client; "
                          "busy: share of the step the batch thread worked)", "",
                      f"| path | clients | {' | '.join(BATCH_STAGES)} | queue | server | client | busy |",
                      f"|---|---|{'---|' * len(BATCH_STAGES)}---|---|---|---|"]
            for s in profiled:
                p = s["stages_ms"]
                lines.append(f"| {s['path']} | {s['concurrency']} | "
                             + " | ".join(f"{p[k]:.2f}" for k in BATCH_STAGES)
                             + f" | {p['queue']:.1f} | {p['server']:.1f} | {s['mean_ms']:.1f} | {p['busy']:.0%} |")
        lines.append("")
    s = result.get("sustained")
    if s:
        n = s.get("workers", 1)
        served = "optimized" if n == 1 else f"optimized, {n} workers"
        in_metrics = "in /metrics" if n == 1 else "in the /metrics of the worker scraped"
        lines += [f"sustained {s['seconds']:.0f} s at {s['concurrency']} clients ({served}): {s['requests']:,} requests, "
                  f"{s['examples_per_s']:,.0f} examples/s, p50/p90/p99 {s['p50_ms']:.1f}/{s['p90_ms']:.1f}/{s['p99_ms']:.1f} ms, "
                  f"{s['errors']} errors, {s['server_errors']} 5xx seen by clients, {s['metrics_5xx']} 5xx {in_metrics}"]
    return "\n".join(lines).rstrip("\n")


def _render_ratios(steps: list[dict]) -> list[str]:
    lines = []
    r = ratios(steps)
    if r:
        b = r["best"]
        lines += ["", f"best throughput: optimized {b['optimized_examples_per_s']:,.0f} examples/s "
                      f"({b['optimized_concurrency']} clients, p99 {b['optimized_p99_ms']:.1f} ms) vs naive "
                      f"{b['naive_examples_per_s']:,.0f} ({b['naive_concurrency']} clients, p99 {b['naive_p99_ms']:.1f} ms): "
                      f"{b['throughput']:.1f}x"]
        lines += [f"at {c['naive_concurrency']} clients: {c['throughput']:.1f}x throughput, p99 "
                  f"{c['optimized_p99_ms']:.1f} vs {c['naive_p99_ms']:.1f} ms" for c in r["by_concurrency"]]
    w = worker_ratios(steps)
    if w:
        lines.append("")
        lines += [f"{c['workers']} workers over {w['baseline_workers']} at {c['concurrency']} clients: "
                  f"{c['throughput']:.2f}x throughput, p99 {c['p99_ms']:.1f} vs {c['baseline_p99_ms']:.1f} ms"
                  for c in w["by_concurrency"]]
        lines += [f"best of {c['workers']} workers ({c['concurrency']} clients) over best of {w['baseline_workers']} "
                  f"({c['baseline_concurrency']} clients): {c['throughput']:.2f}x throughput, p99 {c['p99_ms']:.1f} vs "
                  f"{c['baseline_p99_ms']:.1f} ms" for c in w["best"]]
    return lines
