"""The model side of an evaluation, behind one small interface.

The runner only needs something that, given a batch of evaluation items and a mode, returns one
:class:`SegmentResult` per item: a binary mask per ``[SEG]``/``[REJ]`` slot, the model's decision at
each slot, and (generative mode) the answer text. :class:`LisaSegmenter` adapts a
:class:`reasonseg.model.LisaModel`; tests plug in small deterministic segmenters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from reasonseg.data.samples import Sample

__all__ = ["MODES", "EvalItem", "EvalMode", "SegmentResult", "Segmenter"]

EvalMode = Literal["teacher-forced", "generative"]
MODES: tuple[str, ...] = ("teacher-forced", "generative")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation query.

    Attributes:
        key: unique, stable identifier inside the protocol (the resume key).
        sample: the image, the conversation (the last assistant turn holds the reference answer with
            one ``[SEG]``/``[REJ]`` per target) and the ground-truth masks uint8 [K,H,W] (255 = ignore);
            or a zero-argument function that builds it, so a protocol over thousands of images does
            not hold every mask in memory (the runner loads one batch at a time).
        group: breakdown bucket (ReasonSeg: ``"short"`` or ``"long"`` query), or None.
        query: the raw query text, for reports.
    """

    key: str
    sample: Sample | Callable[[], Sample]
    group: str | None = None
    query: str = ""

    def load(self) -> Sample:
        """The sample (built now when ``sample`` is a function)."""
        s = self.sample
        return s() if callable(s) else s

    def loaded(self) -> EvalItem:
        """A copy whose ``sample`` is built, for the duration of one batch."""
        return self if not callable(self.sample) else replace(self, sample=self.load())


@dataclass(frozen=True)
class SegmentResult:
    """What a model produced for one item.

    Attributes:
        masks: bool [n,H,W] at the image's original size, one per slot the answer holds, in order.
            Teacher-forced: n equals the item's target count. Generative: n is whatever the model
            wrote; a slot the model did not write is scored as an empty mask.
        rejected: n flags, True where the slot is ``[REJ]`` (teacher-forced GSVA protocol: the token
            the model itself predicts at that slot).
        answer: the generated answer text (generative mode), else None.
    """

    masks: np.ndarray
    rejected: list[bool] = field(default_factory=list)
    answer: str | None = None

    def __post_init__(self) -> None:
        m = np.asarray(self.masks)
        if m.ndim != 3:
            raise ValueError(f"SegmentResult.masks must be [n,H,W], got shape {m.shape}")
        object.__setattr__(self, "masks", m.astype(bool, copy=False))
        if not self.rejected:
            object.__setattr__(self, "rejected", [False] * m.shape[0])
        if len(self.rejected) != m.shape[0]:
            raise ValueError(f"SegmentResult: {len(self.rejected)} rejection flags for {m.shape[0]} masks")


@runtime_checkable
class Segmenter(Protocol):
    """Anything that turns a batch of items into per-item slot masks.

    ``name`` identifies the model in the run manifest (a rerun into the same directory with another
    model is refused).
    """

    name: str

    def segment(self, items: Sequence[EvalItem], mode: EvalMode) -> list[SegmentResult]:
        """One result per item, in order. ``mode`` is "teacher-forced" or "generative"."""
        ...
