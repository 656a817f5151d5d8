"""Prometheus text-format metrics of the ranking service, without a client library.

The service is one process with one event loop, so plain counters updated from the loop (and
from the single batch worker thread, under a lock) are enough; ``render`` writes the text
exposition format (version 0.0.4) that Prometheus scrapes from ``GET /metrics``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class Histogram:
    """Cumulative-bucket histogram, as Prometheus defines one.

    Example::

        >>> h = Histogram((1.0, 2.0))
        >>> h.observe(1.5); h.observe(3.0)
        >>> h.counts, h.count, h.total
        ([0, 1, 1], 2, 4.5)
    """

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last slot is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]
        return out


class StageClock:
    """Wall seconds spent in each named stage of serving, summed over calls (thread-safe).

    The ranker times its stages of a batch (``fetch``, ``nn_search``, ``prepare``, ``forward``,
    ``finish``); the batcher times each request's wait for a batch (``queue``). ``/metrics``
    exposes the sums as ``lifelong_stage_seconds_total{stage=...}``, so the difference of two
    scrapes says where a load step's time went (``lifelong bench serve`` prints it).

    Example::

        >>> clock = StageClock()
        >>> with clock.stage("forward"):
        ...     pass
        >>> clock.add("queue", 0.25); clock.add("queue", 0.5)
        >>> clock.seconds["queue"], clock.calls["queue"], sorted(clock.seconds)
        (0.75, 2, ['forward', 'queue'])
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` body as one call of stage ``name`` (counted even when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def lines(self) -> list[str]:
        with self._lock:
            return ["# HELP lifelong_stage_seconds_total Wall seconds spent in each serving stage (queue: summed over requests).",
                    "# TYPE lifelong_stage_seconds_total counter",
                    *(f'lifelong_stage_seconds_total{{stage="{k}"}} {v!r}' for k, v in sorted(self.seconds.items())),
                    "# HELP lifelong_stage_calls_total Times each serving stage ran (batches; queue: requests).",
                    "# TYPE lifelong_stage_calls_total counter",
                    *(f'lifelong_stage_calls_total{{stage="{k}"}} {n}' for k, n in sorted(self.calls.items()))]


def parse_stage_seconds(text: str) -> dict[str, float]:
    """``{stage: seconds}`` of a ``/metrics`` page's ``lifelong_stage_seconds_total`` lines, plus
    ``answered`` (seconds) and ``answers``: the sum and count of its request latency histogram.

    Example::

        >>> parse_stage_seconds('lifelong_stage_seconds_total{stage="forward"} 1.5\\nother 2')
        {'forward': 1.5}
        >>> parse_stage_seconds('lifelong_request_latency_seconds_sum 3.0\\nlifelong_request_latency_seconds_count 4')
        {'answered': 3.0, 'answers': 4.0}
    """
    prefix = 'lifelong_stage_seconds_total{stage="'
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            out[line[len(prefix):].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("lifelong_request_latency_seconds_sum "):
            out["answered"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("lifelong_request_latency_seconds_count "):
            out["answers"] = float(line.rsplit(" ", 1)[1])
    return out


CAUSES = ("invalid", "unknown_items", "too_many_candidates", "body_too_large", "body_timeout", "overloaded",
          "deadline", "client_gone", "store_unavailable", "no_model", "internal")
"""Why a ``/rank`` request was not answered 200: the ``cause`` label of ``lifelong_errors_total``."""


class ServiceMetrics:
    """Request counters by status and by cause, a latency histogram, batch sizes, the queue.

    Example::

        >>> m = ServiceMetrics()
        >>> m.request(200, 0.004); m.request(422, 0.001, cause="invalid")
        >>> 'lifelong_requests_total{status="422"} 1' in m.render()
        True
        >>> 'lifelong_errors_total{cause="invalid"} 1' in m.render()
        True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[int, int] = defaultdict(int)
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.batch_examples = Histogram(BATCH_BUCKETS)
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.cold_start = 0
        self.syncs: dict[str, int] = defaultdict(int)
        self.queue_depth = 0
        self.queue_examples = 0
        self.examples = 0
        self.errors: dict[str, int] = defaultdict(int)
        self.dropped_examples: dict[str, int] = defaultdict(int)
        self.store_errors = 0
        self.ready: bool | None = None
        self.stages = StageClock()

    def request(self, status: int, seconds: float, cause: str | None = None) -> None:
        """A ``/rank`` request was answered ``status``; a non-200 names its ``cause`` (see :data:`CAUSES`)."""
        with self._lock:
            self.requests[status] += 1
            self.latency.observe(seconds)
            if status != 200:
                self.errors[cause or ("internal" if status >= 500 else "invalid")] += 1

    def dropped(self, cause: str, n_examples: int) -> None:
        """``n_examples`` candidates were dropped before scoring (``deadline`` or ``client_gone``)."""
        with self._lock:
            self.dropped_examples[cause] += n_examples

    def store_error(self) -> None:
        """A batch failed because the feature store could not answer."""
        with self._lock:
            self.store_errors += 1

    def batch(self, n_requests: int, n_examples: int) -> None:
        with self._lock:
            self.batch_requests.observe(n_requests)
            self.batch_examples.observe(n_examples)
            self.examples += n_examples

    def cold(self, n: int = 1) -> None:
        with self._lock:
            self.cold_start += n

    def sync(self, ok: bool) -> None:
        """A parameter push was applied (``ok``) or refused."""
        with self._lock:
            self.syncs["applied" if ok else "refused"] += 1

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP lifelong_requests_total Ranking requests answered, by HTTP status.",
                     "# TYPE lifelong_requests_total counter"]
            lines += [f'lifelong_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# HELP lifelong_errors_total Requests not answered 200, by cause (sum them for all errors).",
                      "# TYPE lifelong_errors_total counter",
                      *(f'lifelong_errors_total{{cause="{c}"}} {self.errors.get(c, 0)}'
                        for c in sorted({*CAUSES, *self.errors})),
                      "# HELP lifelong_store_errors_total Model batches failed because the feature store could not answer.",
                      "# TYPE lifelong_store_errors_total counter", f"lifelong_store_errors_total {self.store_errors}",
                      "# HELP lifelong_dropped_examples_total Candidates dropped before scoring, by cause.",
                      "# TYPE lifelong_dropped_examples_total counter",
                      *(f'lifelong_dropped_examples_total{{cause="{c}"}} {self.dropped_examples.get(c, 0)}'
                        for c in sorted({"deadline", "client_gone", *self.dropped_examples})),
                      "# HELP lifelong_request_latency_seconds Time from receiving a request to answering it.",
                      "# TYPE lifelong_request_latency_seconds histogram",
                      *self.latency.lines("lifelong_request_latency_seconds"),
                      "# HELP lifelong_batch_examples Candidates scored per model batch.",
                      "# TYPE lifelong_batch_examples histogram",
                      *self.batch_examples.lines("lifelong_batch_examples"),
                      "# HELP lifelong_batch_requests Requests merged into one model batch.",
                      "# TYPE lifelong_batch_requests histogram",
                      *self.batch_requests.lines("lifelong_batch_requests"),
                      "# HELP lifelong_examples_total Candidates scored.",
                      "# TYPE lifelong_examples_total counter", f"lifelong_examples_total {self.examples}",
                      "# HELP lifelong_cold_start_total Requests of users without stored sequences.",
                      "# TYPE lifelong_cold_start_total counter", f"lifelong_cold_start_total {self.cold_start}",
                      "# HELP lifelong_syncs_total Parameter pushes from the online trainer, by outcome.",
                      "# TYPE lifelong_syncs_total counter",
                      *(f'lifelong_syncs_total{{outcome="{o}"}} {n}' for o, n in sorted(self.syncs.items())),
                      "# HELP lifelong_queue_depth Requests waiting for a batch.",
                      "# TYPE lifelong_queue_depth gauge", f"lifelong_queue_depth {self.queue_depth}",
                      "# HELP lifelong_queue_examples Candidates waiting for a batch (bounded by max_queue_examples).",
                      "# TYPE lifelong_queue_examples gauge", f"lifelong_queue_examples {self.queue_examples}",
                      *self.stages.lines()]
            if self.ready is not None:
                lines += ["# HELP lifelong_ready Whether the last readiness probe (/readyz) found the ranker ready.",
                          "# TYPE lifelong_ready gauge", f"lifelong_ready {int(self.ready)}"]
        return "\n".join(lines) + "\n"
