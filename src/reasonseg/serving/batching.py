"""An asyncio request queue that gathers concurrent requests into batches for one model worker.

Requests are awaited by their HTTP handlers; a single worker task takes the first waiting request, lets
others join for up to ``max_wait_s`` (or until ``max_batch_size``), and runs the batch in one dedicated
thread, so the model is never used by two threads at once and the event loop keeps serving (health checks,
uploads, errors) while the model works. A request that times out is dropped from its batch if the batch has
not started yet; a full queue refuses new requests at once (:class:`QueueFullError`) instead of growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["BatchQueue", "BatchStats", "QueueFullError"]

J = TypeVar("J")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """The queue already holds ``max_queue`` waiting requests."""


@dataclass
class BatchStats:
    """Counters of a :class:`BatchQueue`: batches run, requests served, and how often each size occurred."""

    batches: int = 0
    requests: int = 0
    dropped: int = 0
    sizes: Counter[int] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "dropped": self.dropped,
            "mean_batch_size": round(self.requests / self.batches, 3) if self.batches else 0.0,
            "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


@dataclass
class _Pending(Generic[J, R]):
    job: J
    future: asyncio.Future[R]
    enqueued: float


class BatchQueue(Generic[J, R]):
    """Batches concurrent ``submit`` calls into calls of ``run_batch``.

    Args:
        run_batch: synchronous; takes the jobs of one batch and returns one result or exception per job,
            in order. It runs in a dedicated worker thread.
        max_batch_size: most jobs per call.
        max_wait_s: how long the first job of a batch waits for company (0: take only what is waiting).
        max_queue: most jobs waiting at once.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[J]], Sequence[R | BaseException]],
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
        max_queue: int = 256,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: must be >= 1")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s={max_wait_s}: must be >= 0")
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue}: must be >= 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending[J, R]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet taken into a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the worker on the running event loop (idempotent)."""
        if self._worker is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reasonseg-model")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="reasonseg-batcher")

    async def stop(self) -> None:
        """Stop the worker; queued jobs fail with ``RuntimeError``, a running batch is let finish."""
        if self._worker is None:
            return
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        assert self._queue is not None and self._executor is not None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("server is shutting down"))
        self._executor.shutdown(wait=True)
        self._worker = self._queue = self._executor = None

    async def submit(self, job: J, timeout_s: float | None = None) -> R:
        """Queue ``job`` and wait for its result.

        Raises:
            QueueFullError: ``max_queue`` jobs are already waiting.
            TimeoutError: no result within ``timeout_s`` seconds (the job is skipped if not yet started).
            RuntimeError: the queue is not running.
            Exception: whatever ``run_batch`` returned for this job.
        """
        if self._queue is None:
            raise RuntimeError("BatchQueue.submit called before start()")
        loop = asyncio.get_running_loop()
        pending = _Pending(job, loop.create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.max_queue} requests are already waiting; retry later") from None
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            pending.future.cancel()  # the worker skips it if its batch has not started
            raise

    async def _next_batch(self) -> list[_Pending[J, R]]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [p for p in batch if not p.future.done()]
            self.stats.dropped += len(batch) - len(live)
            if not live:
                continue
            jobs = [p.job for p in live]
            try:
                results: Sequence[R | BaseException] = await loop.run_in_executor(
                    self._executor, self.run_batch, jobs
                )
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} jobs")
            except Exception as exc:
                results = [exc] * len(live)
            self.stats.batches += 1
            self.stats.requests += len(live)
            self.stats.sizes[len(live)] += 1
            for pending, result in zip(live, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
