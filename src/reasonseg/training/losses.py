"""LISA's training objective: next-token cross-entropy plus per-mask BCE and Dice.

    loss = w_ce * CE(text) + w_bce * BCE(masks) + w_dice * Dice(masks)      (LISA: 1.0, 2.0, 0.5)

* CE is the usual autoregressive loss: logits at position t predict token t+1; label -100 (everything
  that is not an assistant answer) is ignored; the mean is over supervised tokens.
* BCE is the mean over pixels of one mask, then the mean over masks.
* Dice works on sigmoid probabilities; LISA divides by ``scale`` (1000) before summing (the product in
  the numerator is scaled once, each sum in the denominator once), and adds ``eps`` (1e-6) to both.
* Mask losses are computed at the original image resolution (the model's mask logits are [n,H,W]).

Every term is returned as a (sum, count) pair so a data-parallel trainer can normalise by the *global*
count across processes; with equal per-process counts that is the same as the plain mean, and in general
it makes N processes with batch B equal one process with batch N*B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "LossTerms",
    "LossWeights",
    "combine_losses",
    "dice_loss_per_mask",
    "mask_losses",
    "sigmoid_bce_per_mask",
    "supervised_positions",
    "text_ce_loss",
    "text_ce_loss_at",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms; LISA's defaults. ``dice_scale``/``dice_eps`` follow LISA's Dice."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    dice_scale: float = 1000.0
    dice_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("ce", "bce", "dice"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"LossWeights.{name} must be >= 0, got {value!r}")
        if not self.dice_scale > 0:
            raise ValueError(f"LossWeights.dice_scale must be > 0, got {self.dice_scale!r}")
        if not self.dice_eps > 0:
            raise ValueError(f"LossWeights.dice_eps must be > 0, got {self.dice_eps!r}")


@dataclass
class LossTerms:
    """Un-normalised loss terms of one (micro-)batch on one process.

    ``*_sum`` are 0-dim tensors (differentiable); ``*_count`` are the numbers they must be divided by
    (supervised tokens for CE, masks for BCE and Dice).
    """

    ce_sum: torch.Tensor
    ce_count: int
    bce_sum: torch.Tensor
    dice_sum: torch.Tensor
    mask_count: int


def text_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Autoregressive cross-entropy, summed over supervised tokens.

    Args:
        logits: [B,T,V] next-token logits (position t predicts token t+1).
        labels: [B,T] token ids with ``IGNORE_INDEX`` (-100) on unsupervised positions.

    Returns:
        (sum of per-token CE over supervised tokens as a 0-dim float32 tensor, number of those tokens).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"text_ce_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree"
        )
    shift_logits = logits[:, :-1].float()  # [B,T-1,V]
    shift_labels = labels[:, 1:]  # [B,T-1]
    count = int((shift_labels != IGNORE_INDEX).sum())
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, count


def text_ce_loss_at(
    logits: torch.Tensor, labels: torch.Tensor, logits_at: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """:func:`text_ce_loss` from logits computed only where ``logits_at`` [B,T] is True ([N,V], row-major).

    Every supervised position must be covered (``supervised_positions(labels)`` is the smallest such
    mask); the result equals ``text_ce_loss`` on the full logits.
    """
    need = supervised_positions(labels)
    logits_at = logits_at.to(device=labels.device, dtype=torch.bool)
    if logits_at.shape != labels.shape or logits_at.sum() != logits.shape[0]:
        raise ValueError(
            f"text_ce_loss_at: logits {tuple(logits.shape)} do not match the mask {tuple(logits_at.shape)}"
        )
    if bool((need & ~logits_at).any()):
        raise ValueError("text_ce_loss_at: logits_at leaves out supervised positions")
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    picked = targets[logits_at]  # [N]
    count = int((picked != IGNORE_INDEX).sum())
    if logits.shape[0] == 0:
        return logits.sum().float() * 0.0, 0
    total = F.cross_entropy(logits.float(), picked, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, count


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B,T] bool: the positions whose next-token logits the CE loss reads (t where labels[t+1] is set)."""
    need = torch.zeros_like(labels, dtype=torch.bool)
    need[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return need


def _valid_pixels(target: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor | None:
    if ignore is None:
        return None
    if ignore.shape != target.shape[-2:]:
        raise ValueError(f"ignore mask {tuple(ignore.shape)} does not match masks {tuple(target.shape)}")
    return (~ignore.bool()).to(target.dtype).expand_as(target)  # [n,H,W]


def sigmoid_bce_per_mask(
    logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over the pixels of each mask.

    Args:
        logits: [n,H,W] mask logits.
        target: [n,H,W] ground truth in {0,1} (any dtype).
        ignore: optional [H,W] bool; True pixels count neither in the loss nor in the pixel mean.

    Returns:
        [n] per-mask mean BCE (float32).
    """
    if logits.shape != target.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(target.shape)} disagree")
    logits = logits.float()
    target = target.float()
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # [n,H,W]
    valid = _valid_pixels(target, ignore)
    if valid is None:
        return per_pixel.flatten(1).mean(1)
    return (per_pixel * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)


def dice_loss_per_mask(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore: torch.Tensor | None = None,
    *,
    scale: float = 1000.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """LISA's Dice loss on sigmoid probabilities, one value per mask.

    ``1 - (2 * sum(p/s * t) + eps) / (sum(p/s) + sum(t/s) + eps)`` with s = ``scale`` (note the
    numerator scales only the prediction, as LISA's does).

    Args:
        logits: [n,H,W] mask logits.
        target: [n,H,W] ground truth in {0,1}.
        ignore: optional [H,W] bool; True pixels are dropped from all sums.

    Returns:
        [n] per-mask Dice loss (float32).
    """
    if logits.shape != target.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(target.shape)} disagree")
    prob = logits.float().sigmoid()
    target = target.float()
    valid = _valid_pixels(target, ignore)
    if valid is not None:
        prob = prob * valid
        target = target * valid
    prob = prob.flatten(1)  # [n,HW]
    target = target.flatten(1)
    numerator = 2.0 * (prob / scale * target).sum(-1)
    denominator = (prob / scale).sum(-1) + (target / scale).sum(-1)
    return 1.0 - (numerator + eps) / (denominator + eps)


def mask_losses(
    mask_logits: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    ignores: Sequence[torch.Tensor | None] | None = None,
    *,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """BCE and Dice summed over every mask of a batch.

    Args:
        mask_logits: per sample [n_i,H_i,W_i] logits at the original image size.
        targets: per sample [n_i,H_i,W_i] ground truth (same n_i as the logits).
        ignores: per sample an optional [H_i,W_i] bool of pixels to leave out.

    Returns:
        (BCE sum over masks, Dice sum over masks, number of masks); sums are 0-dim float32 tensors.
    """
    if len(mask_logits) != len(targets):
        raise ValueError(f"{len(mask_logits)} mask-logit entries for {len(targets)} target entries")
    if ignores is not None and len(ignores) != len(targets):
        raise ValueError(f"{len(ignores)} ignore entries for {len(targets)} target entries")
    bce_sum = dice_sum = None
    count = 0
    for i, (logits, target) in enumerate(zip(mask_logits, targets, strict=True)):
        if logits.shape != target.shape:
            raise ValueError(
                f"sample {i}: mask logits {tuple(logits.shape)} vs targets {tuple(target.shape)}"
            )
        if logits.shape[0] == 0:
            continue
        ignore = None if ignores is None else ignores[i]
        target = target.to(logits.device)
        if ignore is not None:
            ignore = ignore.to(logits.device)
        bce = sigmoid_bce_per_mask(logits, target, ignore).sum()
        dice = dice_loss_per_mask(
            logits, target, ignore, scale=weights.dice_scale, eps=weights.dice_eps
        ).sum()
        bce_sum = bce if bce_sum is None else bce_sum + bce
        dice_sum = dice if dice_sum is None else dice_sum + dice
        count += int(logits.shape[0])
    if bce_sum is None or dice_sum is None:
        # No mask in this batch: a zero that still touches the graph of every logits tensor, so that
        # data-parallel gradient reduction sees the same parameters on every process.
        zero = sum((m.float().sum() * 0.0 for m in mask_logits), torch.zeros(()))
        return zero, zero.clone(), 0
    return bce_sum, dice_sum, count


def combine_losses(
    terms: LossTerms,
    weights: LossWeights,
    *,
    ce_count: float | None = None,
    mask_count: float | None = None,
) -> dict[str, torch.Tensor]:
    """Normalise the summed terms and weight them.

    ``ce_count``/``mask_count`` override the local counts (a trainer passes the global counts divided by
    the number of processes, so that the average over processes of this loss is the global mean).

    Returns:
        dict with "loss" (weighted total, differentiable) and the unweighted means "ce", "bce", "dice".
    """
    n_tok = float(terms.ce_count if ce_count is None else ce_count)
    n_mask = float(terms.mask_count if mask_count is None else mask_count)
    ce = terms.ce_sum / n_tok if n_tok > 0 else terms.ce_sum * 0.0
    bce = terms.bce_sum / n_mask if n_mask > 0 else terms.bce_sum * 0.0
    dice = terms.dice_sum / n_mask if n_mask > 0 else terms.dice_sum * 0.0
    loss = weights.ce * ce + weights.bce * bce + weights.dice * dice
    return {"loss": loss, "ce": ce, "bce": bce, "dice": dice}
