"""Semantic-segmentation sources as LISA mixes them: ADE20K, COCO-Stuff, Mapillary Vistas (label maps)
and PASCAL-Part, PACO-LVIS (COCO-format part annotations).

Label maps (LISA's rules):
- ADE20K (``ade20k/images/training/X.jpg`` + ``ade20k/annotations/training/X.png``): value 0 is
  "other" -> ignore (255); the 150 classes are values 1..150 -> class index value-1.
- COCO-Stuff 164k (``cocostuff/train2017/X.jpg`` + ``X.png``, stuffthingmaps): value i is class i of the
  182-entry list (COCO ids 1..182 minus one), 255 unlabeled; classes whose name contains "-" (the
  "-other"/"-stuff" catch-alls such as "building-other") are set to ignore.
- Mapillary Vistas v2.0 (``mapillary/training/images/X.jpg`` + ``training/v2.0/labels/X.png``): class names
  are the lower-cased ``readable`` fields of ``config_v2.0.json`` ``labels``.
Part datasets: category names "object:part" become "object part" or "the part of the object".
PACO-LVIS: ``vlpart/paco/annotations/paco_lvis_v1_train.json`` with images under ``coco/``;
PASCAL-Part: ``vlpart/pascal_part/train.json`` with images under
``vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/``.

Each sample asks about up to ``classes_per_sample`` classes present in the image (LISA: 3), one
question/answer turn pair per class, one mask per class in turn order. Image suffixes are matched in any
case (``X.JPG``). At start-up the label-map readers check that every label map exists, the part readers
that every annotation names a known category.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from reasonseg.data import templates
from reasonseg.data.readers.base import (
    Reader,
    ReadMode,
    files_with_suffix,
    images_by_stem,
    read_json,
    require,
)
from reasonseg.data.readers.coco import CocoInstances
from reasonseg.data.samples import DataError, Sample, Turn, image_size

IGNORE = 255
JPEG_SUFFIXES = (".jpg", ".jpeg")  # photos of the label-map datasets (their .png files are labels)

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

COCO_THINGS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack",
    "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "hair brush",
)  # fmt: skip
COCO_STUFF: tuple[str, ...] = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other",
    "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)  # fmt: skip
COCOSTUFF_CLASSES: tuple[str, ...] = COCO_THINGS + COCO_STUFF  # label value i -> COCOSTUFF_CLASSES[i]


def read_cocostuff_classes(path: str | Path) -> tuple[str, ...]:
    """LISA's ``cocostuff_classes.txt``: a header line, then ``"<id>: <name>"`` per line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "file is missing")
    lines = p.read_text(encoding="utf-8").splitlines()[1:]
    return tuple(line.strip().split(": ")[-1] for line in lines if line.strip())


def ade20k_label_map(raw: np.ndarray) -> np.ndarray:
    """ADE20K png values -> class indices: 0 ("other") -> 255, v -> v-1."""
    out = raw.astype(np.int32) - 1
    out[(raw == 0) | (out >= len(ADE20K_CLASSES))] = IGNORE
    return out.astype(np.uint8)


def cocostuff_label_map(raw: np.ndarray, classes: Sequence[str] = COCOSTUFF_CLASSES) -> np.ndarray:
    """COCO-Stuff png values -> class indices, with the "-" catch-all classes set to 255."""
    out = raw.copy()
    for i, name in enumerate(classes):
        if "-" in name:
            out[raw == i] = IGNORE
    out[raw >= len(classes)] = IGNORE
    return out


def part_name(name: str, rng: np.random.Generator | None) -> str:
    """PACO/PASCAL-Part category "obj:part" -> "obj part" or "the part of the obj" (LISA: 50/50);
    LVIS-style suffixes like "_(drink_container)" are dropped."""
    pieces = [p.split("_(")[0].replace("_", " ").strip() for p in name.strip().split(":")]
    if len(pieces) == 1:
        return pieces[0]
    if len(pieces) != 2:
        raise ValueError(f"part category {name!r} should be 'object:part'")
    obj, part = pieces
    if rng is not None and rng.random() < 0.5:
        return f"the {part} of the {obj}"
    return f"{obj} {part}"


def _turns(names: Sequence[str], rng: np.random.Generator | None) -> list[Turn]:
    turns: list[Turn] = []
    for k, name in enumerate(names):
        q = templates.question(name.lower(), is_sentence=False, rng=rng)
        turns.append(Turn("user", f"{templates.IMAGE_TOKEN}\n{q}" if k == 0 else q))
        turns.append(Turn("assistant", templates.answer(["seg"], rng=rng)))
    return turns


def _pick(n: int, k: int, rng: np.random.Generator | None) -> list[int]:
    if rng is None:
        return list(range(min(n, k)))
    return sorted(int(i) for i in rng.choice(n, size=min(n, k), replace=False))


class LabelMapReader(Reader):
    """Image + label-map pairs (ADE20K, COCO-Stuff, Mapillary) -> ``kind="semantic"`` samples."""

    def __init__(
        self,
        source: str,
        images: Sequence[Path],
        labels: Sequence[Path],
        classes: Sequence[str],
        *,
        classes_per_sample: int = 3,
        mode: ReadMode = "train",
        seed: int = 0,
        skip_malformed: bool = False,
    ) -> None:
        super().__init__(mode=mode, seed=seed, skip_malformed=skip_malformed)
        if len(images) != len(labels):
            raise ValueError(f"{source}: {len(images)} images but {len(labels)} label maps")
        if classes_per_sample < 1:
            raise ValueError(f"classes_per_sample must be >= 1, got {classes_per_sample}")
        self.source = source
        self.images = list(images)
        self.labels = list(labels)
        self.classes = tuple(classes)
        self.classes_per_sample = classes_per_sample
        self.check_records()

    def __len__(self) -> int:
        return len(self.images)

    def _check(self, index: int) -> None:
        if not self.labels[index].is_file():
            raise DataError(self.labels[index], f"label map of {self.images[index].name} is missing")

    def label_map(self, raw: np.ndarray) -> np.ndarray:
        """Raw png values -> class indices with 255 = ignore (per-dataset rule)."""
        if self.source == "ade20k":
            return ade20k_label_map(raw)
        if self.source == "cocostuff":
            return cocostuff_label_map(raw, self.classes)
        out = raw.copy()
        out[raw >= len(self.classes)] = IGNORE
        return out

    def _load(self, index: int, rng: np.random.Generator | None) -> Sample:
        ip, lp = self.images[index], self.labels[index]
        hw = image_size(ip)
        if not lp.is_file():
            raise DataError(lp, "label map is missing")
        try:
            with Image.open(lp) as im:
                raw = np.asarray(im)
        except OSError as exc:
            raise DataError(lp, f"corrupt label map ({exc})") from exc
        if raw.ndim != 2:
            raise DataError(lp, f"label map must be single-channel, got shape {raw.shape}")
        if raw.shape != hw:
            raise DataError(
                lp, f"label map is {raw.shape[1]}x{raw.shape[0]} but the image is {hw[1]}x{hw[0]}"
            )
        label = self.label_map(raw)
        present = [int(v) for v in np.unique(label) if v != IGNORE]
        if not present:
            raise DataError(lp, "no labelled class in this label map")
        chosen = [present[i] for i in _pick(len(present), self.classes_per_sample, rng)]
        names = [self.classes[c] for c in chosen]
        ignore = label == IGNORE
        return Sample(
            image=ip,
            image_id=f"{self.source}/{ip.stem}",
            turns=_turns(names, rng),
            masks=np.stack([label == c for c in chosen]).astype(np.uint8),
            ignore=ignore if ignore.any() else None,
            kind="semantic",
            source=self.source,
            target_texts=names,
            meta={"class_ids": chosen},
        )


class PartReader(Reader):
    """COCO-format part annotations (PACO-LVIS, PASCAL-Part) -> ``kind="semantic"`` samples."""

    def __init__(
        self,
        source: str,
        instances: str | Path,
        image_root: str | Path,
        *,
        classes_per_sample: int = 3,
        mode: ReadMode = "train",
        seed: int = 0,
        skip_malformed: bool = False,
    ) -> None:
        super().__init__(mode=mode, seed=seed, skip_malformed=skip_malformed)
        self.source = source
        self.coco = CocoInstances(instances)
        self.image_root = Path(image_root)
        self.classes_per_sample = classes_per_sample
        self.by_image: dict[int, list[int]] = {}
        for aid, ann in sorted(self.coco.anns.items()):
            self.by_image.setdefault(int(ann["image_id"]), []).append(aid)
        self.image_ids = sorted(i for i in self.coco.images if self.by_image.get(i))
        if not self.image_ids:
            raise DataError(self.coco.path, "no image has annotations")
        self.check_records()

    def __len__(self) -> int:
        return len(self.image_ids)

    def _check(self, index: int) -> None:
        for aid in self.by_image[self.image_ids[index]]:
            cid = require(self.coco.ann(aid), "category_id", int, self.coco.path)
            if cid not in self.coco.categories:
                raise DataError(self.coco.path, f"annotation {aid}: unknown category {cid}")

    def _load(self, index: int, rng: np.random.Generator | None) -> Sample:
        iid = self.image_ids[index]
        im = self.coco.image(iid)
        path = self.image_root / im["file_name"]
        hw = image_size(path)
        if hw != (im["height"], im["width"]):
            raise DataError(
                path, f"image is {hw[1]}x{hw[0]} but the annotations say {im['width']}x{im['height']}"
            )
        anns = self.by_image[iid]
        chosen = [anns[i] for i in _pick(len(anns), self.classes_per_sample, rng)]
        names = []
        for aid in chosen:
            cid = int(require(self.coco.ann(aid), "category_id", int, self.coco.path))
            if cid not in self.coco.categories:
                raise DataError(self.coco.path, f"annotation {aid}: unknown category {cid}")
            names.append(part_name(self.coco.categories[cid], rng))
        return Sample(
            image=path,
            image_id=f"{self.source}/{iid}",
            turns=_turns(names, rng),
            masks=np.stack([self.coco.ann_mask(a) for a in chosen]),
            kind="semantic",
            source=self.source,
            target_texts=names,
            meta={"ann_ids": chosen},
        )


def ade20k(root: str | Path, split: str = "training", **kw: object) -> LabelMapReader:
    """ADE20K from ``root/ade20k/{images,annotations}/<split>/``."""
    base = Path(root) / "ade20k"
    images = files_with_suffix(base / "images" / split, JPEG_SUFFIXES)
    if not images:
        raise DataError(base / "images" / split, "no *.jpg images")
    labels = [base / "annotations" / split / f"{p.stem}.png" for p in images]
    return LabelMapReader("ade20k", images, labels, ADE20K_CLASSES, **kw)  # type: ignore[arg-type]


def cocostuff(
    root: str | Path, split: str = "train2017", classes_file: str | Path | None = None, **kw: object
) -> LabelMapReader:
    """COCO-Stuff from ``root/cocostuff/<split>/X.{jpg,png}``; ``classes_file`` = LISA's cocostuff_classes.txt."""
    folder = Path(root) / "cocostuff" / split
    images = files_with_suffix(folder, JPEG_SUFFIXES)
    if not images:
        raise DataError(folder, "no *.jpg images")
    classes = read_cocostuff_classes(classes_file) if classes_file else COCOSTUFF_CLASSES
    return LabelMapReader("cocostuff", images, [p.with_suffix(".png") for p in images], classes, **kw)  # type: ignore[arg-type]


def mapillary(root: str | Path, **kw: object) -> LabelMapReader:
    """Mapillary Vistas v2.0 from ``root/mapillary`` (class names from its ``config_v2.0.json``)."""
    base = Path(root) / "mapillary"
    cfg_path = base / "config_v2.0.json"
    labels_cfg = require(read_json(cfg_path), "labels", list, cfg_path)
    classes = [str(require(x, "readable", str, cfg_path)).lower() for x in labels_cfg]
    labels = sorted((base / "training" / "v2.0" / "labels").glob("*.png"))
    if not labels:
        raise DataError(base / "training" / "v2.0" / "labels", "no *.png label maps")
    found = images_by_stem(base / "training" / "images", JPEG_SUFFIXES)
    images = [found.get(p.stem, base / "training" / "images" / f"{p.stem}.jpg") for p in labels]
    return LabelMapReader("mapillary", images, labels, classes, **kw)  # type: ignore[arg-type]


def paco_lvis(root: str | Path, **kw: object) -> PartReader:
    base = Path(root)
    return PartReader(
        "paco_lvis",
        base / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json",
        base / "coco",
        **kw,  # type: ignore[arg-type]
    )


def pascal_part(root: str | Path, **kw: object) -> PartReader:
    base = Path(root) / "vlpart" / "pascal_part"
    return PartReader("pascal_part", base / "train.json", base / "VOCdevkit" / "VOC2010" / "JPEGImages", **kw)  # type: ignore[arg-type]
