"""Reports of a finished evaluation: summary JSON, Markdown table, per-sample JSONL, worst-K
overlays and an IoU histogram.

Files written into the run directory by :func:`write_reports`:

* ``summary.json``: manifest fields (model, data, mode, rules), metrics per group, throughput.
* ``summary.md``: the same metrics as a Markdown table.
* ``per_sample.jsonl``: one record per item in protocol order (the shards merged).
* ``iou_histogram.png``: histogram of per-target gIoU.
* ``worst/NN_<key>.png``: the K items with the lowest gIoU: image with ground truth (left) and
  prediction (right).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reasonseg.evaluation.runner import EvalResult, decode_rle, sample_giou
from reasonseg.evaluation.segmenter import EvalItem

__all__ = [
    "markdown_table",
    "plot_iou_histogram",
    "write_per_sample",
    "write_reports",
    "write_worst_overlays",
]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fmt(v: float | None, scale: float = 100.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * scale:.2f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """A Markdown table of the summary's metrics, one row per group (percentages, 2 decimals)."""
    metrics: Mapping[str, Any] = summary["metrics"]
    rejection = bool(summary.get("rules", {}).get("rejection", False))
    head = ["split", "samples", "targets", "gIoU", "cIoU"] + (["N-acc", "T-acc"] if rejection else [])
    lines = [
        f"**{summary.get('protocol', 'evaluation')}**, mode `{summary.get('mode')}`, model `{summary.get('model', summary.get('segmenter'))}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for name, m in metrics.items():
        row = [name, str(m["n_samples"]), str(m["n_targets"]), _fmt(m["giou"]), _fmt(m["ciou"])]
        if rejection:
            row += [_fmt(m.get("n_acc")), _fmt(m.get("t_acc"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_per_sample(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """All records, one JSON object per line, in the given order (written atomically)."""
    text = "".join(json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in records)
    _atomic_write_bytes(path, text.encode())


def plot_iou_histogram(records: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Histogram of per-target gIoU (20 bins over [0, 1]) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [t["giou"] for r in records for t in r["targets"]]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(values, bins=np.linspace(0.0, 1.0, 21), color="#3b7dd8", edgecolor="white")
    ax.set_xlabel("per-target gIoU")
    ax.set_ylabel("targets")
    mean = float(np.mean(values)) if values else float("nan")
    ax.set_title(title or f"{len(values)} targets, mean gIoU {mean:.3f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _blend(image: np.ndarray, masks: np.ndarray, labels: list[str]) -> np.ndarray:
    """Overlay masks [K,H,W] on image HxWx3: the SAM helper's ``overlay_masks`` when available."""
    try:
        from reasonseg.inference.visualize import overlay_masks
    except ImportError:
        overlay_masks = None
    if overlay_masks is not None:
        return overlay_masks(image, masks, labels)
    out = image.astype(np.float32)
    palette = np.array(
        [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180]], np.float32
    )
    for i, m in enumerate(masks):
        out[m] = 0.5 * out[m] + 0.5 * palette[i % len(palette)]
    return out.clip(0, 255).astype(np.uint8)


def _panel(
    item: EvalItem, record: dict[str, Any], *, min_side: int = 320, max_side: int = 1024
) -> np.ndarray:
    """Ground-truth overlay | prediction overlay under a two-line caption. HxWx3 uint8.

    Each half is rescaled (nearest) so that its longest side lies in [min_side, max_side]: tiny
    images stay readable and huge ones do not make huge PNGs.
    """
    from PIL import Image, ImageDraw

    sample = item.load()
    image = sample.load_image()
    gt = sample.masks == 1  # [K,H,W], ignore pixels (255) left out
    pred = np.stack([decode_rle(t["pred_rle"]) for t in record["targets"]]) if record["targets"] else gt[:0]
    labels_gt = [f"gt {i}" for i in range(len(gt))]
    labels_pred = [
        f"{'REJ' if t['rejected'] else 'SEG'} {i}: {t['giou']:.2f}" for i, t in enumerate(record["targets"])
    ]
    h, w = image.shape[:2]
    scale = min(max(1.0, min_side / max(h, w)), max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):  # rescale before drawing so that labels and outlines stay crisp

        def fit(masks: np.ndarray) -> np.ndarray:
            out = [np.asarray(Image.fromarray(m).resize(size, Image.Resampling.NEAREST)) for m in masks]
            return np.stack(out) if out else np.zeros((0, size[1], size[0]), bool)

        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        gt, pred = fit(gt), fit(pred)
    halves = [
        Image.fromarray(_blend(image, gt, labels_gt)),
        Image.fromarray(_blend(image, pred, labels_pred)),
    ]
    strip = 30
    canvas = Image.new("RGB", (2 * size[0], size[1] + strip), (255, 255, 255))
    for i, im in enumerate(halves):
        canvas.paste(im, (i * size[0], strip))
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (4, 2),
        f"{record['key']}  gIoU {sample_giou(record):.3f}   left: ground truth, right: prediction",
        fill=(0, 0, 0),
    )
    draw.text((4, 16), str(record.get("query", ""))[:160], fill=(60, 60, 60))
    return np.asarray(canvas)


def write_worst_overlays(
    records: Sequence[dict[str, Any]], items: Mapping[str, EvalItem], out_dir: Path, k: int
) -> list[Path]:
    """PNG panels of the ``k`` items with the lowest mean gIoU (ties broken by key order)."""
    from PIL import Image

    order = sorted(range(len(records)), key=lambda i: (sample_giou(records[i]), i))[: max(0, k)]
    paths: list[Path] = []
    for rank, i in enumerate(order):
        rec = records[i]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", rec["key"])[:80]
        path = out_dir / f"{rank:02d}_{safe}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_panel(items[rec["key"]], rec)).save(path)
        paths.append(path)
    return paths


def write_reports(
    result: EvalResult, items: Sequence[EvalItem], out_dir: Path, *, worst_k: int = 8
) -> dict[str, Path]:
    """Write every report of a finished run into ``out_dir``; returns the paths by name."""
    out_dir = Path(out_dir)
    paths = {
        "summary_json": out_dir / "summary.json",
        "summary_md": out_dir / "summary.md",
        "per_sample": out_dir / "per_sample.jsonl",
        "histogram": out_dir / "iou_histogram.png",
    }
    summary = dict(result.summary)
    _atomic_write_bytes(
        paths["summary_json"], (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    )
    _atomic_write_bytes(paths["summary_md"], markdown_table(summary).encode())
    write_per_sample(paths["per_sample"], result.records)
    plot_iou_histogram(result.records, paths["histogram"])
    by_key = {it.key: it for it in items}
    for p in sorted((out_dir / "worst").glob("*.png")) if (out_dir / "worst").is_dir() else []:
        p.unlink()  # stale panels of an earlier run
    write_worst_overlays(result.records, by_key, out_dir / "worst", worst_k)
    return paths
