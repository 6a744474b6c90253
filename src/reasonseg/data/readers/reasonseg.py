"""ReasonSeg (LISA): one labelme-style JSON per image.

On disk::

    ROOT/{train,val,test}/NAME.jpg
    ROOT/{train,val,test}/NAME.json   {"text": [query, ...], "is_sentence": bool,
                                       "shapes": [{"label": "target"|"ignore"|"flag",
                                                   "shape_type": "polygon", "points": [[x, y], ...], ...}]}
    ROOT/explanatory/train.json       optional: [{"image": "NAME.jpg", "query": str, "outputs": str}, ...]

Labels: "target" -> 1, any label containing "ignore" -> 255, "flag" is skipped; polygons are painted
larger first. The sample has one mask (the union of the target polygons) and the ignore mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reasonseg.data import templates
from reasonseg.data.readers.base import (
    IMAGE_SUFFIXES,
    Reader,
    ReadMode,
    check_polygon,
    files_with_suffix,
    images_by_stem,
    paint_polygons,
    read_json,
    require,
)
from reasonseg.data.samples import DataError, Sample, image_size


def read_reasonseg_json(path: str | Path, hw: tuple[int, int]) -> tuple[list[str], bool, np.ndarray]:
    """Parse one ReasonSeg JSON -> (texts, is_sentence, uint8 [H,W] label map with 0/1/255).

    A file that is not UTF-8 is read as cp1252 with a warning: some of the published files are.
    """
    anno = read_json(path, cp1252_fallback=True)
    texts = require(anno, "text", (list, str), path)
    texts = [texts] if isinstance(texts, str) else texts
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(path, "field 'text' must be a non-empty list of non-empty strings")
    is_sentence = require(anno, "is_sentence", (bool, int), path)
    shapes = require(anno, "shapes", list, path)
    polygons: list[tuple[np.ndarray, int]] = []
    for i, shape in enumerate(shapes):
        label = require(shape, "label", str, path)
        if label.lower() == "flag":  # deprecated annotations, skipped by LISA as well
            continue
        value = 255 if "ignore" in label.lower() else 1
        pts = check_polygon(require(shape, "points", list, path), hw, path, f"shapes[{i}] ({label})")
        polygons.append((pts, value))
    label_map = paint_polygons(polygons, hw, larger_first=True)
    if not (label_map == 1).any():
        raise DataError(path, "no 'target' polygon covers any pixel")
    return list(texts), bool(is_sentence), label_map


class ReasonSegReader(Reader):
    """ReasonSeg split reader -> ``kind="reasoning"`` samples with one target mask and an ignore mask.

    Args:
        root: the ``ReasonSeg`` folder (holding ``train/``, ``val/``, ``test/``).
        split: "train", "val" or "test".
        explanatory_rate: in train mode, the chance that an image with an explanation in
            ``explanatory/<split>.json`` is asked "... and explain why" (LISA uses 0.1).
        fixed_answer: answer with the first template ("It is [SEG].") instead of a random one.
    """

    source = "reason_seg"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        explanatory_rate: float = 0.1,
        fixed_answer: bool = False,
        mode: ReadMode = "train",
        seed: int = 0,
        skip_malformed: bool = False,
    ) -> None:
        super().__init__(mode=mode, seed=seed, skip_malformed=skip_malformed)
        if not 0.0 <= explanatory_rate <= 1.0:
            raise ValueError(f"explanatory_rate must be in [0, 1], got {explanatory_rate}")
        self.root = Path(root)
        self.split = split
        self.explanatory_rate = explanatory_rate
        self.fixed_answer = fixed_answer
        folder = self.root / split
        if not folder.is_dir():
            raise DataError(folder, f"ReasonSeg split folder '{split}' is missing")
        self.json_paths = files_with_suffix(folder, [".json"])
        if not self.json_paths:
            raise DataError(folder, "no *.json annotations in this split")
        self.images = images_by_stem(folder)
        self.explanations: dict[str, tuple[str, str]] = {}
        exp_path = self.root / "explanatory" / f"{split}.json"
        if exp_path.is_file():
            entries = read_json(exp_path)
            if not isinstance(entries, list):
                raise DataError(exp_path, "expected a JSON list of {image, query, outputs}")
            for j, e in enumerate(entries):
                name = require(e, "image", str, exp_path)
                query = require(e, "query", str, exp_path)
                outputs = require(e, "outputs", str, exp_path)
                if not outputs.strip():
                    raise DataError(exp_path, f"entry {j} ({name}) has an empty 'outputs'")
                self.explanations[Path(name).stem] = (query, outputs)

    def __len__(self) -> int:
        return len(self.json_paths)

    def image_path(self, json_path: Path) -> Path:
        """The image next to an annotation: same stem, a suffix of ``IMAGE_SUFFIXES`` in any case."""
        if json_path.stem in self.images:
            return self.images[json_path.stem]
        raise DataError(json_path, f"no image next to it (looked for {', '.join(IMAGE_SUFFIXES)}, any case)")

    def _load(self, index: int, rng: np.random.Generator | None) -> Sample:
        jp = self.json_paths[index]
        ip = self.image_path(jp)
        hw = image_size(ip)
        texts, is_sentence, label_map = read_reasonseg_json(jp, hw)
        explanation = None
        text = texts[0] if rng is None else texts[int(rng.integers(len(texts)))]
        exp = self.explanations.get(jp.stem)
        if exp is not None and rng is not None and rng.random() < self.explanatory_rate:
            text, explanation = exp
            is_sentence = True
        turns = templates.seg_turns(
            text,
            ["seg"],
            is_sentence=is_sentence,
            explanation=explanation,
            rng=rng,
            fixed_answer=self.fixed_answer,
        )
        ignore = label_map == 255
        return Sample(
            image=ip,
            image_id=f"{self.source}/{self.split}/{jp.stem}",
            turns=turns,
            masks=(label_map == 1)[None].astype(np.uint8),
            ignore=ignore if ignore.any() else None,
            kind="reasoning",
            source=self.source,
            target_texts=[text],
            meta={"split": self.split, "is_sentence": is_sentence, "explanatory": explanation is not None},
        )
