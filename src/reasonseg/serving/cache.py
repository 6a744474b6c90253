"""A bounded, thread-safe LRU cache measured in bytes, and the helpers that key and size its entries.

The server keeps one *image state* per distinct image (the predictor after ``set_image``: SAM embedding
[1,256,h,w] plus the LM's vision tokens), so a second instruction on the same photo, from any client, skips
the image encoder. Entries are keyed by a hash of the decoded pixels, so the same photo sent twice (or sent
as multipart once and as base64 once) hits the same entry. Memory is bounded by the total size of the
tensors held, not by the number of entries.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Generic, TypeVar

import numpy as np

__all__ = ["CacheStats", "LruBytesCache", "image_key", "nbytes_of"]

V = TypeVar("V")


def image_key(image: np.ndarray) -> str:
    """Content hash of a decoded image (HxWx3 uint8): sha256 over shape, dtype and pixels, hex."""
    arr = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{arr.shape}|{arr.dtype}|".encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def nbytes_of(obj: Any, _seen: set[int] | None = None, _depth: int = 0) -> int:
    """Bytes held by the tensors and arrays reachable from ``obj`` (attributes, dataclass fields, dicts,
    lists and tuples), counting each storage once. ``torch.nn.Module`` instances are skipped: a predictor's
    model is shared by all cache entries and must not be charged to any one of them."""
    seen = _seen if _seen is not None else set()
    if id(obj) in seen or _depth > 6 or obj is None:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    import torch

    if isinstance(obj, torch.nn.Module):
        return 0
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return int(obj.untyped_storage().nbytes())
    if isinstance(obj, (str, bytes, int, float, bool)):
        return 0
    if isinstance(obj, dict):
        return sum(nbytes_of(v, seen, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(nbytes_of(v, seen, _depth + 1) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes_of(getattr(obj, f.name), seen, _depth + 1) for f in fields(obj))
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        return sum(nbytes_of(v, seen, _depth + 1) for v in attrs.values())
    return 0


@dataclass
class CacheStats:
    """Counters of a :class:`LruBytesCache` (a snapshot; safe to serialise)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0


class LruBytesCache(Generic[V]):
    """Least-recently-used cache whose capacity is a number of bytes.

    Each entry carries its size (measured once when stored). Storing past the capacity evicts the least
    recently used entries first; an entry larger than the whole capacity is not stored at all (the caller
    still gets its value). ``capacity_bytes=0`` disables caching. All methods are thread-safe.
    """

    def __init__(self, capacity_bytes: int, sizeof: Callable[[V], int] = nbytes_of) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes={capacity_bytes}: must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._sizeof = sizeof
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = CacheStats(capacity_bytes=capacity_bytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: str) -> V | None:
        """The value stored under ``key`` (marking it most recently used), or ``None``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._stats.misses += 1
                return None
            self._items.move_to_end(key)
            self._stats.hits += 1
            return item[0]

    def put(self, key: str, value: V) -> bool:
        """Store ``value`` under ``key``; returns False when it is larger than the whole capacity."""
        size = int(self._sizeof(value))
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.capacity_bytes:
                return False
            while self._items and self._bytes + size > self.capacity_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self._stats.evictions += 1
            self._items[key] = (value, size)
            self._bytes += size
            return True

    def get_or_create(self, key: str, create: Callable[[], V]) -> tuple[V, bool]:
        """``(value, hit)``: the cached value, or a new one from ``create()`` which is then stored.

        ``create`` runs outside the lock, so a slow encoder never blocks readers of other keys.
        """
        value = self.get(key)
        if value is not None:
            return value, True
        value = create()
        self.put(key, value)
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._stats.hits,
                misses=self._stats.misses,
                evictions=self._stats.evictions,
                entries=len(self._items),
                bytes=self._bytes,
                capacity_bytes=self.capacity_bytes,
            )
