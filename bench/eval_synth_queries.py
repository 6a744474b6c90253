"""Per-query evaluation on the synthetic world's gRefCOCO part: the figures of the built-in model's card.

Each item is one query (a ref's sentence) asked alone, the way ``reasonseg segment`` asks it: the
question template of LISA ("Can you segment the {phrase} in this image?", "{sentence} Please output
segmentation mask."); no-target queries expect ``[REJ]``. The ground truth of a query is the union of its
targets' masks (empty for no target); the prediction is the union of the masks of the answer's
``[SEG]`` slots, and a query counts as rejected when its answer holds no ``[SEG]`` (only ``[REJ]``, or
nothing). Metrics follow GSVA's rules (``reasonseg.evaluation.metrics.GSVA_RULES``): gIoU, cIoU, N-acc
(no-target queries rejected), T-acc (target queries not rejected).

* teacher-forced: the reference answer (one ``[SEG]`` per target instance, as in training) is given;
  each slot's ``[SEG]``-vs-``[REJ]`` decision is the model's own prediction at the position before it.
* generative: the model writes its answer (greedy, KV cache); what a user sees.

Groups: ``seen_wording`` / ``held_out_wording`` (paraphrase families never used in training; only in the
test split), over the whole split.

    .venv/bin/python bench/eval_synth_queries.py --model models/lisa-mobile-synth --world runs/synth \\
        --split test --mode generative --out runs/eval/test-gen

(This is the gRefCOCO protocol asked one query at a time; ``reasonseg eval --data grefcoco:...`` asks all
of an image's expressions in one GSVA prompt.) Reruns with the same ``--out`` resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reasonseg.data.samples import Sample
from reasonseg.evaluation.segmenter import EvalItem, EvalMode, SegmentResult

GROUPS = ("seen_wording", "held_out_wording")


def build_items(world: Path, split: str, *, first_sentence_only: bool, limit: int | None) -> list[EvalItem]:
    """One :class:`EvalItem` per (ref, sentence) of ``split``; the sample holds per-instance targets
    (``[SEG]`` per instance, one all-zero ``[REJ]`` mask for no target) with LISA's question."""
    from reasonseg.data.readers.grefer import GRefCocoReader

    root = world / "refer_seg" / "grefcoco"
    held_out = set(json.loads((world / "world.json").read_text())["held_out_families"])
    reader = GRefCocoReader(root, world / "refer_seg" / "images" / "synth", split, mode="eval")
    items: list[EvalItem] = []
    for idx, (ri, si) in enumerate(reader.index):
        if first_sentence_only and si > 0:
            continue
        ref = reader.refs[ri]
        family = str((ref.get("synth") or {}).get("family", ""))
        sents = ref.get("sentences") or [{}]
        query = str(sents[max(si, 0)].get("sent", "")).strip()

        def load(idx: int = idx) -> Sample:
            s = reader.get(idx)
            assert s is not None  # eval mode never skips
            return s

        group = "held_out_wording" if family in held_out else "seen_wording"
        items.append(
            EvalItem(key=f"{ref.get('ref_id', ri)}-{max(si, 0)}", sample=load, group=group, query=query)
        )
        if limit is not None and len(items) >= limit:
            break
    return items


class _MergedTargets:
    """An :class:`EvalItem` whose sample's targets are merged into one mask per query (what is scored)."""

    @staticmethod
    def merge(sample: Sample) -> Sample:
        union = np.any(sample.masks.astype(bool), axis=0)[None].astype(np.uint8)  # [1,H,W]
        kind = "seg" if union.any() else "rej"
        return dataclasses.replace(
            sample, masks=union, target_kinds=[kind], target_texts=sample.target_texts[:1]
        )


class QuerySegmenter:
    """Wraps :class:`LisaSegmenter`: runs the per-instance conversation, returns one merged slot per query.

    Items given to :meth:`segment` hold the per-instance sample; :func:`merged_items` gives the runner
    items whose ground truth is the merged mask, and this segmenter maps keys back.
    """

    def __init__(
        self, inner: Any, per_instance: dict[str, Callable[[], Sample]], *, replace_query: str | None = None
    ) -> None:
        self.inner = inner
        self.name = f"{inner.name} (one query, merged targets)"
        self.per_instance = per_instance
        self.replace_query = replace_query

    def _conversation(self, key: str) -> Sample:
        sample = self.per_instance[key]()
        if self.replace_query is None:
            return sample
        # Ablation: the same image and reference answer, but one fixed question for every query.
        from reasonseg.data.conversation import IMAGE_TOKEN, Turn

        turns = [Turn("user", f"{IMAGE_TOKEN}\n{self.replace_query}"), *sample.turns[1:]]
        return dataclasses.replace(sample, turns=turns)

    def segment(self, items: Sequence[EvalItem], mode: EvalMode) -> list[SegmentResult]:
        originals = [dataclasses.replace(it, sample=self._conversation(it.key)) for it in items]
        results = self.inner.segment(originals, mode)
        merged: list[SegmentResult] = []
        for it, res in zip(originals, results, strict=True):
            h, w = it.load().masks.shape[1:]
            keep = [i for i, r in enumerate(res.rejected) if not r]
            mask = np.any(res.masks[keep], axis=0) if keep else np.zeros((h, w), dtype=bool)
            merged.append(SegmentResult(masks=mask[None], rejected=[not keep], answer=res.answer))
        return merged


def merged_items(items: Sequence[EvalItem]) -> tuple[list[EvalItem], dict[str, Callable[[], Sample]]]:
    """(items with merged ground truth for scoring, key -> per-instance sample loader for the model)."""
    loaders = {it.key: it.load for it in items}
    out = [
        dataclasses.replace(it, sample=lambda load=it.load: _MergedTargets.merge(load()))  # type: ignore[misc]
        for it in items
    ]
    return out, loaders


def query_sensitivity(records: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """Does the model read the question? Over every pair of queries asked about the same image, the
    mean IoU of the two predicted masks (1.0: it returns the same mask whatever is asked; pairs where
    both are empty count 1.0), next to the same figure for the ground truth (how different the
    answers should be)."""
    from reasonseg.evaluation.runner import decode_rle

    by_image: dict[str, list[tuple[np.ndarray, float]]] = {}
    for r in records:
        t = r["targets"][0]
        pred = decode_rle(t["pred_rle"]).astype(bool) if t.get("pred_rle") else None
        by_image.setdefault(r["image_id"], []).append((pred, float(t["gt_area"])))
    pair_ious: list[float] = []
    for preds in by_image.values():
        masks = [m for m, _ in preds]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                a, b = masks[i], masks[j]
                if a is None or b is None:
                    pair_ious.append(1.0 if a is None and b is None else 0.0)
                    continue
                union = float((a | b).sum())
                pair_ious.append(float((a & b).sum()) / union if union else 1.0)
    return {
        "pairs": len(pair_ious),
        "mean_pred_pair_iou": round(float(np.mean(pair_ious)), 4) if pair_ious else float("nan"),
    }


def write_montage(
    records: Sequence[dict[str, Any]], items: Sequence[EvalItem], path: Path, n: int = 8
) -> Path:
    """PNG grid of ``n`` records spread evenly over the run (distinct images where possible): the image
    with the prediction (filled) and the ground-truth outline, captioned with query, answer and IoU."""
    from PIL import Image, ImageDraw

    from reasonseg.evaluation.runner import decode_rle
    from reasonseg.inference.visualize import overlay_masks

    by_key = {it.key: it for it in items}
    seen: set[str] = set()
    picked: list[dict[str, Any]] = []
    step = max(1, len(records) // n)
    for r in list(records[::step]) + list(records):
        if len(picked) == n:
            break
        if r["image_id"] not in seen:
            seen.add(r["image_id"])
            picked.append(r)
    tile, cap = 320, 74
    cols = 4
    rows = (len(picked) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows * (tile + cap)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(picked):
        sample = by_key[r["key"]].load()
        rgb = sample.load_image()
        pred = decode_rle(r["targets"][0]["pred_rle"]).astype(bool)
        gt = sample.masks[0].astype(bool)
        panel = overlay_masks(rgb, pred[None], None) if pred.any() else rgb.copy()
        edge = gt & ~np.pad(gt, 1)[2:, 1:-1] | gt & ~np.pad(gt, 1)[:-2, 1:-1]
        edge |= gt & ~np.pad(gt, 1)[1:-1, 2:] | gt & ~np.pad(gt, 1)[1:-1, :-2]
        panel[edge] = (255, 255, 0)
        im = Image.fromarray(panel)
        im.thumbnail((tile, tile))
        x, y = (i % cols) * tile, (i // cols) * (tile + cap)
        sheet.paste(im, (x + (tile - im.width) // 2, y))
        t = r["targets"][0]
        verdict = ("no target" if t["gt_area"] == 0 else "target") + f", gIoU {t['giou']:.2f}"
        lines = [r["query"][:52], r["query"][52:104], f"-> {(r.get('answer') or '')[:48]}", verdict]
        draw.multiline_text((x + 4, y + tile + 2), "\n".join(s for s in lines if s), fill="black", spacing=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (save_pretrained) or preset name")
    p.add_argument("--world", type=Path, required=True, help="output folder of `reasonseg synth`")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--mode", required=True, choices=("teacher-forced", "generative"))
    p.add_argument("--out", type=Path, required=True, help="run directory (reports; resumable)")
    p.add_argument("--limit", type=int, default=None, help="only the first N queries (in ref order)")
    p.add_argument(
        "--all-sentences", action="store_true", help="every paraphrase of a ref, not only the first"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cache-dir", type=Path, default=Path("runs/eval-encoder-cache"))
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--quantization", default=None, choices=("cpu-int8",), help="evaluate with the LM quantised (CPU)"
    )
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=("auto", "fp32", "bf16"),
        help="the model's precision on the CPU (reasonseg.model.precision; default fp32)",
    )
    p.add_argument("--worst-k", type=int, default=8)
    p.add_argument("--montage", type=Path, default=None, help="also write a PNG of 8 samples here")
    p.add_argument(
        "--replace-query",
        default=None,
        help="ablation: ask this fixed question instead of every query (same images and targets)",
    )
    args = p.parse_args(argv)

    import torch

    from reasonseg.evaluation.command import load_model
    from reasonseg.evaluation.fingerprint import files_digest, model_files
    from reasonseg.evaluation.lisa_segmenter import LisaSegmenter
    from reasonseg.evaluation.metrics import GSVA_RULES
    from reasonseg.evaluation.report import write_reports
    from reasonseg.evaluation.runner import RunConfig, run_evaluation

    if args.threads:
        torch.set_num_threads(args.threads)
    items = build_items(args.world, args.split, first_sentence_only=not args.all_sentences, limit=args.limit)
    scored, loaders = merged_items(items)
    t0 = time.perf_counter()
    model = load_model(args.model)
    if args.dtype != "fp32":
        from reasonseg.model.precision import resolve_dtype

        model.apply_memory_options(dtype=resolve_dtype(args.dtype, "cpu"))
    if args.quantization:
        model.apply_memory_options(quantization=args.quantization)
    inner = LisaSegmenter(
        model, name=str(args.model), cache_dir=args.cache_dir, max_new_tokens=args.max_new_tokens
    )
    segmenter = QuerySegmenter(inner, loaders, replace_query=args.replace_query)
    manifest = {
        "protocol": f"synth-queries/{args.split}",
        "data": str(args.world.resolve()),
        "data_sha256": files_digest(
            [args.world / "world.json", *sorted((args.world / "refer_seg" / "grefcoco").glob("*.json"))]
        ),
        "model": str(args.model),
        "sentences": "all" if args.all_sentences else "first",
        "limit": args.limit,
        "replace_query": args.replace_query,
        "quantization": args.quantization,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    if Path(args.model).is_dir():
        manifest["model_sha256"] = files_digest(model_files(args.model))
    config = RunConfig(out_dir=args.out, mode=args.mode, batch_size=args.batch_size)
    result = run_evaluation(segmenter, scored, GSVA_RULES, config, groups=GROUPS, manifest=manifest)
    result.summary["run"] = {
        "seconds_total": round(time.perf_counter() - t0, 1),
        "model_s": round(result.seconds, 1),
    }
    result.summary["query_sensitivity"] = query_sensitivity(result.records)
    paths = write_reports(result, scored, args.out, worst_k=args.worst_k)
    print(paths["summary_md"].read_text(), end="")
    qs = result.summary["query_sensitivity"]
    print(
        f"same-image query pairs: {qs['pairs']}, mean IoU between their predicted masks "
        f"{qs['mean_pred_pair_iou']} (1.0 = the same mask whatever is asked)"
    )
    if args.montage is not None:
        print(f"montage: {write_montage(result.records, scored, args.montage)}", file=sys.stderr)
    print(f"reports in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
