"""Segmentation metrics with the exact semantics of the published LISA and GSVA evaluations.

Everything here is pure numpy and integer counting, so that results are bit-identical whatever the
batch size, the process count or the order in which samples finished.

Definitions (REFERENCE.md section 5):

* Per target (one ``[SEG]``/``[REJ]`` slot scored against its ground-truth mask): the intersection
  ``I`` and union ``U`` of the binarised prediction and the ground truth, counted after removing the
  ground truth's ignore pixels (value 255, or an explicit ignore mask) from *both*.
* LISA rules (ReasonSeg, refCOCO family): the target's gIoU is ``I / (U + 1e-5)``; a target whose
  union is empty (empty prediction on an empty ground truth) scores 1.0. The reported gIoU is the
  mean over targets; the cIoU is ``sum(I) / (sum(U) + 1e-10)`` over all targets.
* GSVA rules (gRefCOCO): each slot also carries the model's ``[SEG]``-vs-``[REJ]`` decision.
  An empty ground truth predicted as ``[REJ]`` is a no-target true positive (gIoU 1, adds nothing to
  the sums); an empty ground truth not rejected is a false negative (gIoU 0, the predicted area is
  still added to the union sum). A target that exists counts as a true negative when kept and as a
  false positive when rejected; either way its IoU is measured on the slot's decoded mask, as GSVA
  does. ``N-acc = TP / (TP + FN)``, ``T-acc = TN / (TN + FP)``. GSVA's gIoU epsilon is 1e-8.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "GSVA_RULES",
    "IGNORE_LABEL",
    "LISA_RULES",
    "MetricRules",
    "MetricSummary",
    "NoTargetOutcome",
    "TargetScore",
    "intersection_union",
    "score_target",
    "summarize",
]

IGNORE_LABEL = 255
"""Ground-truth value of pixels that count neither as target nor as background."""

NoTargetOutcome = Literal["TP", "FN", "FP", "TN"]


@dataclass(frozen=True)
class MetricRules:
    """Which published protocol's scoring rules apply.

    Attributes:
        rejection: apply GSVA's no-target rules (``[REJ]`` decisions, N-acc and T-acc).
        giou_eps: epsilon added to a target's union in its gIoU (LISA 1e-5, GSVA 1e-8).
        ciou_eps: epsilon added to the union sum in the cIoU (1e-10 in both).
    """

    rejection: bool
    giou_eps: float = 1e-5
    ciou_eps: float = 1e-10

    def __post_init__(self) -> None:
        for name in ("giou_eps", "ciou_eps"):
            value = getattr(self, name)
            if not (isinstance(value, float) and 0.0 < value < 1e-2):
                raise ValueError(f"MetricRules.{name}: must be a small positive float, got {value!r}")


LISA_RULES = MetricRules(rejection=False, giou_eps=1e-5)
GSVA_RULES = MetricRules(rejection=True, giou_eps=1e-8)


@dataclass(frozen=True)
class TargetScore:
    """The score of one target slot. Integers are pixel counts after removing ignore pixels.

    Attributes:
        intersection: ``I`` as added to the cIoU numerator.
        union: ``U`` as added to the cIoU denominator (0 for a no-target true positive).
        giou: this target's contribution to the gIoU mean.
        pred_area: predicted foreground pixels (outside ignore).
        gt_area: ground-truth foreground pixels (outside ignore).
        rejected: the model's decision at this slot was ``[REJ]`` (always False under LISA rules).
        outcome: GSVA no-target outcome ("TP", "FN", "FP", "TN"), None under LISA rules.
    """

    intersection: int
    union: int
    giou: float
    pred_area: int
    gt_area: int
    rejected: bool
    outcome: NoTargetOutcome | None

    @property
    def gt_empty(self) -> bool:
        return self.gt_area == 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TargetScore:
        return cls(
            intersection=int(data["intersection"]),
            union=int(data["union"]),
            giou=float(data["giou"]),
            pred_area=int(data["pred_area"]),
            gt_area=int(data["gt_area"]),
            rejected=bool(data["rejected"]),
            outcome=data["outcome"],
        )


def _as_valid(gt: np.ndarray, ignore: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Foreground of ``gt`` and the mask of pixels that count (neither 255 nor in ``ignore``)."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"ground truth must be HxW, got shape {gt.shape}")
    valid = gt != IGNORE_LABEL
    if ignore is not None:
        ignore = np.asarray(ignore, dtype=bool)
        if ignore.shape != gt.shape:
            raise ValueError(f"ignore mask shape {ignore.shape} != ground truth shape {gt.shape}")
        valid &= ~ignore
    return (gt != 0) & valid, valid


def intersection_union(
    pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[int, int, int, int]:
    """Count pixels of one binary prediction against one ground truth.

    Args:
        pred: HxW bool (or 0/1) predicted mask.
        gt: HxW uint8 ground truth: 0 background, 1 (any non-zero but 255) target, 255 ignore.
        ignore: optional HxW bool, extra pixels to ignore.

    Returns:
        ``(intersection, union, pred_area, gt_area)``, every count taken outside ignore pixels.
    """
    pred = np.asarray(pred)
    if pred.shape != np.shape(gt):
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {np.shape(gt)}")
    fg, valid = _as_valid(gt, ignore)
    p = (pred != 0) & valid
    inter = int(np.count_nonzero(p & fg))
    pred_area = int(np.count_nonzero(p))
    gt_area = int(np.count_nonzero(fg))
    return inter, pred_area + gt_area - inter, pred_area, gt_area


def score_target(
    pred: np.ndarray,
    gt: np.ndarray,
    rules: MetricRules,
    *,
    ignore: np.ndarray | None = None,
    rejected: bool = False,
) -> TargetScore:
    """Score one slot under ``rules``.

    Args:
        pred: HxW bool predicted mask of the slot (what the protocol decoded for it).
        gt: HxW uint8 ground truth (255 = ignore).
        rules: LISA or GSVA rules.
        ignore: optional HxW bool extra ignore pixels.
        rejected: the model chose ``[REJ]`` at this slot (only meaningful under GSVA rules).
    """
    inter, union, pred_area, gt_area = intersection_union(pred, gt, ignore)
    if not rules.rejection:
        giou = 1.0 if union == 0 else inter / (union + rules.giou_eps)
        return TargetScore(inter, union, giou, pred_area, gt_area, rejected=False, outcome=None)
    if gt_area == 0:
        if rejected:
            return TargetScore(0, 0, 1.0, pred_area, 0, rejected=True, outcome="TP")
        # Not rejected: gIoU 0, and whatever was predicted still inflates the union sum.
        return TargetScore(0, union, 0.0, pred_area, 0, rejected=False, outcome="FN")
    giou = inter / (union + rules.giou_eps)
    return TargetScore(inter, union, giou, pred_area, gt_area, rejected, "FP" if rejected else "TN")


@dataclass(frozen=True)
class MetricSummary:
    """Aggregate metrics over a set of targets (exact: sums of integers, ``math.fsum`` of gIoUs).

    ``n_acc``/``t_acc`` are None under LISA rules, or when no target of that kind was seen.
    """

    n_targets: int
    giou: float
    ciou: float
    intersection: int
    union: int
    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0
    n_acc: float | None = None
    t_acc: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(scores: Iterable[TargetScore], rules: MetricRules) -> MetricSummary:
    """gIoU (mean over targets), cIoU (ratio of sums) and, under GSVA rules, N-acc and T-acc.

    The result does not depend on the order of ``scores``: counts are integers and the gIoU sum is
    the correctly rounded ``math.fsum``. An empty input gives NaN gIoU and cIoU.
    """
    scores = list(scores)
    counts = {"TP": 0, "FN": 0, "FP": 0, "TN": 0}
    for s in scores:
        if s.outcome is not None:
            counts[s.outcome] += 1
    inter = sum(s.intersection for s in scores)
    union = sum(s.union for s in scores)
    n = len(scores)
    giou = math.fsum(s.giou for s in scores) / n if n else math.nan
    ciou = inter / (union + rules.ciou_eps) if n else math.nan
    n_acc = t_acc = None
    if rules.rejection:
        if counts["TP"] + counts["FN"]:
            n_acc = counts["TP"] / (counts["TP"] + counts["FN"])
        if counts["TN"] + counts["FP"]:
            t_acc = counts["TN"] / (counts["TN"] + counts["FP"])
    return MetricSummary(
        n_targets=n,
        giou=giou,
        ciou=ciou,
        intersection=inter,
        union=union,
        tp=counts["TP"],
        fn=counts["FN"],
        fp=counts["FP"],
        tn=counts["TN"],
        n_acc=n_acc,
        t_acc=t_acc,
    )
