"""Write the synthetic world as real dataset formats: ReasonSeg (labelme JSON) and gRefCOCO.

Layout under ``OUT``::

    reason_seg/ReasonSeg/{train,val,test}/synth_NNNNNN.{jpg,json}   one query per image (targets merged)
    reason_seg/ReasonSeg/explanatory/{train,val,test}.json          explanations of the reasoning queries
    refer_seg/grefcoco/grefs(unc).json, instances.json              several queries per image, exact RLE
    refer_seg/images/synth/synth_NNNNNN.jpg                         the same images (hard links)
    world.json                                                      config, held-out sets, counts, polygon IoU

Every scene is a pure function of ``(seed, index)``; every file is written to a temporary name and
renamed into place, so an interrupted run leaves no half-written file, and a rerun with the same seed
writes byte-identical files (with any number of worker processes).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage import measure

from reasonseg.data.readers.base import paint_polygons
from reasonseg.data.synth.knowledge import KINDS
from reasonseg.data.synth.queries import (
    ABSENT_CAPABLE,
    FAMILIES,
    GENERATORS,
    TEST_FAMILIES,
    Query,
    families_for,
)
from reasonseg.data.synth.scene import BACKGROUNDS, TEST_BACKGROUNDS, Scene, SceneConfig, compose_scene

SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_VERSION = 1
CATEGORY_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(sorted(KINDS))}

# Query-kind weights: for a gRefCOCO ref, and for the one ReasonSeg query of a scene.
GREF_WEIGHTS: dict[str, float] = {
    "reasoning": 0.35,
    "semantic": 0.14,
    "category": 0.14,
    "attribute": 0.1,
    "position": 0.08,
    "size": 0.07,
    "relation": 0.06,
    "occlusion": 0.06,
}
REASONSEG_WEIGHTS: dict[str, float] = {
    "reasoning": 0.6,
    "semantic": 0.08,
    "category": 0.08,
    "attribute": 0.08,
    "position": 0.06,
    "size": 0.04,
    "relation": 0.03,
    "occlusion": 0.03,
}
ABSENT_WEIGHTS: dict[str, float] = {"reasoning": 0.5, "semantic": 0.3, "category": 0.2}
if not set(ABSENT_WEIGHTS) <= set(ABSENT_CAPABLE):
    raise AssertionError("every no-target query kind needs a generator that can ask about absent things")


@dataclass(frozen=True)
class WorldConfig:
    """What ``reasonseg synth`` writes. Image size is ``scene.image_size`` px on the longest side (512)."""

    n: int
    seed: int = 0
    scene: SceneConfig = field(default_factory=SceneConfig)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    refs_per_scene: int = 4
    no_target_rate: float = 0.2
    held_out_family_rate: float = 0.5
    jpeg_quality: int = 92
    polygon_tolerance: float = 0.5  # px, Douglas-Peucker simplification of the mask contours
    kinds: tuple[str, ...] | None = None  # the object kinds the world uses (None: all of KINDS)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions):
            raise ValueError(
                f"split_fractions must be three non-negative numbers, got {self.split_fractions}"
            )
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")
        if not 1 <= self.refs_per_scene <= 16:
            raise ValueError(f"refs_per_scene must be in [1, 16], got {self.refs_per_scene}")
        for name in ("no_target_rate", "held_out_family_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(sorted(set(self.kinds))))
            unknown = [k for k in self.kinds if k not in KINDS]
            if unknown:
                raise ValueError(
                    f"kinds: unknown kind(s) {', '.join(unknown)} (see reasonseg.data.synth.knowledge)"
                )
            if len(self.kinds) < 2:
                raise ValueError(f"kinds: need at least 2 kinds, got {len(self.kinds)}")
        if not 90 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [90, 100], got {self.jpeg_quality}")


def split_of(seed: int, index: int, fractions: tuple[float, float, float]) -> str:
    """The split of scene ``index``: a fixed draw from (seed, index), independent of n."""
    r = np.random.default_rng([seed, index, 7]).random()
    return "train" if r < fractions[0] else "val" if r < fractions[0] + fractions[1] else "test"


def backgrounds_for(split: str) -> list[str]:
    """Test scenes use only the held-out photos; train and val never do."""
    if split == "test":
        return sorted(TEST_BACKGROUNDS)
    return [b for b in BACKGROUNDS if b not in TEST_BACKGROUNDS]


def _weighted(weights: dict[str, float], rng: np.random.Generator) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def make_query(
    scene: Scene,
    split: str,
    rng: np.random.Generator,
    cfg: WorldConfig,
    *,
    absent: bool,
    weights: dict[str, float],
) -> Query | None:
    """One query for the scene, or None if no unambiguous one was found in a few tries."""
    for _ in range(12):
        qk = _weighted(ABSENT_WEIGHTS if absent else weights, rng)
        fam = families_for(qk, split, rng, cfg.held_out_family_rate)
        gen = GENERATORS[qk]
        if absent:
            universe = frozenset(cfg.kinds) if cfg.kinds is not None else None
            q = gen(scene, fam, rng, absent=True, universe=universe)
        else:
            q = gen(scene, fam, rng)
        if q is not None and (absent or q.targets):
            return q
    return None


# -- polygons ------------------------------------------------------------------------------------------

# Contours traced at this level run (almost) through the centres of the mask's boundary pixels, which is
# what a fill that includes the polygon's own outline (LISA's cv2.fillPoly + polylines, PIL's polygon)
# needs to reproduce the mask; tracing at 0.5 would grow every object by half a pixel all round.
CONTOUR_LEVEL = 0.99
MIN_POLYGON_IOU = 0.97


def mask_polygons(mask: np.ndarray, tolerance: float) -> list[np.ndarray]:
    """Outer boundaries of a bool [H,W] mask as float [P,2] (x, y) polygons (holes are not included).

    Each connected component is traced in its own bounding box (plus a 1 px border), which keeps
    hole filling and contour tracing cheap on a large image.
    """
    out = []
    labels, _ = ndimage.label(mask)
    for comp, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        y0, x0 = box[0].start, box[1].start
        filled = ndimage.binary_fill_holes(labels[box] == comp)
        padded = np.pad(filled, 1).astype(np.float32)
        contours = measure.find_contours(padded, CONTOUR_LEVEL)
        if not contours:
            continue
        c = max(contours, key=len) - 1.0  # the outer contour is the longest one of a filled component
        c = np.rint(measure.approximate_polygon(c, tolerance))  # integer boundary-pixel centres
        keep = np.ones(len(c), dtype=bool)
        keep[1:] = np.any(c[1:] != c[:-1], axis=1)
        c = c[keep] + np.array([y0, x0], dtype=c.dtype)
        if len(c) >= 3:
            out.append(np.ascontiguousarray(c[:, ::-1]))  # (row, col) -> (x, y)
    return out


def _holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels enclosed by ``mask`` (bool [H,W]), computed inside its bounding box."""
    out = np.zeros_like(mask)
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(ys) == 0:
        return out
    box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    out[box] = ndimage.binary_fill_holes(mask[box]) & ~mask[box]
    return out


def labelme_shapes(
    instance_masks: list[np.ndarray], image_name: str, tolerance: float
) -> tuple[list[dict[str, Any]], float, float]:
    """labelme shapes for the union of the target masks, plus rasterisation quality.

    Each target instance becomes "target" polygons; holes of the union (transparent holes in a glyph,
    or a non-target object inside a target) become "ignore" polygons, which LISA paints after the larger
    target polygons. Returns (shapes, IoU of the rasterised target vs the exact union,
    IoU outside the ignore pixels).
    """
    union = np.any(np.stack(instance_masks), axis=0)
    hw = union.shape
    shapes: list[dict[str, Any]] = []
    polys: list[tuple[np.ndarray, int]] = []

    def add(points: np.ndarray, label: str) -> None:
        pts = [[float(x), float(y)] for x, y in points]
        shapes.append(
            {
                "label": label,
                "labels": [label],
                "shape_type": "polygon",
                "image_name": image_name,
                "points": pts,
                "group_id": None,
                "group_ids": [None],
                "flags": {},
            }
        )
        polys.append((np.asarray(pts), 1 if label == "target" else 255))

    for m in instance_masks:
        for p in mask_polygons(m, tolerance):
            add(p, "target")
    holes = _holes(union)
    for p in mask_polygons(holes, tolerance):
        add(p, "ignore")
    painted = paint_polygons(polys, hw)
    pred = painted == 1
    iou = float((pred & union).sum() / max((pred | union).sum(), 1))
    keep = painted != 255
    iou_keep = float((pred & union & keep).sum() / max(((pred | union) & keep).sum(), 1))
    return shapes, iou, iou_keep


# -- one scene -----------------------------------------------------------------------------------------


@dataclass
class SceneResult:
    """What a worker hands back for one scene (images are already on disk)."""

    index: int
    split: str
    background: str
    image_entry: dict[str, Any]
    annotations: list[dict[str, Any]]
    refs: list[dict[str, Any]]
    explanatory: dict[str, str] | None
    reasonseg_query: dict[str, Any]
    polygon_iou: float
    polygon_iou_kept: float


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=indent) + "\n").encode("utf-8")


def build_scene(cfg: WorldConfig, index: int) -> tuple[Scene, str, list[Query], Query]:
    """Compose scene ``index`` and its queries (pure: depends only on cfg and index)."""
    split = split_of(cfg.seed, index, cfg.split_fractions)
    rng = np.random.default_rng([cfg.seed, index])
    bgs = backgrounds_for(split)
    background = bgs[int(rng.integers(len(bgs)))]
    scene = compose_scene(background, cfg.scene, rng, cfg.kinds)
    refs: list[Query] = []
    seen: set[tuple[str, str]] = set()  # one query per (kind, subject): no near-duplicate refs
    for _ in range(cfg.refs_per_scene):
        absent = bool(rng.random() < cfg.no_target_rate)
        q = make_query(scene, split, rng, cfg, absent=absent, weights=GREF_WEIGHTS)
        if q is not None and (q.query_kind, q.subject) not in seen:
            seen.add((q.query_kind, q.subject))
            refs.append(q)
    rs = make_query(scene, split, rng, cfg, absent=False, weights=REASONSEG_WEIGHTS)
    if rs is None:  # a semantic query always exists
        rs = GENERATORS["semantic"](
            scene, families_for("semantic", split, rng, cfg.held_out_family_rate), rng
        )
    assert rs is not None and rs.targets
    return scene, split, refs, rs


def write_scene(cfg: WorldConfig, out: str | Path, index: int) -> SceneResult:
    """Build scene ``index``, write its image and ReasonSeg JSON, and return its gRefCOCO entries."""
    out = Path(out)
    scene, split, queries, rs = build_scene(cfg, index)
    name = f"synth_{index:06d}"
    H, W = scene.hw
    buf = BytesIO()
    Image.fromarray(scene.image).save(buf, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
    rs_dir = out / "reason_seg" / "ReasonSeg" / split
    img_path = rs_dir / f"{name}.jpg"
    _atomic_write(img_path, buf.getvalue())
    _atomic_link(img_path, out / "refer_seg" / "images" / "synth" / f"{name}.jpg")

    target_masks = [scene.instances[i].mask for i in rs.targets]
    # Simplify the polygons unless that costs more than MIN_POLYGON_IOU; then trace them exactly.
    for tol in (cfg.polygon_tolerance, 0.0):
        shapes, iou, iou_kept = labelme_shapes(target_masks, f"{name}.jpg", tol)
        if iou_kept >= MIN_POLYGON_IOU:
            break
    anno = {"text": rs.texts, "is_sentence": rs.sentence, "shapes": shapes}
    _atomic_write(rs_dir / f"{name}.json", _json_bytes(anno))
    explanatory = None
    if rs.explanation:
        explanatory = {"image": f"{name}.jpg", "query": rs.texts[0], "outputs": rs.explanation}

    image_id = index + 1
    anns = []
    for j, inst in enumerate(scene.instances):
        rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        anns.append(
            {
                "id": image_id * 100 + j,
                "image_id": image_id,
                "category_id": CATEGORY_IDS[inst.kind.name],
                "segmentation": {"size": [H, W], "counts": rle["counts"].decode("ascii")},
                "area": int(inst.mask.sum()),
                "bbox": [x, y, w, h],
                "iscrowd": 0,
            }
        )
    refs = []
    for k, q in enumerate(queries):
        ref_id = image_id * 100 + k
        ann_ids = [image_id * 100 + t for t in q.targets] or [-1]
        refs.append(
            {
                "ref_id": ref_id,
                "image_id": image_id,
                "ann_id": ann_ids,
                "category_id": [CATEGORY_IDS[scene.instances[t].kind.name] for t in q.targets],
                "split": split,
                "file_name": f"{name}.jpg",
                "no_target": not q.targets,
                "sentences": [
                    {"sent": s, "raw": s, "tokens": s.split(), "sent_id": ref_id * 10 + si}
                    for si, s in enumerate(q.texts[:3])
                ],
                "sent_ids": [ref_id * 10 + si for si in range(len(q.texts[:3]))],
                "synth": {
                    "query_kind": q.query_kind,
                    "family": q.family,
                    "explanation": q.explanation,
                    "subject": q.subject,
                },
            }
        )
    return SceneResult(
        index=index,
        split=split,
        background=scene.background,
        image_entry={
            "id": image_id,
            "file_name": f"{name}.jpg",
            "height": H,
            "width": W,
            "synth": {"split": split, "background": scene.background},
        },
        annotations=anns,
        refs=refs,
        explanatory=explanatory,
        reasonseg_query={"query_kind": rs.query_kind, "family": rs.family, "targets": len(rs.targets)},
        polygon_iou=iou,
        polygon_iou_kept=iou_kept,
    )


def _prune_stale(out: Path, keep: set[tuple[str, str]]) -> None:
    """Remove scene files an earlier run (other seed or larger n) left in ``out``, so that the folder
    holds exactly this world and the readers, which list the split folders, see nothing else."""
    kept_names = {name for _, name in keep}
    for split in SPLITS:
        for p in (out / "reason_seg" / "ReasonSeg" / split).glob("synth_*.*"):
            if (split, p.stem) not in keep:
                p.unlink()
    for p in (out / "refer_seg" / "images" / "synth").glob("synth_*.jpg"):
        if p.stem not in kept_names:
            p.unlink()


def _write_scene_star(args: tuple[WorldConfig, str, int]) -> SceneResult:
    return write_scene(*args)


@dataclass
class WorldSummary:
    """Counts and quality figures of a written world (also saved as ``world.json``)."""

    n: int
    seed: int
    image_size: int
    splits: dict[str, int]
    refs: dict[str, int]
    no_target_refs: int
    multi_target_refs: int
    query_kinds: dict[str, int]
    held_out_backgrounds: list[str]
    held_out_families: list[str]
    test_refs_with_held_out_family: int
    explanations: int
    polygon_iou_mean: float
    polygon_iou_min: float
    polygon_iou_kept_min: float
    kinds_used: int
    config: dict[str, Any]


def generate_world(
    cfg: WorldConfig,
    out: str | Path,
    *,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> WorldSummary:
    """Write ``cfg.n`` scenes under ``out`` (see the module docstring). Returns the summary."""
    out = Path(out)
    for split in SPLITS:
        (out / "reason_seg" / "ReasonSeg" / split).mkdir(parents=True, exist_ok=True)
    (out / "reason_seg" / "ReasonSeg" / "explanatory").mkdir(parents=True, exist_ok=True)
    (out / "refer_seg" / "grefcoco").mkdir(parents=True, exist_ok=True)
    (out / "refer_seg" / "images" / "synth").mkdir(parents=True, exist_ok=True)

    def results() -> Iterator[SceneResult]:
        jobs = [(cfg, str(out), i) for i in range(cfg.n)]
        if workers <= 1:
            yield from map(_write_scene_star, jobs)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                yield from pool.map(_write_scene_star, jobs, chunksize=8)

    images, anns, refs = [], [], []
    explanatory: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    splits: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    ious, ious_kept = [], []
    used: set[int] = set()
    for done, r in enumerate(results(), 1):
        splits[r.split] += 1
        images.append(r.image_entry)
        anns += r.annotations
        refs += r.refs
        used.update(a["category_id"] for a in r.annotations)
        if r.explanatory:
            explanatory[r.split].append(r.explanatory)
        ious.append(r.polygon_iou)
        ious_kept.append(r.polygon_iou_kept)
        for ref in r.refs:
            kinds[ref["synth"]["query_kind"] + ("/none" if ref["no_target"] else "")] += 1
        if progress is not None:
            progress(done, cfg.n)
    instances = {
        "info": {"description": "reasonseg synthetic world", "version": FORMAT_VERSION},
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": cid, "name": name, "supercategory": KINDS[name].category}
            for name, cid in CATEGORY_IDS.items()
        ],
    }
    _atomic_write(out / "refer_seg" / "grefcoco" / "instances.json", _json_bytes(instances))
    _atomic_write(out / "refer_seg" / "grefcoco" / "grefs(unc).json", _json_bytes(refs))
    for split, entries in explanatory.items():
        _atomic_write(
            out / "reason_seg" / "ReasonSeg" / "explanatory" / f"{split}.json", _json_bytes(entries)
        )
    summary = WorldSummary(
        n=cfg.n,
        seed=cfg.seed,
        image_size=cfg.scene.image_size,
        splits={s: splits[s] for s in SPLITS},
        refs={s: sum(r["split"] == s for r in refs) for s in SPLITS},
        no_target_refs=sum(r["no_target"] for r in refs),
        multi_target_refs=sum(len(r["ann_id"]) > 1 for r in refs),
        query_kinds=dict(sorted(kinds.items())),
        held_out_backgrounds=sorted(TEST_BACKGROUNDS),
        held_out_families=sorted(TEST_FAMILIES),
        test_refs_with_held_out_family=sum(
            r["split"] == "test" and r["synth"]["family"] in TEST_FAMILIES for r in refs
        ),
        explanations=sum(len(v) for v in explanatory.values()),
        polygon_iou_mean=float(np.mean(ious)),
        polygon_iou_min=float(np.min(ious)),
        polygon_iou_kept_min=float(np.min(ious_kept)),
        kinds_used=len(used),
        config=asdict(cfg),
    )
    _prune_stale(out, {(r["synth"]["split"], Path(r["file_name"]).stem) for r in images})
    _atomic_write(out / "world.json", _json_bytes(asdict(summary), indent=1))
    return summary


def family_ids() -> list[str]:
    """All paraphrase family ids (seen and held out)."""
    return sorted(FAMILIES)
