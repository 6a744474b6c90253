"""Append-only, crash-safe per-sample result store (JSON Lines).

One JSON object per line, each with a unique ``"key"``. Every append is written, flushed and
``fsync``-ed before :meth:`ResultStore.append` returns, so a kill at any moment loses at most the
record being written. A torn last line (a write cut short by a kill: no trailing newline, or not
valid JSON) is detected on load, dropped, and truncated away before the next append. Damage
anywhere else in the file is not a crash artefact and raises an error naming the file and line.

Several processes evaluate one run by each appending to its own shard (``samples.<rank>.jsonl``);
:func:`load_shards` reads all of them, so a rerun with a different process count still skips what
any earlier process finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ResultStore", "StoreCorruptError", "load_shards", "shard_path"]


class StoreCorruptError(ValueError):
    """A result file is damaged somewhere other than its last line."""


def shard_path(directory: str | Path, rank: int) -> Path:
    """Path of process ``rank``'s shard inside a run directory."""
    return Path(directory) / f"samples.{rank}.jsonl"


class ResultStore:
    """One JSONL file of per-sample records keyed by ``record["key"]``.

    Usage::

        store = ResultStore(path)
        done = store.load()            # {key: record}, torn tail dropped
        with store.open() as w:        # truncates a torn tail, then appends
            w.append({"key": "000001", ...})
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh: Any = None

    # -- reading ---------------------------------------------------------------------------------
    def _scan(self) -> tuple[dict[str, dict[str, Any]], int]:
        """Parse the file. Returns the records and the byte length of the intact prefix."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return records, 0
        data = self.path.read_bytes()
        good = 0
        lines = data.split(b"\n")
        # ``split`` leaves a final element: b"" when the file ends with a newline, else the torn tail.
        for lineno, raw in enumerate(lines, start=1):
            is_last = lineno == len(lines)
            if is_last:
                break  # complete lines all ended with "\n"; whatever follows the last one is torn
            if not raw.strip():
                good += len(raw) + 1
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                    raise ValueError("record is not an object with a string 'key'")
            except ValueError as exc:
                if lineno == len(lines) - 1 and not lines[-1]:
                    # A last line that ends in "\n" but does not parse: a torn write whose newline
                    # landed (e.g. zero-filled blocks after a power cut). Drop it too.
                    break
                raise StoreCorruptError(f"{self.path}: line {lineno} is not a valid record: {exc}") from exc
            records.setdefault(rec["key"], rec)  # a repeated key (two runs racing) keeps the first
            good += len(raw) + 1
        return records, good

    def load(self) -> dict[str, dict[str, Any]]:
        """All intact records by key (a torn last line is ignored, the file is left untouched)."""
        return self._scan()[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.load().values())

    # -- writing ---------------------------------------------------------------------------------
    def open(self) -> ResultStore:
        """Open for appending, first truncating a torn tail so the next record starts on a fresh line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _, good = self._scan()
        if self.path.exists() and self.path.stat().st_size != good:
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
        self._fh = open(self.path, "ab")  # noqa: SIM115 - closed in close()/__exit__
        return self

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably: one line, flushed and fsync-ed before returning."""
        if self._fh is None:
            raise RuntimeError(f"{self.path}: store is not open for appending (use ResultStore.open())")
        if not isinstance(record.get("key"), str):
            raise ValueError(f"{self.path}: a record needs a string 'key', got {record.get('key')!r}")
        line = json.dumps(record, separators=(",", ":"), sort_keys=True, allow_nan=False).encode() + b"\n"
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ResultStore:
        if self._fh is None:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_shards(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Union of the records in every ``samples.*.jsonl`` shard of a run directory.

    Shards are read in rank order and the first record of a key wins; a key is only ever found twice
    when two runs raced on the same directory, and both then hold the result of the same evaluation
    (the run's manifest pins model, data and mode).
    """
    merged: dict[str, dict[str, Any]] = {}
    paths = sorted(Path(directory).glob("samples.*.jsonl"), key=lambda p: (len(p.name), p.name))
    for path in paths:
        for key, rec in ResultStore(path).load().items():
            merged.setdefault(key, rec)
    return merged
