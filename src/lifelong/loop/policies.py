"""The arms of an A/B test: what each one ranks with, parsed from ``NAME=SPEC``.

A SPEC is one of:

- a **run directory** (``lifelong transact train``): the A/B test starts ``lifelong serve --run RUN
  --store URL`` on a free local port, waits for ``/healthz`` and ``/readyz``, and stops it by pid
  at the end;
- ``http://host:port``: a ranking service that is already running;
- ``online:RUN``: the run served with ``--accept-sync`` and **trained online** while the test
  runs: a learner (:class:`Learner`, made by the caller: the command line composes TransAct's
  online model with Monolith's trainer) reads the arm's event stream after each window of
  simulated time, trains, and pushes the new parameters to the arm's service before the next
  window is ranked;
- ``random``: a uniformly random order, keyed by request (the same in every arm);
- ``oracle``: the order of the oracle's final score, the ceiling.

Rankers are reached over HTTP only (:class:`HttpPolicy`): every request goes through the
service's real ``POST /rank`` with its ``request_time``, the requests of a round concurrently
from a small thread pool. A request the service does not answer with a permutation of its
candidates fails (the interactive world then shows nothing and the session ends); a service
that dies is detected, and from then on its requests fail at once, counted, never dropped.
"""

from __future__ import annotations

import collections
import json
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from lifelong.core.errors import ConfigError
from lifelong.core.processes import free_port, start_server, stop_process
from lifelong.data.world.interactive import FeedRequest, Policy, oracle_policy, random_policy

__all__ = ["ArmSpec", "HttpPolicy", "Learner", "LearnerFactory", "LearnerSpec", "ONLINE", "RUN", "SERVED", "SERVICE",
           "ServedArm", "builtin_policy", "parse_arm", "reads_user_tokens", "start_service"]

RUN, ONLINE, SERVICE, RANDOM, ORACLE = "run", "online", "service", "random", "oracle"
BUILTIN = (RANDOM, ORACLE)
SERVED = (RUN, ONLINE)
"""Arms this test serves itself from a run directory (and each gets its own store copy)."""
ONLINE_PREFIX = "online:"
HTTP_TIMEOUT_S = 30.0
"""How long an arm's client waits for a ``/rank`` answer (and the deadline its services get)."""
SPEC_HELP = ("a run directory (lifelong transact train; served with `lifelong serve` on a free port), "
             "online:RUN (the same, trained online from the arm's stream while the test runs), "
             "http://host:port of a running service, random or oracle")


@dataclass(frozen=True)
class ArmSpec:
    """One ``--arm NAME=SPEC``.

    Args:
        name: the arm's name in the report.
        kind: ``run``, ``online``, ``service``, ``random`` or ``oracle``.
        target: the run directory, the service URL, or the built-in policy's name.
    """

    name: str
    kind: str
    target: str


@dataclass(frozen=True)
class LearnerSpec:
    """What an online arm's learner trains and where it pushes.

    Args:
        run: the run directory it starts from (the arm's service serves the same run).
        store: the arm's feature store (its rows are read from there, as the service reads them).
        stream: the arm's event stream (it learns from what the arm's users did).
        serve: the arm's service base URL (it takes the pushes).
        ckpt_dir: where it checkpoints.
        user_emb: the DV365 export store the service reads, for a run with user tokens (None:
            the one in the run's ``run.json``).
    """

    run: str
    store: str
    stream: str
    serve: str
    ckpt_dir: Path
    user_emb: str | None = None


class Learner(Protocol):
    """Trains an online arm's model on its stream and pushes to its service (e.g.
    :class:`~lifelong.monolith.job.StreamLearner`)."""

    def learn(self) -> Any:
        """Train on what the stream holds that is new; push the change before returning."""

    def describe(self) -> dict[str, Any]:
        """What it trained and pushed, for the report."""

    def close(self) -> None:
        """Checkpoint and release what it holds."""


LearnerFactory = Callable[[LearnerSpec], Learner]
"""Makes an online arm's learner; given to :func:`~lifelong.loop.abtest.run_abtest` by the caller
that can compose a ranker with a trainer (the command line)."""


def parse_arm(text: str) -> ArmSpec:
    """Parse ``NAME=SPEC``.

    Raises:
        ConfigError: no ``=``, an empty name, or a SPEC that is none of the four kinds.

    Example::

        >>> parse_arm("base=random")
        ArmSpec(name='base', kind='random', target='random')
        >>> parse_arm("v2=http://127.0.0.1:8000/").target
        'http://127.0.0.1:8000'
    """
    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise ConfigError(f"--arm {text!r}: expected NAME=SPEC, where SPEC is {SPEC_HELP}")
    if spec in BUILTIN:
        return ArmSpec(name, spec, spec)
    if spec.startswith(("http://", "https://")):
        return ArmSpec(name, SERVICE, spec.rstrip("/"))
    kind = ONLINE if spec.startswith(ONLINE_PREFIX) else RUN
    path = Path(spec.removeprefix(ONLINE_PREFIX))
    if path.is_dir() and (path / "run.json").is_file() and (path / "model.pt").is_file():
        return ArmSpec(name, kind, str(path))
    why = "a directory without run.json and model.pt" if path.is_dir() else "no such directory"
    raise ConfigError(f"arm {name}: unknown SPEC {spec!r} ({why}); expected {SPEC_HELP}")


def reads_user_tokens(run: str | Path) -> bool:
    """Whether a run was trained with DV365 user tokens (its ``run.json`` names an export store)."""
    try:
        return bool(json.loads((Path(run) / "run.json").read_text()).get("train", {}).get("user_emb"))
    except (OSError, ValueError, AttributeError):
        return False


def builtin_policy(kind: str, seed: int) -> Policy:
    """The policy of a ``random`` or ``oracle`` arm."""
    return random_policy(seed) if kind == RANDOM else oracle_policy()


@dataclass
class CallStats:
    """What an HTTP arm's service did: requests sent, answered, failed, and why."""

    sent: int = 0
    answered: int = 0
    failed: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    dead: str | None = None

    def to_dict(self) -> dict:
        return {"sent": self.sent, "answered": self.answered, "failed": self.failed,
                "errors": dict(self.errors), "dead": self.dead}


class HttpPolicy:
    """Ranks every request through a service's ``POST /rank`` (a :data:`Policy`).

    Args:
        url: the service's base URL.
        workers: concurrent requests per round.
        timeout_s: per request.
        proc: the service's process when this test started it (its exit marks the arm dead).
        dead_after: consecutive connection failures after which a service is taken for dead.
    """

    def __init__(self, url: str, workers: int = 8, timeout_s: float = HTTP_TIMEOUT_S, proc: subprocess.Popen | None = None,
                 dead_after: int = 20):
        self.url, self.proc, self.dead_after = url, proc, dead_after
        self.client = httpx.Client(base_url=url, timeout=timeout_s,
                                   limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="abtest-rank")
        self.stats = CallStats()
        self._lock = threading.Lock()
        self._streak = 0

    def _check_process(self) -> None:
        if self.proc is not None and self.stats.dead is None and self.proc.poll() is not None:
            self.stats.dead = f"the service (pid {self.proc.pid}) exited with status {self.proc.returncode}"

    def _fail(self, why: str, connection: bool) -> None:
        with self._lock:
            self.stats.failed += 1
            self.stats.errors[why] += 1
            self._streak = self._streak + 1 if connection else 0
            self._check_process()
            if self.stats.dead is None and self._streak >= self.dead_after:
                self.stats.dead = f"{self._streak} requests in a row could not reach {self.url} ({why})"

    def _rank(self, request: FeedRequest) -> np.ndarray | None:
        if self.stats.dead is not None:
            with self._lock:
                self.stats.failed += 1
                self.stats.errors["service dead"] += 1
            return None
        body = {"user_id": request.user_id, "candidates": request.candidates.tolist(), "surface": request.surface,
                "request_time": request.request_time}
        with self._lock:
            self.stats.sent += 1
        try:
            resp = self.client.post("/rank", json=body)
        except httpx.HTTPError as exc:
            self._fail(type(exc).__name__, connection=True)
            return None
        if resp.status_code != 200:
            self._fail(f"HTTP {resp.status_code}", connection=False)
            return None
        try:
            order = np.array([int(it["item_id"]) for it in resp.json()["items"]], dtype=np.int64)
        except (ValueError, KeyError, TypeError):
            self._fail("malformed answer", connection=False)
            return None
        if order.size != request.candidates.size or not np.array_equal(np.sort(order), request.candidates):
            self._fail("answer is not a permutation of the candidates", connection=False)
            return None
        with self._lock:
            self.stats.answered += 1
            self._streak = 0
        return order

    def __call__(self, requests: Sequence[FeedRequest]) -> list[np.ndarray | None]:
        self._check_process()
        return list(self.pool.map(self._rank, requests))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


@dataclass
class ServedArm:
    """A service this test started for a run arm."""

    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc)


def start_service(run: str, store: str, log: Path, timeout_s: float = 180.0,
                  extra: Sequence[str] = ()) -> ServedArm:
    """Start ``lifelong serve --run RUN --store STORE [EXTRA...]`` on a free port; return once it is ready.

    Raises:
        ConfigError: the service exited or did not become ready (naming why: e.g. an empty store).
    """
    port = free_port()
    # The test measures what a ranker does to users, not how fast this machine serves: the
    # deadline and the load shedder are lifted to the client's own timeout, so a slow shared
    # machine never turns into failed requests (504/503) that the users would see as empty feeds.
    limits = ["--max-latency-ms", str(int(HTTP_TIMEOUT_S * 1000)), "--max-queue-examples", "10000000"]
    try:
        proc = start_server(port, ["--run", run, "--store", store, *limits, *extra], timeout_s=timeout_s, log=log)
    except RuntimeError as exc:
        last = " ".join(str(exc).split())[-400:]
        raise ConfigError(f"could not serve {run} with --store {store}: {last}") from None
    url = f"http://127.0.0.1:{port}"
    try:
        ready = httpx.get(f"{url}/readyz", timeout=10.0)
    except httpx.HTTPError as exc:
        stop_process(proc)
        raise ConfigError(f"{url}/readyz did not answer ({type(exc).__name__})") from None
    if ready.status_code != 200:
        reason = ready.json().get("reason", ready.text) if "json" in ready.headers.get("content-type", "") else ready.text
        stop_process(proc)
        raise ConfigError(f"the service of {run} is not ready: {reason}; load the store first with "
                          f"`lifelong store load --data ROWS --store {store}` (rows built from this world)")
    return ServedArm(url=url, proc=proc, log=log)
