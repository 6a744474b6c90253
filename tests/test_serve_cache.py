"""The byte-bounded LRU cache shared across requests, and the engine that uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reasonseg.serving.cache import LruBytesCache, image_key, nbytes_of
from reasonseg.serving.engine import SegmentEngine, SegmentJob
from serve_fakes import FakePredictor, make_image


def test_lru_evicts_least_recently_used_by_bytes() -> None:
    cache: LruBytesCache[np.ndarray] = LruBytesCache(capacity_bytes=300)
    for name in "abc":
        assert cache.put(name, np.zeros(100, np.uint8))
    assert cache.get("a") is not None  # a is now the most recent; b is the oldest
    cache.put("d", np.zeros(100, np.uint8))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions, stats.hits) == (3, 300, 1, 1)
    cache.put("e", np.zeros(250, np.uint8))  # needs 250 bytes: evicts until it fits
    assert "e" in cache and cache.stats().bytes <= 300


def test_lru_refuses_entries_larger_than_capacity_and_zero_disables() -> None:
    cache: LruBytesCache[np.ndarray] = LruBytesCache(capacity_bytes=50)
    assert not cache.put("big", np.zeros(51, np.uint8))
    assert len(cache) == 0
    off: LruBytesCache[np.ndarray] = LruBytesCache(capacity_bytes=0)
    value, hit = off.get_or_create("k", lambda: np.zeros(1, np.uint8))
    assert not hit and value.shape == (1,) and len(off) == 0
    with pytest.raises(ValueError, match="capacity_bytes"):
        LruBytesCache(capacity_bytes=-1)


def test_nbytes_counts_tensors_once_and_skips_modules() -> None:
    class Holder:
        def __init__(self) -> None:
            self.model = torch.nn.Linear(1000, 1000)  # shared model: not charged
            self.emb = torch.zeros(2, 256, 8, 8)
            self.same = self.emb  # aliased: counted once
            self.extra = {"tokens": [np.zeros((16, 4), np.float32)]}

    assert nbytes_of(Holder()) == 2 * 256 * 8 * 8 * 4 + 16 * 4 * 4


def test_image_key_is_content_hash() -> None:
    a = make_image()
    assert image_key(a) == image_key(a.copy())
    b = a.copy()
    b[0, 0, 0] ^= 1
    assert image_key(a) != image_key(b)
    assert image_key(a) != image_key(a.reshape(64, 48, 3))


def test_engine_encodes_each_image_once_and_batches_same_image() -> None:
    FakePredictor.reset()
    engine = SegmentEngine(FakePredictor, cache_bytes=10**6)
    img1, img2 = make_image(seed=1), make_image(seed=2)
    k1, k2 = image_key(img1), image_key(img2)
    jobs = [SegmentJob(img1, k1, "bright"), SegmentJob(img2, k2, "dark"), SegmentJob(img1, k1, "dark")]
    results = engine.run(jobs)
    assert FakePredictor.set_image_calls == 2
    assert FakePredictor.batch_calls == [2]  # the two instructions on img1 share one call
    assert [r.batch_size for r in results] == [2, 1, 2]  # type: ignore[union-attr]
    assert [r.cache_hit for r in results] == [False, False, True]  # type: ignore[union-attr]
    again = engine.run([SegmentJob(img2, k2, "bright")])
    assert FakePredictor.set_image_calls == 2 and again[0].cache_hit  # type: ignore[union-attr]
    assert engine.cache.stats().bytes == 2 * 48 * 64 * 4


def test_engine_isolates_a_failing_request_and_passes_history() -> None:
    FakePredictor.reset()
    engine = SegmentEngine(lambda: FakePredictor(fail_on="boom"), cache_bytes=10**6)
    img = make_image()
    key = image_key(img)
    jobs = [
        SegmentJob(img, key, "bright"),
        SegmentJob(img, key, "boom"),
        SegmentJob(img, key, "dark", history=[("user", "hi"), ("assistant", "Sure, [SEG].")]),
    ]
    results = engine.run(jobs)
    assert isinstance(results[1], RuntimeError)
    assert results[0].prediction.text.startswith("Sure")  # type: ignore[union-attr]
    assert results[2].prediction.labels == ["dark part"]  # type: ignore[union-attr]
    turns = [h for h in FakePredictor.histories if h]
    assert [(t.role, t.text) for t in turns[0]] == [("user", "hi"), ("assistant", "Sure, [SEG].")]


def test_engine_without_predict_batch_runs_one_call_each() -> None:
    FakePredictor.reset()
    engine = SegmentEngine(FakePredictor, cache_bytes=10**6, use_predict_batch=False)
    img = make_image()
    key = image_key(img)
    results = engine.run([SegmentJob(img, key, "a"), SegmentJob(img, key, "b")])
    assert FakePredictor.batch_calls == [] and FakePredictor.predict_calls == 2
    assert all(r.batch_size == 1 for r in results)  # type: ignore[union-attr]
