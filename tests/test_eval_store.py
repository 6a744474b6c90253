"""The append-only result store: durability, torn tails, resume across shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonseg.evaluation.store import ResultStore, StoreCorruptError, load_shards, shard_path


def _rec(i: int) -> dict:
    return {"key": f"k{i:03d}", "value": i, "giou": i / 7}


def test_append_and_load_round_trip(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.jsonl")
    with store.open() as w:
        for i in range(5):
            w.append(_rec(i))
    loaded = store.load()
    assert list(loaded) == [f"k{i:03d}" for i in range(5)]
    assert loaded["k003"] == _rec(3)  # floats round-trip exactly through JSON


def test_torn_last_line_is_dropped_then_truncated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with ResultStore(path).open() as w:
        w.append(_rec(0))
        w.append(_rec(1))
    good_size = path.stat().st_size
    with open(path, "ab") as fh:  # a write cut short by a kill: no newline, half an object
        fh.write(b'{"key":"k002","val')
    assert list(ResultStore(path).load()) == ["k000", "k001"]
    assert path.stat().st_size > good_size  # load() leaves the file alone
    with ResultStore(path).open() as w:  # open() repairs, then appends on a fresh line
        assert path.stat().st_size == good_size
        w.append(_rec(2))
    assert list(ResultStore(path).load()) == ["k000", "k001", "k002"]


def test_last_line_with_newline_but_garbage_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(json.dumps(_rec(0)).encode() + b"\n" + b"\x00\x00\x00\n")
    assert list(ResultStore(path).load()) == ["k000"]


def test_damage_in_the_middle_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(_rec(0)) + "\n{broken\n" + json.dumps(_rec(2)) + "\n")
    with pytest.raises(StoreCorruptError, match=r"s\.jsonl: line 2"):
        ResultStore(path).load()


def test_record_without_key_is_refused(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "s.jsonl").open() as w, pytest.raises(ValueError, match="'key'"):
        w.append({"value": 1})
    with pytest.raises(RuntimeError, match="not open"):
        ResultStore(tmp_path / "t.jsonl").append(_rec(0))


def test_shards_are_merged_first_record_wins(tmp_path: Path) -> None:
    for rank, idx in ((0, [0, 2]), (1, [1, 3]), (10, [2])):
        with ResultStore(shard_path(tmp_path, rank)).open() as w:
            for i in idx:
                w.append(_rec(i) | ({"from": rank} if i == 2 else {}))
    merged = load_shards(tmp_path)
    assert sorted(merged) == ["k000", "k001", "k002", "k003"]
    assert merged["k002"]["from"] == 0  # shard 0 read before shard 10
