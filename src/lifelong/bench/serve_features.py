"""``lifelong bench serve-features``: what each feature of the one production ranker costs to serve.

TransAct V2 on the optimized path, served by real ``lifelong serve`` processes over HTTP, one
variant after the other in one run, under the same closed-loop load (:func:`~lifelong.bench.serve.closed_loop`
replaying the evaluation requests of a rows directory):

- ``plain``: the run as is;
- ``user_tokens``: a run trained with ``--user-emb`` (DV365 user tokens), served with
  ``--user-emb URL``, so every batch reads its users' exported embeddings;
- ``pushes``: the plain run served with ``--accept-sync`` while a pusher thread POSTs a
  parameter delta to ``/admin/sync`` every ``push_every`` seconds: the run's whole dense
  weights, slightly perturbed, in the wire format of :mod:`lifelong.serving.sync` (the first
  push a full snapshot, then deltas on top of the version held), as heavy as a trainer's
  dense push;
- ``user_tokens+pushes``: both, when a token run is given.

A variant whose service refuses to start (exit 2) stops the run with its reason.

Reported per (variant, concurrency): requests/s, examples/s, p50/p90/p99, errors, and the ratios
to ``plain`` at the same concurrency (throughput, p99); with pushes, the pushes sent and applied
and their mean round trip (POST to answer) and in-place apply time. Checked: every ``/rank``
answer is 200, the ``model_version`` each client sees never goes back, every push is applied.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from lifelong.bench.serve import closed_loop, eval_requests
from lifelong.core.errors import ConfigError
from lifelong.core.processes import free_port, start_server, stop_process
from lifelong.serving.sync import Delta, TableDelta, encode_delta
from lifelong.transact.online import KIND, dense_tensors, id_tables, run_config
from lifelong.transact.trainer import load_model

__all__ = ["PLAIN", "VARIANTS", "Pusher", "render", "run_serve_features"]

PLAIN = "plain"
VARIANTS = (PLAIN, "user_tokens", "pushes", "user_tokens+pushes")
LINEAGE = "lifelong-bench-serve-features"
"""The trainer lineage the pusher's deltas name (the service checks that increments follow it)."""
_EXITED_2 = "lifelong serve exited with 2: "
"""How :func:`~lifelong.core.processes.start_server` words a service that refused its command line."""


@dataclass(frozen=True)
class _Variant:
    name: str
    run: Path
    serve_args: tuple[str, ...]
    pushes: bool


class Pusher:
    """POSTs a run's dense weights, slightly perturbed, to a service's ``/admin/sync`` on a fixed cadence.

    The first push, and the one after a refused push, is a full snapshot (every collision-less
    table's rows too, which a full snapshot must carry); the others are deltas with the dense
    weights on top of the version the service holds. Consecutive pushes alternate the sign of
    one fixed perturbation, so every push changes every weight and building one costs no more
    than encoding it (the pusher shares the load generator's process).

    Args:
        url: the service's base URL.
        run: the run the service serves (its weights and :func:`~lifelong.transact.online.run_config`).
        every: seconds from one push's start to the next (a push never overlaps the next).
        scale: the perturbation's size, relative to each weight tensor's RMS.
        seed: seeds the perturbation.
    """

    def __init__(self, url: str, run: str | os.PathLike[str], every: float, scale: float = 1e-3, seed: int = 0):
        self.sync_url, self.every = f"{url}/admin/sync", every
        model, _ = load_model(run)
        self.config = run_config(run)
        rng = np.random.default_rng(seed)
        self._dense: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
        for key, tensor in dense_tensors(model).items():
            w = tensor.numpy()
            if not np.issubdtype(w.dtype, np.floating):  # counters and index buffers are pushed as they are
                self._dense[0][key] = self._dense[1][key] = w.copy()
                continue
            w = w.astype(np.float32)
            rms = float(np.sqrt(np.mean(np.square(w)))) if w.size else 0.0
            noise = rng.standard_normal(w.shape).astype(np.float32) * np.float32(scale * (rms or 1.0))
            self._dense[0][key], self._dense[1][key] = w + noise, w - noise
        self._tables = {}
        for slot, emb in id_tables(model).items():
            rows = emb.table.export("fp32")
            self._tables[slot] = TableDelta(rows.ids, rows.values, np.zeros(0, np.int64), rows.default)
        self.version = 0
        self.held: int | None = None  # the version the service holds from this pusher (None: push a full snapshot)

    def payload(self) -> bytes:
        """The next push on the wire (numbers it)."""
        self.version += 1
        full = self.held is None
        delta = Delta(version=self.version, base_version=None if full else self.held, watermark_ms=None, offset=0,
                      tables=self._tables if full else {}, dense=self._dense[self.version % 2], lineage=LINEAGE)
        return encode_delta(delta, KIND, self.config)

    def push(self, http: httpx.Client) -> dict:
        """One push: its status, round trip, the service's apply time and the bytes sent."""
        body = self.payload()
        t0 = time.perf_counter()
        try:
            r = http.post(self.sync_url, content=body, headers={"content-type": "application/octet-stream"})
            status, answer = r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as exc:
            status, answer = 599, {"detail": f"{type(exc).__name__}: {exc}"}
        ms = (time.perf_counter() - t0) * 1000
        # Only an applied push moves what the service holds; after a refusal the next one is full.
        self.held = self.version if status == 200 else None
        return {"status": status, "ms": ms, "apply_ms": answer.get("apply_ms") if status == 200 else None,
                "bytes": len(body), "detail": None if status == 200 else str(answer.get("detail"))}

    @contextmanager
    def running(self) -> Iterator[list[dict]]:
        """Push at once, then every ``every`` seconds, until the block ends; yields the pushes' records."""
        records: list[dict] = []
        stop = threading.Event()

        def loop() -> None:
            with httpx.Client(timeout=60.0) as http:
                due = time.monotonic()
                while not stop.is_set():
                    records.append(self.push(http))
                    due = max(due + self.every, time.monotonic())  # a slow push delays the next, never bunches them
                    if stop.wait(due - time.monotonic()):
                        return

        thread = threading.Thread(target=loop, name="bench-pusher", daemon=True)
        thread.start()
        try:
            yield records
        finally:
            stop.set()
            thread.join(timeout=120)


def _push_summary(records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == 200]
    return {"sent": len(records), "applied": len(ok),
            "push_ms": float(np.mean([r["ms"] for r in ok])) if ok else None,
            "apply_ms": float(np.mean([r["apply_ms"] for r in ok])) if ok else None,
            "payload_kib": records[-1]["bytes"] / 1024 if records else None,
            "refusals": [f"{r['status']}: {r['detail']}" for r in records if r["status"] != 200][:5]}


def _version_number(version: str, run_version: str) -> int | None:
    """0 for the run's own version, N for ``<run version>+vN``; None for anything else."""
    if version == run_version:
        return 0
    suffix = version.removeprefix(f"{run_version}+v")
    return int(suffix) if suffix != version and suffix.isdigit() else None


def _versions_summary(per_client: list[list[str]], run_version: str) -> dict:
    numbers = [[_version_number(v, run_version) for v in seen] for seen in per_client]
    monotone = all(None not in ns and ns == sorted(ns) for ns in numbers)
    distinct = {v for seen in per_client for v in seen}
    return {"versions_monotone": monotone, "versions_distinct": len(distinct)}


def _variants(run: Path, token_run: Path | None, user_emb: str | None) -> list[_Variant]:
    plain = _Variant(PLAIN, run, (), pushes=False)
    pushes = _Variant("pushes", run, ("--accept-sync",), pushes=True)
    if token_run is None:
        return [plain, pushes]
    tokens = ("--user-emb", str(user_emb))
    return [plain, _Variant("user_tokens", token_run, tokens, pushes=False), pushes,
            _Variant("user_tokens+pushes", token_run, (*tokens, "--accept-sync"), pushes=True)]


def _check_inputs(run: Path, token_run: Path | None, user_emb: str | None, concurrency: list[int], seconds: float,
                  push_every: float) -> None:
    """One clear ConfigError for what would otherwise fail after servers started."""
    if token_run is not None and not user_emb:
        raise ConfigError("--token-run needs --user-emb URL: the DV365 export store its user tokens are read from")
    if token_run is None and user_emb:
        raise ConfigError("--user-emb serves the run of --token-run: give --token-run too")
    if not concurrency or min(concurrency) < 1:
        raise ConfigError(f"--concurrency needs client counts of at least 1, got {concurrency}")
    if seconds <= 0 or push_every <= 0:
        raise ConfigError(f"--seconds and --push-every must be positive, got {seconds:g} and {push_every:g}")
    for flag, path, wants_tokens in (("--run", run, False), ("--token-run", token_run, True)):
        if path is None:
            continue
        if not (Path(path) / "model.pt").is_file():
            raise ConfigError(f"{flag} {path}: not a finished run (no model.pt); run `lifelong transact train` first")
        has_tokens = run_config(path).get("user_tokens") is not None
        if has_tokens and not wants_tokens:
            raise ConfigError(f"--run {path} reads DV365 user tokens: give it as --token-run, and a run trained "
                              "without --user-emb as --run")
        if wants_tokens and not has_tokens:
            raise ConfigError(f"--token-run {path} was trained without --user-emb: it reads no user tokens")


def _start(variant: str, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """The variant's service, once it answers; a ConfigError with its reason if it refused its command line."""
    try:
        return start_server(port, args, log=log)
    except RuntimeError as exc:
        message = str(exc)
        if not message.startswith(_EXITED_2):
            raise
        lines = [line for line in message.removeprefix(_EXITED_2).splitlines() if line.strip()]
        reason = next((line.split("error:", 1)[1].strip() for line in reversed(lines) if "error:" in line),
                      lines[-1].strip() if lines else "refused")
        raise ConfigError(f"lifelong serve refused the {variant} variant: {reason}") from None


def run_serve_features(run: str | os.PathLike[str], store: str, data_dir: str | os.PathLike[str],
                       concurrency: list[int], token_run: str | os.PathLike[str] | None = None,
                       user_emb: str | None = None, seconds: float = 10.0, push_every: float = 1.0,
                       warmup_s: float = 2.0, report: Path | None = None,
                       log: Callable[[str], None] | None = None) -> dict:
    """Every variant at every concurrency, one server at a time, then the ratios to ``plain``.

    Args:
        run: a TransAct V2 run without user tokens (``plain`` and ``pushes``).
        store: the feature store URL every variant reads.
        data_dir: rows directory whose evaluation requests are replayed.
        concurrency: client counts, one load step each.
        token_run, user_emb: a run trained with ``--user-emb`` and its DV365 export store
            (``user_tokens`` and ``user_tokens+pushes``); both or neither.
        seconds: duration of each load step.
        push_every: seconds between two pushes of the push variants.
        warmup_s: load (and pushes) before the first step of each server, not reported.
        report: write the result here as JSON.
        log: gets one JSON line per finished step [default: stderr].

    Returns:
        ``{"steps": [...], "failures": [...], ...}``; each step holds ``throughput_ratio`` and
        ``p99_ratio`` to ``plain`` at its concurrency.

    Raises:
        ConfigError: inconsistent arguments, a directory that is not a run, a run on the wrong
            flag, or a variant's service that refused to start (exit 2).
    """
    run, token_run = Path(run), None if token_run is None else Path(token_run)
    _check_inputs(run, token_run, user_emb, concurrency, seconds, push_every)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    bodies = eval_requests(data_dir)
    steps: list[dict] = []
    for variant in _variants(run, token_run, user_emb):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # As in `lifelong bench serve`: the load shedder's bounds are lifted far above what the
        # closed loop can queue, so that the model and its features are measured, not the shedding.
        args = ["--run", str(variant.run), "--store", store, "--path", "optimized", *variant.serve_args,
                "--max-queue-examples", "10000000", "--max-latency-ms", "600000"]
        logfile = Path(tempfile.gettempdir()) / f"lifelong-bench-features-{variant.name.replace('+', '-')}-{port}.log"
        proc = _start(variant.name, port, args, logfile)
        try:
            run_version = httpx.get(f"{url}/healthz", timeout=10.0).json()["model_version"]
            pusher = Pusher(url, variant.run, push_every) if variant.pushes else None
            with _pushing(pusher):
                asyncio.run(closed_loop(f"{url}/rank", bodies, max(concurrency), warmup_s))
            for c in concurrency:
                with _pushing(pusher) as records:
                    step = asyncio.run(closed_loop(f"{url}/rank", bodies, c, seconds, track_versions=True))
                versions = _versions_summary(step.pop("versions"), run_version)
                step = {"variant": variant.name, **step, **versions,
                        "pushes": None if pusher is None else _push_summary(records)}
                steps.append(step)
                log(json.dumps(step))
        finally:
            stop_process(proc)
        if _failures([s for s in steps if s["variant"] == variant.name]):
            log(json.dumps({"variant": variant.name, "server_log": str(logfile)}))  # the server's side of it
        else:
            logfile.unlink(missing_ok=True)
    _add_ratios(steps)
    result = {"requests": len(bodies), "mean_candidates": float(np.mean([len(b["candidates"]) for b in bodies])),
              "seconds": seconds, "push_every": push_every, "concurrency": list(concurrency),
              "variants": list(dict.fromkeys(s["variant"] for s in steps)),
              "steps": steps, "failures": _failures(steps)}
    if report is not None:
        Path(report).write_text(json.dumps(result, indent=2))
    return result


@contextmanager
def _pushing(pusher: Pusher | None) -> Iterator[list[dict]]:
    if pusher is None:
        yield []
        return
    with pusher.running() as records:
        yield records


def _add_ratios(steps: list[dict]) -> None:
    plain = {s["concurrency"]: s for s in steps if s["variant"] == PLAIN}
    for s in steps:
        base = plain.get(s["concurrency"])
        s["throughput_ratio"] = s["examples_per_s"] / base["examples_per_s"] if base and base["examples_per_s"] else None
        s["p99_ratio"] = s["p99_ms"] / base["p99_ms"] if base and base["p99_ms"] else None


def _failures(steps: list[dict]) -> list[str]:
    """What broke a promise of the service: a non-200 answer, a version going back, a push not applied."""
    out = []
    for s in steps:
        at = f"{s['variant']} at {s['concurrency']} clients"
        if s["errors"]:
            out.append(f"{at}: {s['errors']} of {s['requests']} answers were not 200 ({s['server_errors']} 5xx)")
        if not s["versions_monotone"]:
            out.append(f"{at}: a client saw the model version go back (or an unknown version)")
        pushes = s["pushes"]
        if pushes is not None and pushes["applied"] < pushes["sent"]:
            out.append(f"{at}: {pushes['sent'] - pushes['applied']} of {pushes['sent']} pushes not applied "
                       f"({'; '.join(pushes['refusals'])})")
    return out


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "–" if value is None else format(value, fmt) + unit


def render(result: dict) -> str:
    """A markdown table of every step, its ratios to ``plain`` and its pushes, then what failed."""
    lines = [f"{result['requests']:,} replayed requests, {result['mean_candidates']:.1f} candidates each on average; "
             f"{result['seconds']:g} s a step; push variants: one push every {result['push_every']:g} s", "",
             "| variant | clients | req/s | examples/s | p50 ms | p99 ms | errors | throughput vs plain | "
             "p99 vs plain | pushes applied | push ms | apply ms | versions |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["steps"]:
        p = s["pushes"]
        pushes = "–" if p is None else f"{p['applied']} of {p['sent']}"
        versions = f"{s['versions_distinct']}{'' if s['versions_monotone'] else ' (went back)'}"
        lines.append(f"| {s['variant']} | {s['concurrency']} | {s['requests_per_s']:,.1f} | {s['examples_per_s']:,.0f} | "
                     f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['errors']} | {_num(s['throughput_ratio'], '.2f', '×')} | "
                     f"{_num(s['p99_ratio'], '.2f', '×')} | {pushes} | {_num(p and p['push_ms'], ',.1f')} | "
                     f"{_num(p and p['apply_ms'], ',.1f')} | {versions} |")
    lines.append("")
    if result["failures"]:
        lines += [f"FAILED: {f}" for f in result["failures"]]
    else:
        lines.append("checks: every /rank answer 200, no client saw the model version go back, every push applied")
    return "\n".join(lines)
