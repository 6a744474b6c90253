"""LISA's loss terms on cases small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch

from reasonseg.training.losses import (
    IGNORE_INDEX,
    LossTerms,
    LossWeights,
    combine_losses,
    dice_loss_per_mask,
    mask_losses,
    sigmoid_bce_per_mask,
    supervised_positions,
    text_ce_loss,
    text_ce_loss_at,
)


def test_ce_shifts_by_one_and_ignores_minus_100() -> None:
    # Position t predicts token t+1. Labels: [-100, 0, 1] -> supervised pairs (pos0 -> 0), (pos1 -> 1).
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    total, count = text_ce_loss(logits, labels)
    lse0 = math.log(math.exp(2.0) + 1.0)
    lse1 = math.log(1.0 + math.exp(1.0))
    expected = (lse0 - 2.0) + (lse1 - 1.0)
    assert count == 2
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_ce_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="disagree"):
        text_ce_loss(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))


def test_ce_from_selected_positions_equals_the_full_ce() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[torch.rand(3, 7, generator=g) < 0.4] = IGNORE_INDEX
    full, n_full = text_ce_loss(logits, labels)
    need = supervised_positions(labels)
    assert int(need.sum()) == n_full
    for at in (need, torch.ones_like(need)):  # the smallest mask and every position
        part, n_part = text_ce_loss_at(logits[at], labels, at)
        assert n_part == n_full
        torch.testing.assert_close(part, full)
    none = torch.zeros_like(need)
    if n_full:
        with pytest.raises(ValueError, match="leaves out supervised"):
            text_ce_loss_at(logits[none], labels, none)
    ignored = torch.full_like(labels, IGNORE_INDEX)
    total, count = text_ce_loss_at(logits[none], ignored, none)
    assert count == 0 and total.item() == 0.0


def test_bce_is_per_mask_pixel_mean() -> None:
    # Logit 0 -> BCE = log 2 for any target; logit +-20 on the right target -> about 0.
    logits = torch.stack([torch.zeros(2, 2), torch.tensor([[20.0, -20.0], [20.0, -20.0]])])
    target = torch.stack([torch.tensor([[1, 0], [0, 0]]), torch.tensor([[1, 0], [1, 0]])])
    per = sigmoid_bce_per_mask(logits, target)
    assert per[0].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert per[1].item() == pytest.approx(0.0, abs=1e-8)


def test_bce_ignore_pixels_leave_the_mean() -> None:
    # One pixel badly wrong (logit +10 on target 0) but ignored: the mean is over the 3 others (log 2 each).
    logits = torch.tensor([[[0.0, 0.0], [0.0, 10.0]]])
    target = torch.zeros(1, 2, 2)
    ignore = torch.tensor([[False, False], [False, True]])
    assert sigmoid_bce_per_mask(logits, target, ignore)[0].item() == pytest.approx(math.log(2.0), rel=1e-6)
    unmasked = (3 * math.log(2.0) + (10.0 + math.log1p(math.exp(-10.0)))) / 4
    assert sigmoid_bce_per_mask(logits, target)[0].item() == pytest.approx(unmasked, rel=1e-6)


def test_dice_matches_lisa_formula() -> None:
    # p = 0.5 on 4 pixels, target [1,1,0,0]: num = 2*(2*0.5)/s, den = (4*0.5 + 2)/s.
    s, eps = 1000.0, 1e-6
    logits = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1, 1], [0, 0]]])
    expected = 1.0 - (2.0 / s + eps) / (4.0 / s + eps)
    assert dice_loss_per_mask(logits, target)[0].item() == pytest.approx(expected, rel=1e-6)
    # A confident perfect prediction has Dice about 0; a confident all-wrong one about 1.
    perfect = dice_loss_per_mask(torch.tensor([[[30.0, 30.0], [-30.0, -30.0]]]), target)
    wrong = dice_loss_per_mask(torch.tensor([[[-30.0, -30.0], [30.0, 30.0]]]), target)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    assert wrong.item() == pytest.approx(1.0, abs=1e-3)


def test_mask_losses_average_over_all_masks_of_a_batch() -> None:
    # Sample 0: 1 mask (BCE log2); sample 1: 2 masks (log2, ~0); sample 2: no mask (VQA).
    logits = [
        torch.zeros(1, 2, 2),
        torch.stack([torch.zeros(2, 2), torch.full((2, 2), 20.0)]),
        torch.zeros(0, 3, 3),
    ]
    targets = [torch.ones(1, 2, 2), torch.ones(2, 2, 2), torch.zeros(0, 3, 3)]
    bce_sum, dice_sum, count = mask_losses(logits, targets)
    assert count == 3
    assert bce_sum.item() == pytest.approx(2 * math.log(2.0), rel=1e-5)
    terms = LossTerms(torch.tensor(0.0), 0, bce_sum, dice_sum, count)
    out = combine_losses(terms, LossWeights())
    assert out["bce"].item() == pytest.approx(2 * math.log(2.0) / 3, rel=1e-5)


def test_no_masks_gives_a_zero_that_keeps_the_graph() -> None:
    logit = torch.zeros(0, 4, 4, requires_grad=True)
    bce, dice, n = mask_losses([logit], [torch.zeros(0, 4, 4)])
    assert n == 0 and bce.item() == 0.0 and dice.item() == 0.0
    assert bce.requires_grad


def test_combine_uses_lisa_weights_and_global_counts() -> None:
    terms = LossTerms(torch.tensor(6.0), 3, torch.tensor(4.0), torch.tensor(1.0), 2)
    out = combine_losses(terms, LossWeights())
    assert out["ce"].item() == pytest.approx(2.0)
    assert out["loss"].item() == pytest.approx(1.0 * 2.0 + 2.0 * 2.0 + 0.5 * 0.5)
    # A trainer passes the global count / world size: here 6 tokens over 2 processes -> 3 per process.
    out = combine_losses(terms, LossWeights(ce=2.0, bce=0.0, dice=0.0), ce_count=1.5, mask_count=1.0)
    assert out["loss"].item() == pytest.approx(2.0 * 6.0 / 1.5)


def test_weights_are_validated() -> None:
    with pytest.raises(ValueError, match=r"LossWeights\.bce"):
        LossWeights(bce=-1.0)
