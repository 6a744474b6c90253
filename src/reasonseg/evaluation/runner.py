"""Run an evaluation: batches, several processes through accelerate, exact aggregation, resume.

How a run goes (every process runs this function; ``accelerate launch`` starts them):

1. The main process writes the run manifest (``run.json``: model, data, mode, the item keys' hash)
   or checks it against the one already there, so a rerun never mixes two different evaluations.
2. Every process reads the finished records of all shards (``samples.<rank>.jsonl``) and drops
   those items; the rest is dealt out round-robin over the processes.
3. Each process scores its items batch by batch and appends one record per item to its own shard,
   fsync-ed: a kill loses at most the batch in flight (the item in flight at batch size 1).
4. The per-item records of this run are gathered (``accelerate.utils.gather_object``) and merged
   with the ones finished earlier. Metrics are computed from the integer counts and per-target
   gIoUs of all records (sums of integers and ``math.fsum``; never averages of averages), so the
   summary is identical for any batch size, process count and interruption history.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reasonseg.evaluation.metrics import MetricRules, TargetScore, score_target, summarize
from reasonseg.evaluation.segmenter import MODES, EvalItem, EvalMode, Segmenter, SegmentResult
from reasonseg.evaluation.store import ResultStore, load_shards, shard_path

if TYPE_CHECKING:
    from accelerate import PartialState

__all__ = [
    "EvalResult",
    "RunConfig",
    "decode_rle",
    "encode_rle",
    "process_state",
    "run_evaluation",
    "score_item",
    "summarize_records",
]

MANIFEST = "run.json"


@dataclass(frozen=True)
class RunConfig:
    """Settings of one evaluation run.

    Attributes:
        out_dir: run directory (shards, manifest, reports).
        mode: "teacher-forced" (the papers' protocol) or "generative" (what a user gets).
        batch_size: items per call to the segmenter, per process.
        progress: show a tqdm bar on the main process.
    """

    out_dir: Path
    mode: EvalMode
    batch_size: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.mode not in MODES:
            raise ValueError(f"RunConfig.mode: must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"RunConfig.batch_size: must be a positive int, got {self.batch_size!r}")


@dataclass
class EvalResult:
    """Outcome of :func:`run_evaluation` (the same on every process).

    Attributes:
        summary: the summary dictionary written to ``summary.json`` (metrics per group, counts).
        records: one record per item, in the protocol's item order.
        computed: how many items this run evaluated (the rest were resumed from the shards).
        seconds: wall time of this run's model calls on this process.
    """

    summary: dict[str, Any]
    records: list[dict[str, Any]]
    computed: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


# -- masks in records ------------------------------------------------------------------------------
def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding of an HxW bool mask, JSON-ready (``{"size": [H, W], "counts": str}``)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_rle`: HxW bool."""
    import warnings

    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools' Cython decoder trips numpy 2's copy=False deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}).astype(
            bool
        )


# -- scoring ---------------------------------------------------------------------------------------
def score_item(item: EvalItem, result: SegmentResult, rules: MetricRules, mode: EvalMode) -> dict[str, Any]:
    """Score one item's slots against its targets and build its JSON record.

    Slot i is scored against target i. Teacher-forced results must have exactly one slot per target.
    In generative mode a target the answer did not reach (fewer ``[SEG]``/``[REJ]`` than targets) is
    scored as an empty mask; under GSVA rules such a missing slot counts as "no target predicted",
    since the user sees no mask. Extra slots beyond the targets are recorded but not scored.
    """
    sample = item.load()
    gt = sample.masks  # uint8 [K,H,W]
    k, h, w = gt.shape
    n = result.masks.shape[0]
    if mode == "teacher-forced" and n != k:
        raise ValueError(f"item {item.key}: teacher-forced result has {n} slots for {k} targets")
    if n and result.masks.shape[1:] != (h, w):
        raise ValueError(
            f"item {item.key}: predicted masks are {result.masks.shape[1:]}, ground truth {(h, w)}"
        )
    targets: list[dict[str, Any]] = []
    for i in range(k):
        if i < n:
            pred, rejected = result.masks[i], bool(result.rejected[i])
        else:
            pred, rejected = np.zeros((h, w), dtype=bool), True
        score = score_target(pred, gt[i], rules, ignore=sample.ignore, rejected=rejected)
        targets.append({**score.to_json(), "slot_present": i < n, "pred_rle": encode_rle(pred)})
    return {
        "key": item.key,
        "image_id": str(sample.image_id),
        "source": sample.source,
        "group": item.group,
        "query": item.query,
        "answer": result.answer,
        "n_slots": int(n),
        "extra_slots": max(0, int(n) - k),
        "targets": targets,
    }


def _target_scores(records: Sequence[dict[str, Any]]) -> list[TargetScore]:
    return [TargetScore.from_json(t) for r in records for t in r["targets"]]


def summarize_records(
    records: Sequence[dict[str, Any]], rules: MetricRules, groups: Sequence[str] = ()
) -> dict[str, Any]:
    """Metrics over all records and per group: ``{"overall": {...}, "<group>": {...}, ...}``."""
    out: dict[str, Any] = {
        "overall": {"n_samples": len(records), **summarize(_target_scores(records), rules).to_json()}
    }
    for g in groups:
        sub = [r for r in records if r.get("group") == g]
        out[g] = {"n_samples": len(sub), **summarize(_target_scores(sub), rules).to_json()}
    return out


def sample_giou(record: dict[str, Any]) -> float:
    """Mean gIoU of a record's targets (1.0 for an item without targets); used to rank worst samples."""
    t = record["targets"]
    return float(np.mean([x["giou"] for x in t])) if t else 1.0


# -- manifest --------------------------------------------------------------------------------------
def _keys_digest(items: Sequence[EvalItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(it.key.encode() + b"\n")
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, allow_nan=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _check_manifest(out_dir: Path, manifest: dict[str, Any], is_main: bool) -> None:
    path = out_dir / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(
                f"{path}: unreadable run manifest ({exc}); remove it or use another --out"
            ) from exc
        # Report the most telling difference first: the manifest's own field order, the keys' hash last.
        for key in [*manifest, *(k for k in old if k not in manifest)]:
            if key not in old:
                raise ValueError(
                    f"{path}: this directory holds a run that did not record {key}, so its results cannot "
                    "be checked against this one; use another --out, or remove the directory to start over"
                )
            if old.get(key) != manifest.get(key):
                raise ValueError(
                    f"{path}: this directory holds a run with {key}={old.get(key)!r}, not {manifest.get(key)!r}; "
                    "use another --out to evaluate something else"
                )
    elif is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, manifest)


# -- the run ---------------------------------------------------------------------------------------
def process_state() -> PartialState:
    """accelerate's view of the process group, on CPU when there is no CUDA device.

    ``PartialState`` only forms a multi-process group over CPUs (gloo) when asked with ``cpu=True``;
    so ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N`` on a
    CPU-only machine give N cooperating processes. ``ACCELERATE_USE_CPU=1`` forces CPU on a GPU host.
    """
    import torch
    from accelerate import PartialState

    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=forced or not torch.cuda.is_available())


def run_evaluation(
    segmenter: Segmenter,
    items: Sequence[EvalItem],
    rules: MetricRules,
    config: RunConfig,
    *,
    groups: Sequence[str] = (),
    manifest: dict[str, Any] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> EvalResult:
    """Evaluate ``items`` with ``segmenter`` (see the module docstring for the procedure).

    Works in a single process or under ``accelerate launch``/``torchrun`` (``gloo`` on CPU): the
    process group comes from ``accelerate.PartialState`` (see :func:`process_state`). ``manifest`` adds fields (model, data,
    protocol) that a rerun must match. ``on_record`` is called after each record is durably stored.
    """
    from accelerate.utils import gather_object

    state = process_state()
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("evaluation items must have unique keys")
    full_manifest = {
        "mode": config.mode,
        "segmenter": segmenter.name,
        **(manifest or {}),
        "rules": {"rejection": rules.rejection, "giou_eps": rules.giou_eps, "ciou_eps": rules.ciou_eps},
        "n_items": len(items),
        "items_sha256": _keys_digest(items),  # last: the least readable difference
    }
    out = config.out_dir
    if state.is_main_process:
        _check_manifest(out, full_manifest, is_main=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        _check_manifest(out, full_manifest, is_main=False)

    done = load_shards(out)
    # Nobody may append before everyone has read the shards, or processes would deal out different lists.
    state.wait_for_everyone()
    pending = [it for it in items if it.key not in done]
    mine = pending[state.process_index :: state.num_processes]

    new_records: list[dict[str, Any]] = []
    seconds = 0.0
    bar = None
    if config.progress and state.is_main_process and pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"eval ({config.mode}, {state.num_processes} proc)", unit="sample")
    with ResultStore(shard_path(out, state.process_index)).open() as store:
        for start in range(0, len(mine), config.batch_size):
            batch = [it.loaded() for it in mine[start : start + config.batch_size]]
            t0 = time.perf_counter()
            results = segmenter.segment(batch, config.mode)
            dt = time.perf_counter() - t0
            seconds += dt
            if len(results) != len(batch):
                raise RuntimeError(
                    f"segmenter {segmenter.name!r} returned {len(results)} results for {len(batch)} items"
                )
            for item, res in zip(batch, results, strict=True):
                rec = score_item(item, res, rules, config.mode)
                store.append(rec)
                new_records.append(rec)
                if on_record is not None:
                    on_record(rec)
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(samples_per_s=f"{(start + len(batch)) / max(seconds, 1e-9):.2f}")
    if bar is not None:
        bar.close()

    gathered = gather_object(new_records) if state.num_processes > 1 else new_records
    by_key = dict(done)
    for rec in gathered:
        by_key.setdefault(rec["key"], rec)
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise RuntimeError(f"{len(missing)} items have no record after the run (first: {missing[0]})")
    records = [by_key[k] for k in keys]
    summary = {
        **{k: v for k, v in full_manifest.items() if k != "items_sha256"},
        "metrics": summarize_records(records, rules, groups),
    }
    state.wait_for_everyone()
    return EvalResult(
        summary=summary,
        records=records,
        computed=len(gathered),
        seconds=seconds,
        extra={"resumed": len(done), "num_processes": state.num_processes, "computed_here": len(new_records)},
    )
