"""gRefCOCO (GSVA / ReLA generalized referring expressions).

On disk::

    ROOT/grefs(unc).json   [{"ref_id", "image_id", "ann_id": [int, ...] | [-1], "split",
                             "sentences": [{"sent": str, ...}], "no_target": bool?, ...}, ...]
    ROOT/instances.json    COCO instances (polygons or RLE)
    IMAGE_ROOT/<file_name>

``ann_id == [-1]`` (or an empty list, or ``no_target: true``) means the expression has no target in the
image: the answer gets a ``[REJ]`` slot and an all-zero mask. Splits: train / val / testA / testB.
With ``per_instance=True`` every annotation is its own ``[SEG]`` target, in the order of ``ann_id``;
otherwise (GSVA's evaluation) the annotations are merged into one mask. A ref may carry
``synth.explanation`` (the synthetic world's reason for a knowledge query); in train mode it is appended
to the answer with probability ``explanatory_rate``. ``no_target_refs`` keeps every ref (``"keep"``),
only the no-target ones (``"only"``) or only those with a target (``"drop"``): a mixture can then give
the no-target refs a rate of their own, to teach ``[REJ]`` more often than the data holds it (a
GSVA-style sample then groups only refs of the kept set). With ``expressions_per_sample > 1`` (train
mode), a phrase ref is asked together with other phrase refs of its image, GSVA style ("Can you segment
the cat and the dog in this image?" -> "Sure, the cat: [SEG], the dog: [REJ]."), one merged mask per
expression.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from reasonseg.data import templates
from reasonseg.data.readers.base import Reader, ReadMode, read_json, require
from reasonseg.data.readers.coco import CocoInstances
from reasonseg.data.samples import DataError, Sample, TargetKind

NO_TARGET = -1
NoTargetRefs = Literal["keep", "only", "drop"]
NO_TARGET_REFS: tuple[str, ...] = get_args(NoTargetRefs)


def is_sentence(text: str) -> bool:
    """A query written as a full sentence (ends with . ? !) goes into the long template, a phrase into the short."""
    return text.rstrip().endswith((".", "?", "!"))


def pick_sentence(ref: dict[str, Any], index: int, rng: np.random.Generator | None, refs_path: Path) -> str:
    """Sentence ``index`` of a REFER-format ref; ``index < 0`` picks one at random (the first without ``rng``)."""
    sents = require(ref, "sentences", list, refs_path)
    if not sents:
        raise DataError(refs_path, f"ref {ref.get('ref_id', '?')}: no sentences")
    if index < 0:
        index = 0 if rng is None else int(rng.integers(len(sents)))
    return require(sents[index], "sent", str, refs_path)


def check_ref(ref: dict[str, Any], ann_ids: list[int], coco: CocoInstances, refs_path: Path) -> None:
    """Start-up check of a REFER-format ref: every sentence has a ``sent`` string, and its image and
    target annotations are in ``instances.json``, the annotations on that image. DataError naming the
    refs file and the ref otherwise."""
    what = f"ref {ref.get('ref_id', '?')}"
    sents = ref.get("sentences")
    if not isinstance(sents, list) or not sents:
        raise DataError(refs_path, f"{what}: 'sentences' must be a non-empty list")
    if not all(isinstance(s, dict) and isinstance(s.get("sent"), str) for s in sents):
        raise DataError(refs_path, f"{what}: every sentence needs a 'sent' string")
    image_id = ref.get("image_id")
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise DataError(refs_path, f"{what}: 'image_id' must be an int, got {image_id!r}")
    if image_id not in coco.images:
        raise DataError(refs_path, f"{what}: image id {image_id} is not in {coco.path}")
    for a in ann_ids:
        if a not in coco.anns:
            raise DataError(refs_path, f"{what}: annotation id {a} is not in {coco.path}")
        if coco.anns[a]["image_id"] != image_id:
            raise DataError(
                refs_path, f"{what}: annotation {a} is on image {coco.anns[a]['image_id']}, not {image_id}"
            )


def sentence_index(refs: list[dict[str, Any]], mode: ReadMode) -> list[tuple[int, int]]:
    """Items of a REFER-format reader as (ref index, sentence index): every sentence in eval mode; in train
    mode one item per ref with sentence index -1 ("pick one at random", see :func:`pick_sentence`)."""
    index: list[tuple[int, int]] = []
    for i, r in enumerate(refs):
        sents = r.get("sentences")
        if mode == "eval" and isinstance(sents, list):
            index += [(i, j) for j in range(len(sents))]
        else:
            index.append((i, -1))
    return index


class GRefCocoReader(Reader):
    """gRefCOCO reader -> ``kind="gres"`` samples.

    In train mode the index runs over refs (a random sentence each); in eval mode over every sentence.
    ``fixed_answer``: single-expression answers use the first template ("It is [SEG]." / "It is
    [REJ]."), not a random one.
    """

    source = "grefcoco"

    def __init__(
        self,
        root: str | Path,
        image_root: str | Path,
        split: str = "train",
        *,
        refs_file: str = "grefs(unc).json",
        per_instance: bool = True,
        explanatory_rate: float = 0.1,
        fixed_answer: bool = False,
        expressions_per_sample: int = 1,
        no_target_refs: NoTargetRefs = "keep",
        mode: ReadMode = "train",
        seed: int = 0,
        skip_malformed: bool = False,
    ) -> None:
        super().__init__(mode=mode, seed=seed, skip_malformed=skip_malformed)
        self.root = Path(root)
        self.image_root = Path(image_root)
        self.split = split
        self.per_instance = per_instance
        if not 0.0 <= explanatory_rate <= 1.0:
            raise ValueError(f"explanatory_rate must be in [0, 1], got {explanatory_rate}")
        self.explanatory_rate = explanatory_rate
        self.fixed_answer = fixed_answer
        if expressions_per_sample < 1:
            raise ValueError(f"expressions_per_sample must be >= 1, got {expressions_per_sample}")
        self.expressions_per_sample = expressions_per_sample
        if no_target_refs not in NO_TARGET_REFS:
            raise ValueError(f"no_target_refs must be one of {NO_TARGET_REFS}, got {no_target_refs!r}")
        self.refs_path = self.root / refs_file
        refs = read_json(self.refs_path)
        if not isinstance(refs, list):
            raise DataError(self.refs_path, "expected a JSON list of refs")
        self.coco = CocoInstances(self.root / "instances.json")
        self.refs: list[dict[str, Any]] = [r for r in refs if isinstance(r, dict) and r.get("split") == split]
        if not self.refs:
            raise DataError(self.refs_path, f"no refs with split {split!r}")
        if no_target_refs != "keep":
            want_no_target = no_target_refs == "only"
            self.refs = [r for r in self.refs if self._no_target(r) in (want_no_target, None)]
            if not self.refs:
                raise DataError(
                    self.refs_path, f"no refs of split {split!r} left with no_target_refs={no_target_refs!r}"
                )
        self.index = sentence_index(self.refs, mode)
        self.check_records()
        bad = {self.index[i][0] for i in self.skipped}
        self.refs_of_image: dict[int, list[int]] = {}
        for i, r in enumerate(self.refs):
            if i not in bad:
                self.refs_of_image.setdefault(r["image_id"], []).append(i)

    def __len__(self) -> int:
        return len(self.index)

    def _check(self, index: int) -> None:
        ref = self.refs[self.index[index][0]]
        check_ref(ref, self.target_ann_ids(ref), self.coco, self.refs_path)

    def _no_target(self, ref: dict[str, Any]) -> bool | None:
        """Whether a ref has no target; None when it is malformed (:meth:`check_records` reports it)."""
        try:
            return not self.target_ann_ids(ref)
        except DataError:
            return None

    def target_ann_ids(self, ref: dict[str, Any]) -> list[int]:
        """Annotation ids of a ref; [] for no target."""
        ids = ref.get("ann_id")
        if isinstance(ids, int):
            ids = [ids]
        if not isinstance(ids, list) or not all(isinstance(a, int) for a in ids):
            raise DataError(self.refs_path, f"ref {ref.get('ref_id')}: 'ann_id' must be a list of ints")
        if ref.get("no_target") or ids == [NO_TARGET] or not ids:
            return []
        if NO_TARGET in ids:
            raise DataError(self.refs_path, f"ref {ref.get('ref_id')}: -1 mixed with real ids in 'ann_id'")
        return ids

    def _grouped(
        self,
        ri: int,
        text: str,
        stack: np.ndarray,
        kinds: list[TargetKind],
        path: Path,
        im: dict[str, Any],
        rng: np.random.Generator,
    ) -> Sample:
        """GSVA-style training sample: this ref plus up to ``expressions_per_sample - 1`` other phrase refs
        of the same image, one named slot each (merged mask per expression, [REJ] for no target)."""
        names = [text]
        masks = [np.any(stack, axis=0)]
        slots: list[TargetKind] = ["rej" if kinds == ["rej"] else "seg"]
        ref_ids = [self.refs[ri].get("ref_id", ri)]
        others = [j for j in self.refs_of_image.get(int(im["id"]), []) if j != ri]
        for j in [others[int(k)] for k in rng.permutation(len(others))]:
            if len(names) >= self.expressions_per_sample:
                break
            sents = self.refs[j].get("sentences") or []
            phrases = [s["sent"] for s in sents if isinstance(s, dict) and isinstance(s.get("sent"), str)]
            phrases = [p for p in phrases if not is_sentence(p) and p not in names]
            if not phrases:
                continue
            names.append(phrases[int(rng.integers(len(phrases)))])
            ids = self.target_ann_ids(self.refs[j])
            if ids:
                masks.append(np.any(np.stack([self.coco.ann_mask(a) for a in ids]), axis=0))
                slots.append("seg")
            else:
                masks.append(np.zeros_like(masks[0]))
                slots.append("rej")
            ref_ids.append(self.refs[j].get("ref_id", j))
        return Sample(
            image=path,
            image_id=f"{self.source}/{im['id']}",
            turns=templates.named_turns(names, slots, rng=rng),
            masks=np.stack(masks).astype(np.uint8),
            kind="gres",
            source=self.source,
            target_kinds=slots,
            target_texts=names,
            meta={"split": self.split, "ref_ids": ref_ids, "grouped": True},
        )

    def _load(self, index: int, rng: np.random.Generator | None) -> Sample:
        ri, si = self.index[index]
        ref = self.refs[ri]
        ref_id = ref.get("ref_id", ri)
        text = pick_sentence(ref, si, rng, self.refs_path)
        im, path = self.coco.checked_image_path(
            int(require(ref, "image_id", int, self.refs_path)), self.image_root
        )
        hw = (int(im["height"]), int(im["width"]))  # checked against the file above
        ann_ids = self.target_ann_ids(ref)
        masks = [self.coco.ann_mask(a) for a in ann_ids]
        kinds: list[TargetKind]
        if not masks:
            stack = np.zeros((1, *hw), dtype=np.uint8)
            kinds = ["rej"]
        elif self.per_instance:
            stack = np.stack(masks)
            kinds = ["seg"] * len(masks)
        else:
            stack = np.any(np.stack(masks), axis=0)[None].astype(np.uint8)
            kinds = ["seg"]
        # The synthetic world stores a reason with its knowledge queries; real gRefCOCO has none.
        extra = ref.get("synth") if isinstance(ref.get("synth"), dict) else {}
        explanation = extra.get("explanation") if masks else None
        if not (isinstance(explanation, str) and rng is not None and rng.random() < self.explanatory_rate):
            explanation = None
        turns = templates.seg_turns(
            text,
            kinds,
            is_sentence=is_sentence(text),
            explanation=explanation,
            rng=rng,
            fixed_answer=self.fixed_answer,
        )
        if self.expressions_per_sample > 1 and rng is not None and not is_sentence(text):
            return self._grouped(ri, text, stack, kinds, path, im, rng)
        return Sample(
            image=path,
            image_id=f"{self.source}/{im['id']}",
            turns=turns,
            masks=stack,
            kind="gres",
            source=self.source,
            target_kinds=kinds,
            target_texts=[text] * len(kinds),
            meta={
                "split": self.split,
                "ref_id": ref_id,
                "ann_ids": ann_ids,
                "explanatory": explanation is not None,
                **extra,
            },
        )
