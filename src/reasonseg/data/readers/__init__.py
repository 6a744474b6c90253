"""Dataset readers: each turns the records of one published format into :class:`~reasonseg.data.samples.Sample`.

- :mod:`.reasonseg` ReasonSeg (labelme JSON polygons, target/ignore/flag)
- :mod:`.refer` refCOCO / refCOCO+ / refCOCOg / refCLEF (REFER pickle + COCO instances)
- :mod:`.grefer` gRefCOCO (list-valued ``ann_id``, ``[-1]`` = no target)
- :mod:`.semseg` ADE20K, COCO-Stuff, PASCAL-Part, PACO-LVIS, Mapillary (class lists, label maps)
- :mod:`.vqa` LLaVA-Instruct conversations

:func:`build_reader` makes one by kind name (what training recipes list); :func:`check_reader_options`
says which options a kind takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reasonseg.data.readers.base import Reader, SkippedRecord, SkippedRecordsWarning

__all__ = [
    "READER_KINDS",
    "Reader",
    "SkippedRecord",
    "SkippedRecordsWarning",
    "build_reader",
    "check_reader_options",
    "reader_options",
]

READER_KINDS: tuple[str, ...] = (
    "reason_seg",
    "grefcoco",
    "refcoco",
    "refcoco+",
    "refcocog",
    "refclef",
    "ade20k",
    "cocostuff",
    "mapillary",
    "paco_lvis",
    "pascal_part",
    "llava_instruct",
    "synth",
    "synth_reason_seg",
)


def _image_root(path: Path, options: dict[str, Any], candidates: list[Path]) -> Path:
    if "image_root" in options:
        return Path(options.pop("image_root"))
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        f"{path}: no image folder found (looked in {', '.join(map(str, candidates))}); set image_root"
    )


def _option_sources(kind: str) -> tuple[list[Callable[..., Any]], set[str]]:
    """What :func:`build_reader` hands a kind's options to, and the parameters it fills in itself."""
    if kind in ("reason_seg", "synth_reason_seg"):
        from reasonseg.data.readers.reasonseg import ReasonSegReader

        return [ReasonSegReader], {"root"}
    if kind in ("grefcoco", "synth"):
        from reasonseg.data.readers.grefer import GRefCocoReader

        return [GRefCocoReader], {"root"}
    if kind in ("refcoco", "refcoco+", "refcocog", "refclef"):
        from reasonseg.data.readers.refer import RefCocoReader

        return [RefCocoReader], {"root", "dataset"}
    if kind in ("ade20k", "cocostuff", "mapillary"):
        from reasonseg.data.readers import semseg

        return [getattr(semseg, kind), semseg.LabelMapReader], {
            "root",
            "source",
            "images",
            "labels",
            "classes",
        }
    if kind in ("paco_lvis", "pascal_part"):
        from reasonseg.data.readers import semseg

        return [semseg.PartReader], {"source", "instances", "image_root"}
    if kind == "llava_instruct":
        from reasonseg.data.readers.vqa import LlavaInstructReader

        return [LlavaInstructReader], {"json_path"}
    raise ValueError(f"unknown reader kind {kind!r}; known: {', '.join(READER_KINDS)}")


def reader_options(kind: str) -> tuple[str, ...]:
    """The options a reader kind takes (its reader's keyword parameters, read from their signatures)."""
    targets, filled = _option_sources(kind)
    names: set[str] = set()
    for target in targets:
        for param in inspect.signature(target).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                names.add(param.name)
    return tuple(sorted(names - filled))


def check_reader_options(kind: str, options: dict[str, Any]) -> None:
    """ValueError naming the options a reader kind does not take (a typo in a recipe), and those it takes."""
    accepted = reader_options(kind)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"reader kind {kind!r} takes no option(s) {unknown}; its options: {', '.join(accepted)}"
        )


def build_reader(kind: str, path: str | Path, **options: Any) -> Reader:
    """A reader by kind name.

    ``path`` is: the ``ReasonSeg`` folder (reason_seg), the folder with ``grefs(unc).json`` (grefcoco), the
    dataset folder with ``refs(*).p`` (refcoco...), the data root holding ``ade20k/``, ``cocostuff/``,
    ``mapillary/``, ``vlpart/`` (semantic sources), the JSON file (llava_instruct), or the output folder
    of ``reasonseg synth`` (synth: its gRefCOCO part with every query kind, no-target included;
    synth_reason_seg: its ReasonSeg part). Remaining ``options`` go to the reader (split, mode, seed,
    skip_malformed, image_root, ...: :func:`reader_options`); an option it does not take is a ValueError
    that lists those it does.
    """
    check_reader_options(kind, options)
    p = Path(path)
    if kind == "reason_seg":
        from reasonseg.data.readers.reasonseg import ReasonSegReader

        return ReasonSegReader(p, **options)
    if kind in ("grefcoco", "synth"):
        from reasonseg.data.readers.grefer import GRefCocoReader

        if kind == "synth":
            p = p / "refer_seg" / "grefcoco"
        candidates = [p.parent / "images" / "synth", p.parent / "images" / "mscoco" / "images" / "train2014"]
        return GRefCocoReader(p, _image_root(p, options, candidates), **options)
    if kind == "synth_reason_seg":
        from reasonseg.data.readers.reasonseg import ReasonSegReader

        return ReasonSegReader(p / "reason_seg" / "ReasonSeg", **options)
    if kind in ("refcoco", "refcoco+", "refcocog", "refclef"):
        from reasonseg.data.readers.refer import RefCocoReader

        sub = "images/saiapr_tc-12" if kind == "refclef" else "images/mscoco/images/train2014"
        image_root = _image_root(p, options, [p.parent / sub])
        return RefCocoReader(p, image_root, dataset=kind, **options)
    if kind in ("ade20k", "cocostuff", "mapillary", "paco_lvis", "pascal_part"):
        from reasonseg.data.readers import semseg

        return getattr(semseg, kind)(p, **options)
    if kind == "llava_instruct":
        from reasonseg.data.readers.vqa import LlavaInstructReader

        image_root = _image_root(p, options, [p.parent / "coco" / "train2017", p.parent / "train2017"])
        return LlavaInstructReader(p, image_root, **options)
    raise ValueError(f"unknown reader kind {kind!r}; known: {', '.join(READER_KINDS)}")
