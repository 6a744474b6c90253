"""The published evaluation protocols: which items, which prompts, which scoring rules.

A data spec names a benchmark split::

    reasonseg:/data/ReasonSeg:val          ReasonSeg val or test (LISA), short/long breakdown
    refcoco:/data/refer_seg/refcoco:unc:val    refCOCO / refCOCO+ / refCOCOg / refCLEF (LISA)
    grefcoco:/data/refer_seg/grefcoco:val  gRefCOCO val / testA / testB (GSVA)

Prompts are the ones the papers evaluated with (LISA's and GSVA's validation datasets), not the
training templates, so that converted official checkpoints meet the text they were measured on:

* ReasonSeg (LISA): the first query of each image; a long query (``is_sentence``) becomes
  ``"<image>\\n {query} Please output segmentation mask."``, a short one
  ``"<image>\\n What is {query} in this image? Please output segmentation mask."``; the reference
  answer is ``"[SEG]."``. One item per image; metrics overall and for short/long queries. LISA rules.
* refCOCO family (LISA): one item per referring sentence (lower-cased), short-query prompt, answer
  ``"[SEG]."``. LISA rules (LISA batches the sentences of an image; gIoU is a mean over sentences
  either way and the cIoU a ratio of sums, so per-sentence items give the same numbers).
* gRefCOCO (GSVA): one item per image holding every sentence of the split on that image, in the
  reference order; each expression's mask is the union of its annotations (empty when the expression
  names nothing). Prompt ``"<image>\\n What are {a}, {b}in this image? Please output segmentation
  masks."`` and reference answer ``"Sure,{a}:[SEG], {b}:[REJ]."`` exactly as GSVA's code builds them
  (including its missing spaces). GSVA rules: per-slot ``[SEG]``/``[REJ]`` decisions, N-acc, T-acc.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from reasonseg.data.samples import DataError, Sample, TargetKind, Turn
from reasonseg.evaluation.metrics import GSVA_RULES, LISA_RULES, MetricRules
from reasonseg.evaluation.segmenter import EvalItem

__all__ = [
    "DATASETS",
    "DataSpec",
    "EvalProtocol",
    "build_protocol",
    "gsva_turns",
    "lisa_turns",
]

Dataset = Literal["reasonseg", "refcoco", "refcoco+", "refcocog", "refclef", "grefcoco"]
DATASETS: tuple[str, ...] = ("reasonseg", "refcoco", "refcoco+", "refcocog", "refclef", "grefcoco")
REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")
_SPLITS = {
    "reasonseg": ("train", "val", "test"),
    # gRefCOCO's own splits, plus "test" for gRefCOCO-format worlds such as `reasonseg synth`'s
    "grefcoco": ("train", "val", "testA", "testB", "test"),
}
_SPLIT_BYS = ("unc", "umd", "google", "berkeley")

IMAGE_TOKEN = "<image>"
LISA_SHORT_QUESTION = "What is {} in this image? Please output segmentation mask."
LISA_LONG_QUESTION = "{} Please output segmentation mask."
LISA_ANSWER = "[SEG]."


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` spec.

    Attributes:
        dataset: one of ``DATASETS``.
        root: dataset folder (ReasonSeg: holds ``val/``, ``test/``; refer: holds ``refs(<by>).p`` and
            ``instances.json``; gRefCOCO: holds ``grefs(unc).json`` and ``instances.json``).
        split: split name.
        split_by: REFER split family (``unc``, ``umd``, ``google``), refer datasets only.
        image_root: folder of the COCO / SAIAPR images for refer and gRefCOCO (found next to ``root`` in
            LISA's ``refer_seg`` layout when not given).
    """

    dataset: Dataset
    root: Path
    split: str
    split_by: str | None = None
    image_root: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.image_root is not None:
            object.__setattr__(self, "image_root", Path(self.image_root))
        if self.dataset not in DATASETS:
            raise ValueError(f"data spec: unknown dataset {self.dataset!r} (known: {', '.join(DATASETS)})")
        allowed = _SPLITS.get(self.dataset)
        if allowed is not None and self.split not in allowed:
            raise ValueError(f"data spec: {self.dataset} has splits {allowed}, not {self.split!r}")
        if self.dataset in REFER_DATASETS:
            if self.split_by not in _SPLIT_BYS:
                raise ValueError(
                    f"data spec: {self.dataset} needs a split family ({', '.join(_SPLIT_BYS)}), got {self.split_by!r}"
                )
        elif self.split_by is not None:
            raise ValueError(f"data spec: {self.dataset} takes no split family, got {self.split_by!r}")

    @classmethod
    def parse(cls, spec: str, *, image_root: str | Path | None = None) -> DataSpec:
        """Parse ``DATASET:ROOT:SPLIT`` or, for refer datasets, ``DATASET:ROOT:SPLITBY:SPLIT``."""
        dataset, sep, rest = spec.partition(":")
        if not sep or not rest:
            raise ValueError(
                f"data spec {spec!r}: expected DATASET:PATH:SPLIT, e.g. reasonseg:/data/ReasonSeg:val"
            )
        dataset = dataset.lower()
        if dataset not in DATASETS:
            raise ValueError(
                f"data spec {spec!r}: unknown dataset {dataset!r} (known: {', '.join(DATASETS)})"
            )
        if dataset in REFER_DATASETS:
            parts = rest.rsplit(":", 2)
            if len(parts) != 3:
                raise ValueError(
                    f"data spec {spec!r}: expected {dataset}:PATH:SPLITBY:SPLIT, e.g. {dataset}:/data:unc:val"
                )
            root, split_by, split = parts
        else:
            parts = rest.rsplit(":", 1)
            if len(parts) != 2:
                raise ValueError(f"data spec {spec!r}: expected {dataset}:PATH:SPLIT")
            (root, split), split_by = parts, None
        return cls(dataset, Path(root), split, split_by, Path(image_root) if image_root else None)  # type: ignore[arg-type]

    def __str__(self) -> str:
        mid = f":{self.split_by}" if self.split_by else ""
        return f"{self.dataset}:{self.root}{mid}:{self.split}"


@dataclass(frozen=True)
class EvalProtocol:
    """A benchmark split ready to run.

    Attributes:
        name: e.g. ``"reasonseg/val"``, ``"refcoco(unc)/val"``, ``"grefcoco/val"``.
        spec: the data spec it came from.
        rules: LISA or GSVA scoring rules.
        groups: breakdown groups reported besides "overall".
        items: the items, in a fixed order.
        sources: the annotation files the items are read from; a run's manifest holds their digest,
            so that an edited annotation file is not resumed with stale results.
    """

    name: str
    spec: DataSpec
    rules: MetricRules
    groups: tuple[str, ...]
    items: list[EvalItem]
    sources: tuple[Path, ...] = ()


# -- prompts ---------------------------------------------------------------------------------------
def lisa_turns(query: str, *, is_sentence: bool) -> list[Turn]:
    """LISA's evaluation conversation for one query (see the module docstring)."""
    q = (LISA_LONG_QUESTION if is_sentence else LISA_SHORT_QUESTION).format(query)
    return [Turn("user", f"{IMAGE_TOKEN}\n {q}"), Turn("assistant", LISA_ANSWER)]


def gsva_turns(expressions: Sequence[str], kinds: Sequence[TargetKind]) -> list[Turn]:
    """GSVA's evaluation conversation for all expressions of one image, one slot per expression."""
    if len(expressions) != len(kinds) or not expressions:
        raise ValueError(f"gsva_turns: {len(expressions)} expressions for {len(kinds)} targets")
    stripped = [e.strip().strip(".") for e in expressions]
    question = "What are " + ", ".join(stripped) + "in this image? Please output segmentation masks."
    slots = [f"{e}:[REJ]" if k == "rej" else f"{e}:[SEG]" for e, k in zip(stripped, kinds, strict=True)]
    return [Turn("user", f"{IMAGE_TOKEN}\n {question}"), Turn("assistant", "Sure," + ", ".join(slots) + ".")]


# -- builders --------------------------------------------------------------------------------------
def _resolve_image_root(spec: DataSpec, reader: Any) -> Path:
    """The folder holding the reader's images: ``--image-root`` when given, else the first of LISA's
    ``refer_seg`` layout (``images/mscoco/images/train2014``, ``images/saiapr_tc-12``), ``ROOT/images``,
    the sub-folders of ``ROOT/../images`` and ``ROOT`` itself that holds the split's first image."""
    if spec.image_root is not None:
        if not spec.image_root.is_dir():
            raise DataError(spec.image_root, "image root folder is missing")
        return spec.image_root
    first = str(reader.coco.image(int(reader.refs[0]["image_id"]))["file_name"])
    shared = spec.root.parent / "images"
    sub = "saiapr_tc-12" if spec.dataset == "refclef" else "mscoco/images/train2014"
    candidates = [shared / sub, spec.root / "images", spec.root, shared]
    if shared.is_dir():
        candidates += sorted(d for d in shared.iterdir() if d.is_dir())
    for c in candidates:
        if (c / first).is_file():
            return c
    raise DataError(
        spec.root,
        f"cannot find image {first!r} (looked in {', '.join(map(str, candidates))}); pass --image-root",
    )


def _reasonseg(spec: DataSpec) -> EvalProtocol:
    from reasonseg.data.readers.base import read_json
    from reasonseg.data.readers.reasonseg import ReasonSegReader

    reader = ReasonSegReader(spec.root, spec.split, mode="eval")
    items: list[EvalItem] = []
    for i, jp in enumerate(reader.json_paths):
        anno = read_json(jp)
        texts = anno.get("text") if isinstance(anno, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not isinstance(texts[0], str):
            raise DataError(jp, "field 'text' must be a non-empty list of strings")
        is_sentence = bool(anno.get("is_sentence", False))
        query = texts[0].strip()

        def load(i: int = i, query: str = query, is_sentence: bool = is_sentence) -> Sample:
            s = reader.get(i)
            assert s is not None  # skip mode is off: a malformed record raises DataError
            return dataclasses.replace(
                s, turns=lisa_turns(query, is_sentence=is_sentence), target_texts=[query]
            )

        items.append(
            EvalItem(key=jp.stem, sample=load, group="long" if is_sentence else "short", query=query)
        )
    return EvalProtocol(
        f"reasonseg/{spec.split}", spec, LISA_RULES, ("short", "long"), items, tuple(reader.json_paths)
    )


def _grefcoco(spec: DataSpec) -> EvalProtocol:
    from reasonseg.data.readers.grefer import GRefCocoReader

    reader = GRefCocoReader(spec.root, spec.root, spec.split, per_instance=False, mode="eval")
    reader.image_root = _resolve_image_root(spec, reader)
    by_image: dict[int, list[int]] = {}
    for idx, (ri, _si) in enumerate(reader.index):
        by_image.setdefault(int(reader.refs[ri]["image_id"]), []).append(idx)

    def make_loader(indices: list[int]) -> Callable[[], Sample]:
        def load() -> Sample:
            parts = [reader.get(i) for i in indices]
            assert all(p is not None for p in parts)  # skip mode is off
            samples: list[Sample] = [p for p in parts if p is not None]
            texts = [s.target_texts[0].strip().lower() for s in samples]
            kinds: list[TargetKind] = [s.target_kinds[0] for s in samples]
            first = samples[0]
            return Sample(
                image=first.image,
                image_id=first.image_id,
                turns=gsva_turns(texts, kinds),
                masks=np.concatenate([s.masks for s in samples]),
                kind="gres",
                source=first.source,
                target_kinds=kinds,
                target_texts=texts,
                meta={"split": spec.split, "ref_ids": [s.meta.get("ref_id") for s in samples]},
            )

        return load

    def query_of(i: int) -> str:
        ri, si = reader.index[i]
        sents = reader.refs[ri].get("sentences") or [{}]
        return str(sents[max(si, 0)].get("sent", "")).strip().lower()

    items = [
        EvalItem(key=f"{image_id}", sample=make_loader(idx), query=" | ".join(query_of(i) for i in idx))
        for image_id, idx in by_image.items()
    ]
    return EvalProtocol(
        f"grefcoco/{spec.split}", spec, GSVA_RULES, (), items, (reader.refs_path, reader.coco.path)
    )


def _refer(spec: DataSpec) -> EvalProtocol:
    try:
        from reasonseg.data.readers.refer import RefCocoReader
    except ImportError as exc:
        raise RuntimeError(
            f"the refCOCO reader (reasonseg.data.readers.refer) is not available: {exc}"
        ) from exc
    reader = RefCocoReader(
        spec.root, spec.root, spec.split, dataset=spec.dataset, split_by=spec.split_by, mode="eval"
    )
    reader.image_root = _resolve_image_root(spec, reader)
    items: list[EvalItem] = []
    for idx, (ri, si) in enumerate(reader.index):
        key = f"{reader.refs[ri].get('ref_id', ri)}-{max(si, 0)}"  # ref id and sentence index

        def load(idx: int = idx) -> Sample:
            s = reader.get(idx)
            assert s is not None
            query = s.target_texts[0].strip().lower()
            return dataclasses.replace(s, turns=lisa_turns(query, is_sentence=False), target_texts=[query])

        sents = reader.refs[ri].get("sentences") or [{}]
        query = str(sents[max(si, 0)].get("sent", "")).strip().lower()
        items.append(EvalItem(key=key, sample=load, query=query))
    name = f"{spec.dataset}({spec.split_by})/{spec.split}"
    return EvalProtocol(name, spec, LISA_RULES, (), items, (reader.refs_path, reader.coco.path))


def build_protocol(
    spec: DataSpec | str, *, limit: int | None = None, image_root: str | Path | None = None
) -> EvalProtocol:
    """Build the protocol of a data spec; ``limit`` keeps the first N items (quick checks)."""
    if isinstance(spec, str):
        spec = DataSpec.parse(spec, image_root=image_root)
    if spec.dataset == "reasonseg":
        proto = _reasonseg(spec)
    elif spec.dataset == "grefcoco":
        proto = _grefcoco(spec)
    else:
        proto = _refer(spec)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        proto = dataclasses.replace(proto, items=proto.items[:limit], name=f"{proto.name}[:{limit}]")
    return proto
