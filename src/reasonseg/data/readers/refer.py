"""refCOCO / refCOCO+ / refCOCOg / refCLEF in the REFER layout (LISA's referring-segmentation sources).

On disk::

    ROOT/refs(<split_by>).p   pickle: [{"ref_id", "ann_id": int, "image_id", "split",
                                                 "sentences": [{"sent", ...}], "category_id", ...}]
    ROOT/instances.json       COCO instances (polygons or RLE)
    IMAGE_ROOT/<file_name>              COCO train2014 images (refCLEF: saiapr_tc-12)

LISA's splits: refcoco/refcoco+ "unc", refcocog "umd", refclef "unc". Each ref has one target; in
train mode a random sentence of a ref is asked, in eval mode every sentence is a sample.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from reasonseg.data import templates
from reasonseg.data.readers.base import Reader, ReadMode, require
from reasonseg.data.readers.coco import CocoInstances
from reasonseg.data.readers.grefer import check_ref, is_sentence, pick_sentence, sentence_index
from reasonseg.data.samples import DataError, Sample

DEFAULT_SPLIT_BY: dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}


def read_refs_pickle(path: Path) -> list[dict[str, Any]]:
    """Load a REFER ``refs(*).p`` pickle (written by Python 2, hence latin-1 for its byte strings)."""
    if not path.is_file():
        raise DataError(path, "file is missing")
    try:
        with open(path, "rb") as f:
            refs = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise DataError(path, f"not a readable REFER pickle ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(refs, list):
        raise DataError(path, f"expected a list of refs, got {type(refs).__name__}")
    return refs


class RefCocoReader(Reader):
    """REFER-format reader -> ``kind="referring"`` samples with one target mask.

    Args:
        root: the dataset folder (``.../refer_seg/refcoco``) holding ``refs(<split_by>).p`` and
            ``instances.json``.
        image_root: folder of the images the ``file_name`` entries point into.
        dataset: "refcoco", "refcoco+", "refcocog" or "refclef".
        split: "train", "val", "testA", "testB" (unc) or "train", "val", "test" (umd).
        split_by: "unc", "umd", "google", ...; default as in LISA.
    """

    def __init__(
        self,
        root: str | Path,
        image_root: str | Path,
        split: str = "train",
        *,
        dataset: str = "refcoco",
        split_by: str | None = None,
        mode: ReadMode = "train",
        seed: int = 0,
        skip_malformed: bool = False,
    ) -> None:
        super().__init__(mode=mode, seed=seed, skip_malformed=skip_malformed)
        if dataset not in DEFAULT_SPLIT_BY:
            raise ValueError(f"dataset must be one of {sorted(DEFAULT_SPLIT_BY)}, got {dataset!r}")
        self.source = dataset
        self.dataset = dataset
        self.split = split
        self.image_root = Path(image_root)
        folder = Path(root)
        self.refs_path = folder / f"refs({split_by or DEFAULT_SPLIT_BY[dataset]}).p"
        refs = read_refs_pickle(self.refs_path)
        self.coco = CocoInstances(folder / "instances.json")
        self.refs = [r for r in refs if isinstance(r, dict) and r.get("split") == split]
        if not self.refs:
            raise DataError(self.refs_path, f"no refs with split {split!r}")
        self.index = sentence_index(self.refs, mode)
        self.check_records()

    def __len__(self) -> int:
        return len(self.index)

    def _check(self, index: int) -> None:
        ref = self.refs[self.index[index][0]]
        ann_id = ref.get("ann_id")
        if not isinstance(ann_id, int):
            raise DataError(
                self.refs_path, f"ref {ref.get('ref_id', '?')}: 'ann_id' must be an int, got {ann_id!r}"
            )
        check_ref(ref, [ann_id], self.coco, self.refs_path)

    def _load(self, index: int, rng: np.random.Generator | None) -> Sample:
        ri, si = self.index[index]
        ref = self.refs[ri]
        ref_id = ref.get("ref_id", ri)
        text = pick_sentence(ref, si, rng, self.refs_path)
        ann_id = require(ref, "ann_id", int, self.refs_path)
        im, path = self.coco.checked_image_path(
            int(require(ref, "image_id", int, self.refs_path)), self.image_root
        )
        mask = self.coco.ann_mask(ann_id)
        turns = templates.seg_turns(text, ["seg"], is_sentence=is_sentence(text), rng=rng)
        return Sample(
            image=path,
            image_id=f"{self.dataset}/{im['id']}",
            turns=turns,
            masks=mask[None],
            kind="referring",
            source=self.source,
            target_texts=[text],
            meta={"split": self.split, "ref_id": ref_id, "ann_id": ann_id},
        )
