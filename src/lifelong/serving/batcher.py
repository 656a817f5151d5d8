"""Dynamic batching: concurrent requests merged into one model call, run off the event loop.

Requests wait in a queue; a collector takes the first, then keeps taking more until the batch
holds ``max_examples`` candidates or ``max_wait_ms`` has passed since the first arrived, and
hands the batch to one worker thread. One worker (not a pool) because the model already uses
every core through torch's intra-op threads; while it runs, the collector fills the next batch.

**Bounded work.** The queue is bounded in *examples* (candidates), not requests: a request is
refused with :class:`QueueFull` when the examples already waiting plus its own would exceed
``max_queue_examples`` (a request arriving at an empty queue is always taken, so one request of
any allowed size still runs). Each request may carry a deadline and a ``gone`` probe (is the
client still there?); right before a batch is handed to the worker, requests whose deadline
has passed or whose client has gone are dropped, never scored, and counted in the metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lifelong.core.errors import ConfigError
from lifelong.serving.metrics import ServiceMetrics

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchingConfig:
    """Limits of one model batch and of the queue in front of it.

    Args:
        max_examples: candidates per batch; a single larger request still runs, alone.
        max_wait_ms: longest a request waits for others to join its batch.
        max_queue_examples: candidates waiting at most; beyond it ``submit`` raises
            :class:`QueueFull` (the service answers 503). The default, 640, is what the optimized
            path scores in about 0.5 s on the 2-core reference machine (1,281 examples/s in
            docs/benchmarks.md, "End to end over HTTP").
    """

    max_examples: int = 2048
    max_wait_ms: float = 2.0
    max_queue_examples: int = 640

    def __post_init__(self) -> None:
        if self.max_examples < 1 or self.max_wait_ms < 0 or self.max_queue_examples < 1:
            raise ConfigError(f"invalid batching limits {self}")


class QueueFull(RuntimeError):
    """The service is saturated; the caller should answer 503 and let the client retry."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed before it was scored; it was dropped unscored."""


class ClientGone(RuntimeError):
    """The request's client disconnected before it was scored; it was dropped unscored."""


@dataclass
class _Entry(Generic[T, R]):
    item: T
    fut: asyncio.Future[R]
    size: int
    deadline: float | None  # time.monotonic() seconds
    gone: Callable[[], Awaitable[bool]] | None
    queued: bool = True  # counted in the queue's examples
    submitted: float = field(default_factory=time.monotonic)
    dispatched: bool = False  # handed to the worker: it will be scored


class DynamicBatcher(Generic[T, R]):
    """Collects items submitted from the event loop into batches for ``run_batch``.

    Args:
        run_batch: maps a list of items to a list of results (same order); runs in a thread.
        size: number of examples an item contributes to a batch.
        cfg: batching limits.
        metrics: where batch sizes, queue depth and dropped examples are recorded.

    Example::

        async def main():
            batcher = DynamicBatcher(lambda xs: [x * 2 for x in xs], size=lambda x: 1)
            await batcher.start()
            print(await asyncio.gather(*(batcher.submit(i) for i in range(3))))  # [0, 2, 4]
            await batcher.stop()
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], size: Callable[[T], int],
                 cfg: BatchingConfig = BatchingConfig(), metrics: ServiceMetrics | None = None):
        self.run_batch, self.size, self.cfg = run_batch, size, cfg
        self.metrics = metrics or ServiceMetrics()
        self._queue: asyncio.Queue[_Entry[T, R]] | None = None
        self._task: asyncio.Task | None = None
        self._carried: _Entry[T, R] | None = None
        self._queued_examples = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lifelong-batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    @property
    def alive(self) -> bool:
        """Whether the batching loop runs (a loop that died would time every request out)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    @property
    def queued_examples(self) -> int:
        """Candidates waiting for a batch (not counting the batch being scored)."""
        return self._queued_examples

    async def submit(self, item: T, deadline: float | None = None,
                     gone: Callable[[], Awaitable[bool]] | None = None) -> R:
        """Queue ``item`` and wait for its result.

        Args:
            deadline: ``time.monotonic()`` after which the item is dropped unscored
                (:class:`DeadlineExceeded`); the wait never outlasts it.
            gone: async probe, True once the client has disconnected; checked right before the
                item's batch is scored (:class:`ClientGone`).

        Raises:
            QueueFull: the queue already holds ``max_queue_examples`` candidates.
        """
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        n = self.size(item)
        if self._queued_examples > 0 and self._queued_examples + n > self.cfg.max_queue_examples:
            raise QueueFull(f"{self._queued_examples} candidates already waiting "
                            f"(at most {self.cfg.max_queue_examples})")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        entry = _Entry(item, fut, n, deadline, gone)
        self._queue.put_nowait(entry)
        self._queued_examples += n
        self._gauge()
        if deadline is None:
            return await fut
        try:
            # wait_for cancels ``fut`` at the deadline: the collector then skips it unscored.
            return await asyncio.wait_for(fut, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if not entry.dispatched:
                self._unqueue(entry)
                self.metrics.dropped("deadline", n)
            raise DeadlineExceeded("the deadline passed before the request was scored") from None

    def _unqueue(self, entry: _Entry[T, R]) -> None:
        if entry.queued:
            entry.queued = False
            self._queued_examples -= entry.size
            self._gauge()

    def _gauge(self) -> None:
        self.metrics.queue_depth = self._queue.qsize() if self._queue else 0
        self.metrics.queue_examples = self._queued_examples

    def _take(self) -> _Entry[T, R]:
        assert self._queue is not None
        entry = self._queue.get_nowait()
        self._unqueue(entry)
        return entry

    async def _next(self, timeout: float | None) -> _Entry[T, R] | None:
        """The next waiting entry (the one carried over from the last batch first), or None."""
        assert self._queue is not None
        if self._carried is not None:
            entry, self._carried = self._carried, None
            return entry
        if not self._queue.empty():
            return self._take()
        if timeout is not None and timeout <= 0:
            return None
        try:
            entry = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        self._unqueue(entry)
        return entry

    async def _collect(self) -> list[_Entry[T, R]]:
        first = await self._next(None)
        assert first is not None
        batch, examples = [first], first.size
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
        while examples < self.cfg.max_examples:
            nxt = await self._next(deadline - time.monotonic())
            if nxt is None:
                break
            if examples + nxt.size > self.cfg.max_examples:
                self._carried = nxt  # too big to join: it opens the next batch, without waiting a round
                break
            batch.append(nxt)
            examples += nxt.size
        return batch

    async def _drop_dead(self, batch: list[_Entry[T, R]]) -> list[_Entry[T, R]]:
        """The entries still worth scoring: the others are failed (or were cancelled) and counted."""
        live, now = [], time.monotonic()
        for e in batch:
            if e.fut.done():  # cancelled: its waiter timed out (counted there) or went away
                continue
            if e.deadline is not None and now >= e.deadline:
                e.fut.set_exception(DeadlineExceeded("the deadline passed before the request was scored"))
                self.metrics.dropped("deadline", e.size)
            elif e.gone is not None and await e.gone():
                if not e.fut.done():  # its waiter may have given up while we asked
                    e.fut.set_exception(ClientGone("the client disconnected before the request was scored"))
                self.metrics.dropped("client_gone", e.size)
            else:
                live.append(e)
        return live

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._gauge()
            live = await self._drop_dead(batch)
            if not live:
                continue
            now = time.monotonic()
            for e in live:
                e.dispatched = True
                self.metrics.stages.add("queue", now - e.submitted)
            items = [e.item for e in live]
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
            except Exception as exc:  # the batch failed as a whole: every waiting request learns why
                for e in live:
                    if not e.fut.done():
                        e.fut.set_exception(exc)
                continue
            self.metrics.batch(len(items), sum(e.size for e in live))
            for e, res in zip(live, results):
                if not e.fut.done():
                    e.fut.set_result(res)
