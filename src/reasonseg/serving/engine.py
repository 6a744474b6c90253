"""The bridge between queued requests and the predictor: groups a batch by image, reuses encoded images.

A batch from :class:`~reasonseg.serving.batching.BatchQueue` may hold requests on several images. The engine
groups them by image content hash; for each image it takes a predictor whose ``set_image`` has already run
from the shared :class:`~reasonseg.serving.cache.LruBytesCache` (or creates one and encodes the image once).
The single-turn instructions of the whole batch then go through one ``predict_many`` call across the
images (one batched decode; ``predict_batch`` per image where the predictor has no ``predict_many`` or the
batch holds one image), and the multi-turn ones through ``predict(..., history=...)``. Each cache entry is
a predictor sharing the one model; its size is the bytes of its cached tensors (the model is not counted).

The engine is synchronous and not re-entrant: the queue calls it from one worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from reasonseg.serving.cache import LruBytesCache, nbytes_of

__all__ = ["JobResult", "PredictorLike", "SegmentEngine", "SegmentJob"]


class PredictorLike(Protocol):
    """What the engine needs from :class:`reasonseg.inference.predictor.ReasonSegPredictor`."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(self, instruction: str, history: Sequence[Any] | None = None) -> Any: ...


@dataclass
class SegmentJob:
    """One request: a decoded image (HxWx3 uint8 RGB), its content hash, an instruction, and earlier turns
    as ``(role, text)`` pairs with role ``"user"`` or ``"assistant"`` (empty for a new conversation)."""

    image: np.ndarray
    key: str
    instruction: str
    history: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class JobResult:
    """A prediction plus what it cost: whether the image was already encoded, the seconds spent encoding it
    (0 on a hit), the seconds of the model call it shared, and how many requests shared that call."""

    prediction: Any
    cache_hit: bool
    encode_s: float
    predict_s: float
    batch_size: int


def _to_turns(history: Sequence[tuple[str, str]]) -> list[Any]:
    from reasonseg.data.conversation import Turn

    return [Turn(role=role, text=text) for role, text in history]  # type: ignore[arg-type]


class SegmentEngine:
    """Runs batches of :class:`SegmentJob` with an image-encoder cache shared across requests.

    Args:
        predictor_factory: returns a fresh predictor over the shared model (called once per new image).
        cache_bytes: memory budget of cached encoded images; 0 disables the cache.
        use_predict_batch: run same-image single-turn instructions in one ``predict_batch`` call when the
            predictor has one (False runs them one at a time: the batch-size-1 baseline of the benchmark).
    """

    def __init__(
        self,
        predictor_factory: Callable[[], PredictorLike],
        cache_bytes: int,
        *,
        use_predict_batch: bool = True,
    ) -> None:
        self.predictor_factory = predictor_factory
        self.cache: LruBytesCache[PredictorLike] = LruBytesCache(cache_bytes, sizeof=nbytes_of)
        self.use_predict_batch = use_predict_batch

    def _predictor_for(self, job: SegmentJob) -> tuple[PredictorLike, bool, float]:
        t0 = time.perf_counter()

        def create() -> PredictorLike:
            predictor = self.predictor_factory()
            predictor.set_image(job.image)
            return predictor

        predictor, hit = self.cache.get_or_create(job.key, create)
        return predictor, hit, 0.0 if hit else time.perf_counter() - t0

    def run(self, jobs: Sequence[SegmentJob]) -> list[JobResult | BaseException]:
        """Results in the order of ``jobs``; a failing job yields its exception, the others still run."""
        results: list[JobResult | BaseException | None] = [None] * len(jobs)
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(i)
        ready: list[tuple[list[int], PredictorLike, bool, float]] = []
        for indices in groups.values():
            try:
                ready.append((indices, *self._predictor_for(jobs[indices[0]])))
            except Exception as exc:
                for i in indices:
                    results[i] = exc
        # Single-turn instructions on several images: one batched decode across the images when the
        # predictor class offers it (ReasonSegPredictor.predict_many), else one predict_batch per image.
        singles = [(i, p) for indices, p, _, _ in ready for i in indices if not jobs[i].history]
        many = getattr(type(ready[0][1]), "predict_many", None) if ready else None
        done: set[int] = set()
        if len(ready) > 1 and len(singles) > 1 and self.use_predict_batch and many is not None:
            done = self._run_many(many, jobs, singles, ready, results)
        for indices, predictor, hit, encode_s in ready:
            rest = [i for i in indices if i not in done]
            if len(rest) < len(indices):  # its encode time went to a request answered above
                hit, encode_s = True, 0.0
            self._run_group(jobs, rest, predictor, hit, encode_s, results)
            if jobs[indices[0]].key in self.cache:  # re-measure: predicting may add a prompt-prefix KV cache
                self.cache.put(jobs[indices[0]].key, predictor)
        return [r if r is not None else RuntimeError("job was not run") for r in results]

    def _run_many(
        self,
        many: Callable[..., Sequence[Any]],
        jobs: Sequence[SegmentJob],
        singles: list[tuple[int, PredictorLike]],
        ready: list[tuple[list[int], PredictorLike, bool, float]],
        results: list[JobResult | BaseException | None],
    ) -> set[int]:
        """``predict_many`` over every single-turn job; the jobs it answered (none if it failed: they
        then run per image, which isolates a failing request)."""
        t0 = time.perf_counter()
        try:
            preds = many([p for _, p in singles], [jobs[i].instruction for i, _ in singles])
            if len(preds) != len(singles):
                raise RuntimeError(f"predict_many returned {len(preds)} results for {len(singles)}")
        except Exception:
            return set()
        took = time.perf_counter() - t0
        cost = {id(p): (hit, encode_s) for _, p, hit, encode_s in ready}
        charged: set[int] = set()  # the first request on a freshly encoded image carries its encode time
        for (i, p), pred in zip(singles, preds, strict=True):
            hit, encode_s = cost[id(p)]
            first = id(p) not in charged
            charged.add(id(p))
            results[i] = JobResult(pred, hit or not first, encode_s if first else 0.0, took, len(singles))
        return {i for i, _ in singles}

    def _run_group(
        self,
        jobs: Sequence[SegmentJob],
        indices: list[int],
        predictor: PredictorLike,
        hit: bool,
        encode_s: float,
        results: list[JobResult | BaseException | None],
    ) -> None:
        """One image's jobs: single-turn ones in one ``predict_batch`` call, multi-turn ones one by one."""
        single = [i for i in indices if not jobs[i].history]
        multi = [i for i in indices if jobs[i].history]
        first = True  # the first request answered carries the image's encode time
        if len(single) > 1 and self.use_predict_batch and hasattr(predictor, "predict_batch"):
            t0 = time.perf_counter()
            try:
                preds = predictor.predict_batch([jobs[i].instruction for i in single])  # type: ignore[attr-defined]
                if len(preds) != len(single):
                    raise RuntimeError(f"predict_batch returned {len(preds)} results for {len(single)}")
            except Exception:
                preds = None  # isolate the failing request: fall back to one call each below
            if preds is not None:
                took = time.perf_counter() - t0
                for i, pred in zip(single, preds, strict=True):
                    results[i] = JobResult(
                        pred, hit or not first, encode_s if first else 0.0, took, len(single)
                    )
                    first = False
                single = []
        for i in [*single, *multi]:
            t0 = time.perf_counter()
            try:
                if jobs[i].history:
                    pred = predictor.predict(jobs[i].instruction, history=_to_turns(jobs[i].history))
                else:
                    pred = predictor.predict(jobs[i].instruction)
            except Exception as exc:
                results[i] = exc
                continue
            results[i] = JobResult(
                pred, hit or not first, encode_s if first else 0.0, time.perf_counter() - t0, 1
            )
            first = False
