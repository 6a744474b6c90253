"""The asyncio queue that batches concurrent requests into one model call."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from reasonseg.serving.batching import BatchQueue, QueueFullError


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_concurrent_submits_share_batches_up_to_the_limit() -> None:
    seen: list[list[int]] = []
    threads: set[int] = set()

    def run_batch(jobs: Sequence[int]) -> list[int]:
        seen.append(list(jobs))
        threads.add(threading.get_ident())
        time.sleep(0.02)
        return [j * 10 for j in jobs]

    async def main() -> list[int]:
        q: BatchQueue[int, int] = BatchQueue(run_batch, max_batch_size=4, max_wait_s=0.05)
        await q.start()
        try:
            return await asyncio.gather(*(q.submit(i, timeout_s=5) for i in range(10)))
        finally:
            await q.stop()

    out = _run(main())
    assert out == [i * 10 for i in range(10)]
    assert max(len(b) for b in seen) == 4 and sum(len(b) for b in seen) == 10
    assert len(seen) == 3  # 4 + 4 + 2
    assert len(threads) == 1  # one model thread


def test_errors_are_per_job() -> None:
    def run_batch(jobs: Sequence[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {j}") if j % 2 else j for j in jobs]

    async def main() -> list[object]:
        q: BatchQueue[int, int] = BatchQueue(run_batch, max_batch_size=8, max_wait_s=0.02)
        await q.start()
        try:
            return await asyncio.gather(*(q.submit(i) for i in range(4)), return_exceptions=True)
        finally:
            await q.stop()

    out = _run(main())
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], ValueError) and "bad 1" in str(out[1])


def test_a_crashing_batch_fails_its_jobs_and_the_queue_keeps_working() -> None:
    calls = 0

    def run_batch(jobs: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("model crashed")
        return list(jobs)

    async def main() -> tuple[BaseException | int, int]:
        q: BatchQueue[int, int] = BatchQueue(run_batch, max_batch_size=2, max_wait_s=0)
        await q.start()
        try:
            first = await asyncio.gather(q.submit(1), return_exceptions=True)
            return first[0], await q.submit(2)
        finally:
            await q.stop()

    first, second = _run(main())
    assert isinstance(first, RuntimeError) and second == 2


def test_timeout_drops_a_job_that_has_not_started() -> None:
    ran: list[int] = []
    release = threading.Event()

    def run_batch(jobs: Sequence[int]) -> list[int]:
        ran.extend(jobs)
        release.wait(2)
        return list(jobs)

    async def main() -> None:
        q: BatchQueue[int, int] = BatchQueue(run_batch, max_batch_size=1, max_wait_s=0)
        await q.start()
        try:
            blocker = asyncio.ensure_future(q.submit(1, timeout_s=5))
            await asyncio.sleep(0.05)  # job 1 now holds the model thread
            with pytest.raises(TimeoutError):
                await q.submit(2, timeout_s=0.05)
            release.set()
            assert await blocker == 1
            assert await q.submit(3, timeout_s=5) == 3
        finally:
            await q.stop()
        assert ran == [1, 3] and q.stats.dropped == 1

    _run(main())


def test_full_queue_refuses_at_once() -> None:
    release = threading.Event()

    def run_batch(jobs: Sequence[int]) -> list[int]:
        release.wait(2)
        return list(jobs)

    async def main() -> None:
        q: BatchQueue[int, int] = BatchQueue(run_batch, max_batch_size=1, max_wait_s=0, max_queue=2)
        await q.start()
        try:
            running = asyncio.ensure_future(q.submit(0))
            await asyncio.sleep(0.05)
            waiting = [asyncio.ensure_future(q.submit(i)) for i in (1, 2)]
            await asyncio.sleep(0.01)
            with pytest.raises(QueueFullError, match="already waiting"):
                await q.submit(3)
            release.set()
            assert await asyncio.gather(running, *waiting) == [0, 1, 2]
        finally:
            await q.stop()

    _run(main())


def test_submit_before_start_and_bad_arguments() -> None:
    q: BatchQueue[int, int] = BatchQueue(lambda jobs: list(jobs))
    with pytest.raises(RuntimeError, match="before start"):
        _run(q.submit(1))
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchQueue(lambda jobs: list(jobs), max_batch_size=0)
