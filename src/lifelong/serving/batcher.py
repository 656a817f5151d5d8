"""Dynamic batching: concurrent requests merged into one model call, run off the event loop.

Requests wait in a queue; a collector takes the first, then keeps taking more until the batch
holds ``max_examples`` candidates or ``max_wait_ms`` has passed since the first arrived, and
hands the batch to one worker thread. One worker (not a pool) because the model already uses
every core through torch's intra-op threads; while it runs, the collector fills the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from lifelong.core.errors import ConfigError
from lifelong.serving.metrics import ServiceMetrics

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchingConfig:
    """Limits of one model batch.

    Args:
        max_examples: candidates per batch; a single larger request still runs, alone.
        max_wait_ms: longest a request waits for others to join its batch.
        max_queue: requests waiting at most; beyond it ``submit`` raises :class:`QueueFull`.
    """

    max_examples: int = 2048
    max_wait_ms: float = 2.0
    max_queue: int = 4096

    def __post_init__(self) -> None:
        if self.max_examples < 1 or self.max_wait_ms < 0 or self.max_queue < 1:
            raise ConfigError(f"invalid batching limits {self}")


class QueueFull(RuntimeError):
    """The service is saturated; the caller should answer 503 and let the client retry."""


class DynamicBatcher(Generic[T, R]):
    """Collects items submitted from the event loop into batches for ``run_batch``.

    Args:
        run_batch: maps a list of items to a list of results (same order); runs in a thread.
        size: number of examples an item contributes to a batch.
        cfg: batching limits.
        metrics: where batch sizes and queue depth are recorded.

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
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task | None = None
        self._carried: tuple[T, asyncio.Future[R]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lifelong-batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, item: T) -> R:
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        if self._queue.qsize() >= self.cfg.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests already waiting")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        self.metrics.queue_depth = self._queue.qsize()
        return await fut

    async def _next(self, timeout: float | None) -> tuple[T, asyncio.Future[R]] | None:
        """The next waiting item (the one carried over from the last batch first), or None."""
        assert self._queue is not None
        if self._carried is not None:
            item, self._carried = self._carried, None
            return item
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout is not None and timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        first = await self._next(None)
        assert first is not None
        batch, examples = [first], self.size(first[0])
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
        while examples < self.cfg.max_examples:
            nxt = await self._next(deadline - time.monotonic())
            if nxt is None:
                break
            if examples + self.size(nxt[0]) > self.cfg.max_examples:
                self._carried = nxt  # too big to join: it opens the next batch, without waiting a round
                break
            batch.append(nxt)
            examples += self.size(nxt[0])
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self.metrics.queue_depth = self._queue.qsize() if self._queue else 0
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            items = [item for item, _ in live]
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
            except Exception as exc:  # the batch failed as a whole: every waiting request learns why
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.metrics.batch(len(items), sum(self.size(i) for i in items))
            for (_, fut), res in zip(live, results):
                if not fut.done():
                    fut.set_result(res)
