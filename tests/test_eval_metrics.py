"""Metrics on hand-computed cases: every number below was worked out on paper from the 4x4 masks."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from reasonseg.evaluation.metrics import (
    GSVA_RULES,
    LISA_RULES,
    MetricRules,
    TargetScore,
    intersection_union,
    score_target,
    summarize,
)


def m(rows: list[str]) -> np.ndarray:
    """'1' target, '0' background, 'x' ignore (255)."""
    table = {"0": 0, "1": 1, "x": 255}
    return np.array([[table[c] for c in r] for r in rows], dtype=np.uint8)


GT = m(["1100", "1100", "0000", "00xx"])  # 4 target pixels, 2 ignore pixels
PRED = m(["1110", "0000", "0000", "0011"]).astype(bool)  # 5 pixels, 2 of them on ignore


def test_ignore_pixels_are_removed_from_both_masks() -> None:
    # Outside ignore: pred = 3 pixels, gt = 4 pixels, overlap = 2 -> U = 3 + 4 - 2 = 5.
    assert intersection_union(PRED, GT) == (2, 5, 3, 4)
    s = score_target(PRED, GT, LISA_RULES)
    assert s.intersection == 2 and s.union == 5
    assert s.giou == pytest.approx(2 / (5 + 1e-5), abs=0)


def test_explicit_ignore_mask_adds_to_255() -> None:
    extra = np.zeros((4, 4), dtype=bool)
    extra[0, 2] = True  # the one predicted pixel outside the target
    # pred outside ignore: (0,0),(0,1) -> 2; gt 4; I = 2; U = 4.
    assert intersection_union(PRED, GT, extra) == (2, 4, 2, 4)


def test_both_empty_scores_one_under_lisa_rules() -> None:
    empty = np.zeros((4, 4), dtype=np.uint8)
    s = score_target(np.zeros((4, 4), bool), empty, LISA_RULES)
    assert (s.intersection, s.union, s.giou) == (0, 0, 1.0)


def test_prediction_only_on_ignore_pixels_counts_as_empty() -> None:
    gt = m(["0000", "0000", "0000", "00xx"])
    pred = m(["0000", "0000", "0000", "0011"]).astype(bool)
    s = score_target(pred, gt, LISA_RULES)
    assert (s.union, s.giou, s.pred_area) == (0, 1.0, 0)


def test_empty_gt_with_prediction_scores_zero_and_adds_union() -> None:
    empty = np.zeros((4, 4), dtype=np.uint8)
    pred = m(["1100", "0000", "0000", "0000"]).astype(bool)
    s = score_target(pred, empty, LISA_RULES)
    assert (s.intersection, s.union, s.giou) == (0, 2, 0.0)


def test_gsva_rejection_right_and_wrong() -> None:
    empty = np.zeros((4, 4), dtype=np.uint8)
    pred = m(["1110", "0000", "0000", "0000"]).astype(bool)
    # Empty GT, rejected: no-target true positive, gIoU 1, nothing added to the sums.
    tp = score_target(pred, empty, GSVA_RULES, rejected=True)
    assert (tp.outcome, tp.giou, tp.intersection, tp.union) == ("TP", 1.0, 0, 0)
    # Empty GT, not rejected: false negative, gIoU 0 even if the decoded mask is empty ...
    fn_empty = score_target(np.zeros((4, 4), bool), empty, GSVA_RULES, rejected=False)
    assert (fn_empty.outcome, fn_empty.giou, fn_empty.union) == ("FN", 0.0, 0)
    # ... and its predicted area goes into the union sum.
    fn = score_target(pred, empty, GSVA_RULES, rejected=False)
    assert (fn.outcome, fn.giou, fn.intersection, fn.union) == ("FN", 0.0, 0, 3)
    # A real target rejected: false positive; IoU still measured on the slot's decoded mask (GSVA).
    fp = score_target(PRED, GT, GSVA_RULES, rejected=True)
    assert (fp.outcome, fp.intersection, fp.union) == ("FP", 2, 5)
    assert fp.giou == pytest.approx(2 / (5 + 1e-8), abs=0)
    # A real target kept: true negative.
    tn = score_target(PRED, GT, GSVA_RULES, rejected=False)
    assert (tn.outcome, tn.intersection, tn.union) == ("TN", 2, 5)

    s = summarize([tp, fn_empty, fn, fp, tn], GSVA_RULES)
    assert (s.tp, s.fn, s.fp, s.tn) == (1, 2, 1, 1)
    assert s.n_acc == pytest.approx(1 / 3, abs=0)  # TP / (TP + FN)
    assert s.t_acc == pytest.approx(1 / 2, abs=0)  # TN / (TN + FP)
    assert s.intersection == 4 and s.union == 0 + 0 + 3 + 5 + 5
    assert s.ciou == pytest.approx(4 / (13 + 1e-10), abs=0)
    assert s.giou == pytest.approx((1.0 + 0 + 0 + 2 * 2 / (5 + 1e-8)) / 5, abs=1e-15)


def test_lisa_rules_ignore_rejection_flag() -> None:
    s = score_target(PRED, GT, LISA_RULES, rejected=True)
    assert s.rejected is False and s.outcome is None


def test_summary_giou_is_mean_ciou_is_ratio_of_sums() -> None:
    a = score_target(PRED, GT, LISA_RULES)  # I 2, U 5
    full = m(["1111", "1111", "1111", "1111"])
    b = score_target(full.astype(bool), full, LISA_RULES)  # I 16, U 16
    c = score_target(np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8), LISA_RULES)  # both empty
    s = summarize([a, b, c], LISA_RULES)
    assert s.n_targets == 3
    assert s.giou == pytest.approx((2 / (5 + 1e-5) + 16 / (16 + 1e-5) + 1.0) / 3, abs=1e-15)
    assert s.ciou == pytest.approx(18 / (21 + 1e-10), abs=0)
    assert s.n_acc is None and s.t_acc is None
    # cIoU is not the mean of per-target IoUs: a large target dominates.
    assert s.ciou != pytest.approx((2 / 5 + 1.0) / 2)


def test_summary_is_order_independent_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(300):
        gt = (rng.random((8, 8)) < rng.random()).astype(np.uint8)
        pred = rng.random((8, 8)) < rng.random()
        scores.append(score_target(pred, gt, GSVA_RULES, rejected=bool(rng.random() < 0.3)))
    ref = summarize(scores, GSVA_RULES)
    for seed in range(5):
        shuffled = scores[:]
        random.Random(seed).shuffle(shuffled)
        assert summarize(shuffled, GSVA_RULES) == ref


def test_empty_summary_is_nan_and_json_round_trip() -> None:
    s = summarize([], LISA_RULES)
    assert s.n_targets == 0 and math.isnan(s.giou) and math.isnan(s.ciou)
    t = score_target(PRED, GT, GSVA_RULES, rejected=True)
    assert TargetScore.from_json(t.to_json()) == t


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((3, 4), bool), GT)
    with pytest.raises(ValueError, match="ignore mask shape"):
        intersection_union(PRED, GT, np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="giou_eps"):
        MetricRules(rejection=False, giou_eps=0.5)
