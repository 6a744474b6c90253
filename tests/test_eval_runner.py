"""The evaluation runner: batching, exact aggregation across processes, resume after SIGKILL, reports.

The model side is a deterministic stand-in (:class:`ShiftSegmenter`): it predicts each target's ground
truth rolled by a key-dependent offset and flips some [SEG]/[REJ] decisions, so every metric path
(overlap, both-empty, false rejections, missed rejections) is exercised with known, reproducible outputs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from reasonseg.data.samples import Sample, Turn
from reasonseg.evaluation.metrics import GSVA_RULES, LISA_RULES, score_target
from reasonseg.evaluation.report import markdown_table, write_reports
from reasonseg.evaluation.runner import EvalResult, RunConfig, decode_rle, run_evaluation, score_item
from reasonseg.evaluation.segmenter import EvalItem, EvalMode, SegmentResult

TESTS_DIR = Path(__file__).resolve().parent


def make_items(n: int, seed: int = 0) -> list[EvalItem]:
    """``n`` small items: 1-2 targets each, some empty ([REJ]) targets, ignore pixels, short/long groups."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = 24 + (i % 3) * 4, 32
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        k = 1 + (i % 2)
        masks = np.zeros((k, h, w), np.uint8)
        for j in range(k):
            if (i + j) % 5 == 3:
                continue  # no target
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            masks[j, y : y + rng.integers(3, h // 2), x : x + rng.integers(3, w // 2)] = 1
            masks[j, -1, :4] = 255  # a few ignore pixels
        answer = "Sure, " + ", ".join("[SEG]" if m.any() else "[REJ]" for m in masks) + "."
        sample = Sample(
            image=image,
            image_id=f"img{i // 2}",
            turns=[Turn("user", "<image>\nquery"), Turn("assistant", answer)],
            masks=masks,
            kind="gres",
            source="toy",
        )
        items.append(
            EvalItem(key=f"{i:05d}", sample=sample, group="long" if i % 3 else "short", query=f"q{i}")
        )
    return items


class ShiftSegmenter:
    """Predicts ground truth rolled by a key-dependent offset; deterministic; optionally slow."""

    name = "shift-segmenter"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []

    def segment(self, items: Sequence[EvalItem], mode: EvalMode) -> list[SegmentResult]:
        self.calls.append(len(items))
        out = []
        for it in items:
            time.sleep(self.delay_s)
            h = zlib.crc32(it.key.encode())
            gt = it.sample.masks == 1
            pred = np.roll(gt, shift=(h % 3, (h >> 3) % 4), axis=(1, 2))
            rejected = [bool(not m.any()) ^ ((h >> (5 + j)) % 4 == 0) for j, m in enumerate(gt)]
            if mode == "generative":
                pred[np.array(rejected, dtype=bool)] = False  # a generated [REJ] gives the user no mask
            if mode == "generative" and h % 7 == 0:
                pred, rejected = pred[:0], []  # the model wrote no [SEG] at all
            out.append(
                SegmentResult(masks=pred, rejected=rejected, answer="Sure." if mode == "generative" else None)
            )
        return out


def _metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())["metrics"]


def _run(
    out: Path,
    items: list[EvalItem],
    *,
    batch_size: int = 1,
    mode: EvalMode = "teacher-forced",
    seg: ShiftSegmenter | None = None,
) -> EvalResult:
    seg = seg or ShiftSegmenter()
    cfg = RunConfig(out_dir=out, mode=mode, batch_size=batch_size, progress=False)
    result = run_evaluation(seg, items, GSVA_RULES, cfg, groups=("short", "long"), manifest={"data": "toy"})
    write_reports(result, items, out, worst_k=3)
    return result


def test_score_item_matches_per_target_scores() -> None:
    item = make_items(4)[1]  # two targets
    res = ShiftSegmenter().segment([item], "teacher-forced")[0]
    rec = score_item(item, res, GSVA_RULES, "teacher-forced")
    for t, gt, pm, rj in zip(rec["targets"], item.sample.masks, res.masks, res.rejected, strict=True):
        ref = score_target(pm, gt, GSVA_RULES, rejected=rj)
        assert t["giou"] == ref.giou and t["union"] == ref.union and t["outcome"] == ref.outcome
        assert np.array_equal(decode_rle(t["pred_rle"]), pm)


def test_teacher_forced_slot_count_must_match() -> None:
    item = make_items(2)[1]
    bad = SegmentResult(masks=np.zeros((1, *item.sample.hw), bool))
    with pytest.raises(ValueError, match="00001: teacher-forced result has 1 slots for 2 targets"):
        score_item(item, bad, LISA_RULES, "teacher-forced")


def test_generative_missing_slot_is_an_empty_mask() -> None:
    item = make_items(2)[1]
    res = SegmentResult(masks=np.zeros((0, *item.sample.hw), bool), answer="I cannot tell.")
    rec = score_item(item, res, LISA_RULES, "generative")
    assert [t["pred_area"] for t in rec["targets"]] == [0, 0]
    assert [t["slot_present"] for t in rec["targets"]] == [False, False]
    gt_areas = [t["gt_area"] for t in rec["targets"]]
    assert [t["union"] for t in rec["targets"]] == gt_areas
    assert rec["answer"] == "I cannot tell."


def test_batch_size_does_not_change_results(tmp_path: Path) -> None:
    items = make_items(11)
    seg = ShiftSegmenter()
    r1 = _run(tmp_path / "b1", items)
    r4 = _run(tmp_path / "b4", items, batch_size=4, seg=seg)
    assert seg.calls == [4, 4, 3]
    assert r1.summary["metrics"] == r4.summary["metrics"]
    assert _metrics(tmp_path / "b1") == _metrics(tmp_path / "b4")
    assert [r["key"] for r in r4.records] == [it.key for it in items]


def test_reports_are_written(tmp_path: Path) -> None:
    items = make_items(6)
    result = _run(tmp_path, items, mode="generative")
    for name in ("summary.json", "summary.md", "per_sample.jsonl", "iou_histogram.png", "run.json"):
        assert (tmp_path / name).is_file(), name
    lines = (tmp_path / "per_sample.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == [it.key for it in items]
    worst = sorted((tmp_path / "worst").glob("*.png"))
    assert len(worst) == 3
    from PIL import Image

    h, w = items[int(worst[0].name.split("_")[1].split(".")[0])].sample.hw
    # ground truth | prediction, each scaled up to a 320-pixel longest side, under a caption strip
    scale = 320 / max(h, w)
    assert Image.open(worst[0]).size == (2 * round(w * scale), round(h * scale) + 30)
    md = (tmp_path / "summary.md").read_text()
    assert "| overall |" in md and "| short |" in md and "N-acc" in md
    m = result.summary["metrics"]
    assert m["overall"]["n_samples"] == m["short"]["n_samples"] + m["long"]["n_samples"]
    assert markdown_table(result.summary) == md


def test_rerun_skips_finished_and_manifest_mismatch_is_refused(tmp_path: Path) -> None:
    items = make_items(5)
    first = _run(tmp_path, items)
    seg = ShiftSegmenter()
    again = _run(tmp_path, items, seg=seg)
    assert seg.calls == [] and again.computed == 0
    assert again.summary == first.summary
    with pytest.raises(ValueError, match="mode='teacher-forced', not 'generative'"):
        _run(tmp_path, items, mode="generative")
    with pytest.raises(ValueError, match="n_items"):
        _run(tmp_path, items[:4])


def test_a_run_that_did_not_record_a_field_is_not_resumed(tmp_path: Path) -> None:
    """A run directory written before the manifest held a field (e.g. the data digest) cannot be checked
    against a new run: it is refused with a message that says so, rather than resumed."""
    items = make_items(3)
    _run(tmp_path, items)
    manifest = json.loads((tmp_path / "run.json").read_text())
    del manifest["data"]
    (tmp_path / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="did not record data"):
        _run(tmp_path, items)


# -- several processes ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dist_worker(rank: int, world: int, port: int, out: str, n_items: int, batch_size: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from accelerate import PartialState

    state = PartialState(cpu=True)
    assert state.num_processes == world and state.backend == "gloo"
    items = make_items(n_items)
    result = run_evaluation(
        ShiftSegmenter(),
        items,
        GSVA_RULES,
        RunConfig(out_dir=Path(out), mode="teacher-forced", batch_size=batch_size, progress=False),
        groups=("short", "long"),
        manifest={"data": "toy"},
    )
    if state.is_main_process:
        write_reports(result, items, Path(out), worst_k=2)
    state.destroy_process_group()


def test_two_processes_give_the_same_summary_as_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    n = 13  # odd: the processes get different numbers of items
    _run(tmp_path / "one", make_items(n))
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path / "two"), n, 2), nprocs=2, join=True)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "samples.0.jsonl").is_file() and (two / "samples.1.jsonl").is_file()
    assert json.loads((one / "summary.json").read_text()) == json.loads((two / "summary.json").read_text())
    assert (one / "per_sample.jsonl").read_bytes() == (two / "per_sample.jsonl").read_bytes()


# -- kill and resume ------------------------------------------------------------------------------
CHILD = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_eval_runner import ShiftSegmenter, make_items
from reasonseg.evaluation.metrics import GSVA_RULES
from reasonseg.evaluation.runner import RunConfig, run_evaluation
run_evaluation(ShiftSegmenter(delay_s=0.05), make_items({n}), GSVA_RULES,
               RunConfig(out_dir=Path({out!r}), mode="teacher-forced", progress=False),
               groups=("short", "long"), manifest={{"data": "toy"}})
"""


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_summary(tmp_path: Path) -> None:
    n = 40
    out = tmp_path / "killed"
    shard = out / "samples.0.jsonl"
    code = CHILD.format(tests=str(TESTS_DIR), n=n, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if shard.is_file() and shard.read_bytes().count(b"\n") >= 8:
            break
        if proc.poll() is not None:
            pytest.fail(f"child exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = shard.read_bytes().count(b"\n")
    assert 8 <= finished < n, "the kill must land in the middle of the run"
    with open(shard, "ab") as fh:  # and simulate a record torn by the kill
        fh.write(b'{"key":"00039","targets":[{"gi')

    seg = ShiftSegmenter()
    resumed = _run(out, make_items(n), seg=seg)
    assert resumed.computed == sum(seg.calls) == n - finished
    reference = _run(tmp_path / "clean", make_items(n))
    assert resumed.summary == reference.summary
    assert (out / "per_sample.jsonl").read_bytes() == (tmp_path / "clean" / "per_sample.jsonl").read_bytes()
