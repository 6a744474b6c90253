"""Teacher-forced evaluation throughput of lisa-mobile (real MobileSAM + SmolLM2-135M weights, untrained
head) on this CPU, with the image-encoder disk cache cold and warm.

    .venv/bin/python bench/bench_eval.py [--images 6] [--batch-size 1]

It writes a small ReasonSeg-format split (scikit-image photos, one query each, the real labelme JSON
layout) and evaluates it with the published teacher-forced protocol three times, each into a fresh
run directory:

* ``no cache``: the reference: every image goes through the encoder;
* ``cache cold``: an empty encoder cache: encode and store every image;
* ``cache warm``: the same cache again: no image is encoded.

It prints samples/s per run and the ratio to the reference measured in the same run. The metric values
are not the point (the head is untrained); the three runs must agree on them, which is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)  # distinct photos bundled with scikit-image (its "cat" is "chelsea": the cache would see one image)
QUERIES = (
    ("the person's face", False),
    ("Something that could hold a hot drink.", True),
    ("the animal", False),
    ("What part of this machine produces thrust?", True),
)


def write_split(root: Path, n: int) -> Path:
    """n images with one labelme JSON each (a central box as target, a small ignore region)."""
    from skimage import data as skdata

    split = root / "val"
    split.mkdir(parents=True)
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        img = np.asarray(getattr(skdata, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3].astype(np.uint8)
        h, w = img.shape[:2]
        Image.fromarray(img).save(split / f"{i:03d}_{name}.jpg", quality=92)
        text, is_sentence = QUERIES[i % len(QUERIES)]
        box = [[w * 0.25, h * 0.25], [w * 0.75, h * 0.25], [w * 0.75, h * 0.75], [w * 0.25, h * 0.75]]
        ign = [[w * 0.45, h * 0.45], [w * 0.55, h * 0.45], [w * 0.55, h * 0.55], [w * 0.45, h * 0.55]]
        anno = {
            "text": [text],
            "is_sentence": is_sentence,
            "shapes": [
                {"label": "target", "shape_type": "polygon", "points": box},
                {"label": "ignore", "shape_type": "polygon", "points": ign},
            ],
        }
        (split / f"{i:03d}_{name}.json").write_text(json.dumps(anno))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=6, help="images (= samples) per run")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    args = ap.parse_args()

    from reasonseg.evaluation.lisa_segmenter import LisaSegmenter
    from reasonseg.evaluation.protocols import build_protocol
    from reasonseg.evaluation.runner import RunConfig, run_evaluation
    from reasonseg.model import LisaModel

    work = Path(tempfile.mkdtemp(prefix="bench_eval_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    proto = build_protocol(f"reasonseg:{write_split(work / 'ReasonSeg', args.images)}:val")

    t0 = time.perf_counter()
    model = LisaModel.from_preset("lisa-mobile")
    load_s = time.perf_counter() - t0

    # One untimed sample first: allocator and kernel warm-up belong to no run.
    LisaSegmenter(model).segment([proto.items[0].loaded()], "teacher-forced")

    cache_dir = work / "encoder_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cached = LisaSegmenter(model, cache_dir=cache_dir)
    runs = [("no cache", LisaSegmenter(model)), ("cache cold", cached), ("cache warm", cached)]
    rows = []
    metrics = []
    for label, seg in runs:
        calls_before = seg.encoder_calls
        cfg = RunConfig(
            work / f"run_{label.replace(' ', '_')}", "teacher-forced", args.batch_size, progress=False
        )
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        t = time.perf_counter()
        res = run_evaluation(seg, proto.items, proto.rules, cfg, groups=proto.groups)
        wall = time.perf_counter() - t
        rows.append(
            (label, len(res.records), seg.encoder_calls - calls_before, wall, len(res.records) / wall)
        )
        metrics.append(res.summary["metrics"])
    if any(m != metrics[0] for m in metrics):
        raise SystemExit("the three runs disagree on the metrics: the cache changed results")

    ref = rows[0][4]
    print(
        f"lisa-mobile teacher-forced evaluation, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch size {args.batch_size}"
    )
    load1, load5, _ = os.getloadavg()
    print(
        f"model load (real weights, cached conversion): {load_s:.1f} s; images: {args.images}; "
        f"load average during the runs: {load1:.1f} (1 min), {load5:.1f} (5 min) on {os.cpu_count()} cores"
    )
    print()
    print("| run | samples | images encoded | wall s | samples/s | vs no cache |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, n, enc, wall, sps in rows:
        print(f"| {label} | {n} | {enc} | {wall:.2f} | {sps:.3f} | {sps / ref:.2f}x |")
    print()
    print(
        f"gIoU/cIoU (untrained head, identical in all runs): "
        f"{metrics[0]['overall']['giou']:.4f} / {metrics[0]['overall']['ciou']:.4f}"
    )
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
