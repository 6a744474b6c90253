"""A contact sheet of the synthetic world: samples with their instruction, answer and masks drawn.

    python -m reasonseg.data.synth.montage --world OUT --out docs/synth_montage.png

It reads the world back through the real gRefCOCO reader (so what you see is what training sees),
picks two samples per query kind (no-target and multi-target ones included) and lays them out in a grid.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reasonseg.data.readers.grefer import GRefCocoReader
from reasonseg.data.samples import Sample
from reasonseg.data.synth.queries import QUERY_KINDS, TEST_FAMILIES
from reasonseg.inference.visualize import overlay_masks

TILE = 300
CAPTION_H = 96
WRAP = 44


def pick_samples(reader: GRefCocoReader, n: int = 16) -> list[Sample]:
    """About n / 8 per query kind, each from a different image, preferring multi-target and no-target ones."""
    per_kind = max(1, n // len(QUERY_KINDS))
    used_images: set[int] = set()
    chosen: list[int] = []
    for k in QUERY_KINDS:
        idx = [i for i, (ri, _) in enumerate(reader.index) if reader.refs[ri]["synth"]["query_kind"] == k]

        def ref(i: int) -> dict:
            return reader.refs[reader.index[i][0]]

        ordered = (
            [i for i in idx if len(ref(i)["ann_id"]) > 1] + [i for i in idx if ref(i)["no_target"]] + idx
        )
        taken = 0
        for i in ordered:
            if taken == per_kind:
                break
            if ref(i)["image_id"] not in used_images:
                used_images.add(ref(i)["image_id"])
                chosen.append(i)
                taken += 1
    for i in range(len(reader)):
        if len(chosen) >= n:
            break
        image_id = reader.refs[reader.index[i][0]]["image_id"]
        if image_id not in used_images:
            used_images.add(image_id)
            chosen.append(i)
    return [reader[i] for i in chosen[:n]]


def tile(sample: Sample, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """One sample: image and masks scaled to the tile first (so outlines stay visible), then the caption."""
    img = Image.fromarray(sample.load_image())
    img.thumbnail((TILE, TILE))
    size = img.size
    masks = np.stack(
        [
            np.asarray(Image.fromarray(m * 255).resize(size, Image.Resampling.NEAREST)) > 127
            for m in sample.masks
        ]
    )
    shown = np.asarray(img)
    if masks.any():
        shown = overlay_masks(shown, masks, [str(k + 1) for k in range(len(masks))], alpha=0.45)
    canvas = Image.new("RGB", (TILE, TILE + CAPTION_H), (250, 250, 250))
    canvas.paste(Image.fromarray(shown), ((TILE - size[0]) // 2, (TILE - size[1]) // 2))
    draw = ImageDraw.Draw(canvas)
    meta = sample.meta
    held = " (held-out wording)" if meta.get("family") in TEST_FAMILIES else ""
    head = f"{meta.get('query_kind')} · {meta.get('family')} · {meta.get('split')}{held}"
    answer = sample.turns[1].text
    if meta.get("explanation"):
        answer = f"{answer} {meta['explanation']}"
    y = TILE + 3
    draw.text((5, y), head, fill=(120, 120, 120), font=font)
    y += 15
    for line in textwrap.wrap(f"Q: {sample.target_texts[0]}", WRAP)[:2]:
        draw.text((5, y), line, fill=(20, 20, 20), font=font)
        y += 15
    colour = (170, 30, 30) if "[REJ]" in answer else (20, 90, 20)
    for line in textwrap.wrap(f"A: {answer}", WRAP)[: max(1, (TILE + CAPTION_H - y) // 15)]:
        draw.text((5, y), line, fill=colour, font=font)
        y += 15
    return canvas


def make_montage(
    world: str | Path, out: str | Path, n: int = 16, cols: int = 4, split: str = "train"
) -> Path:
    """Write a PNG grid of ``n`` samples of ``split`` (and the test split when ``split`` is "mixed")."""
    world = Path(world)
    g = world / "refer_seg" / "grefcoco"
    images = world / "refer_seg" / "images" / "synth"
    samples: list[Sample] = []
    if split == "mixed":
        samples += pick_samples(
            GRefCocoReader(g, images, "train", mode="eval", explanatory_rate=0.0), n - n // 4
        )
        samples += pick_samples(GRefCocoReader(g, images, "test", mode="eval", explanatory_rate=0.0), n // 4)
    else:
        samples = pick_samples(GRefCocoReader(g, images, split, mode="eval", explanatory_rate=0.0), n)
    font = ImageFont.load_default(13)
    tiles = [tile(s, font) for s in samples]
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (TILE + 6) + 6, rows * (TILE + CAPTION_H + 6) + 6), (200, 200, 200))
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet.paste(t, (6 + c * (TILE + 6), 6 + r * (TILE + CAPTION_H + 6)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, help="output folder of `reasonseg synth`")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--split", default="mixed", help="train, val, test or mixed (3/4 train, 1/4 test)")
    args = ap.parse_args()
    path = make_montage(args.world, args.out, args.n, split=args.split)
    summary = json.loads((Path(args.world) / "world.json").read_text())
    print(f"wrote {path} ({args.n} samples of a {summary['n']}-scene world, seed {summary['seed']})")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
