"""Typed outputs of the LISA/GSVA model (dataclasses; no losses: those live in ``reasonseg.training``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["GenerateOutput", "ImageFeatures", "LisaOutput", "MaskPrediction", "TargetKind"]

TargetKind = Literal["seg", "rej"]


@dataclass
class ImageFeatures:
    """One encoder pass over a batch of images.

    Attributes:
        sam_embeddings: [B,256,h,w] SAM image embeddings (h = w = L/16).
        vision_tokens: [B,N,H] image tokens already projected to the LM width.
        resized_hw: per image, its size inside SAM's padded square.
        original_hw: per image, its original size (masks are returned at this size).
    """

    sam_embeddings: torch.Tensor
    vision_tokens: torch.Tensor
    resized_hw: list[tuple[int, int]]
    original_hw: list[tuple[int, int]]

    def __len__(self) -> int:
        return int(self.sam_embeddings.shape[0])

    @staticmethod
    def cat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        """The images of ``parts`` in order, as one batch (e.g. the cached images of several predictors)."""
        if not parts:
            raise ValueError("ImageFeatures.cat needs at least one part")
        return ImageFeatures(
            sam_embeddings=torch.cat([p.sam_embeddings for p in parts]),
            vision_tokens=torch.cat([p.vision_tokens for p in parts]),
            resized_hw=[hw for p in parts for hw in p.resized_hw],
            original_hw=[hw for p in parts for hw in p.original_hw],
        )

    def select(self, index: list[int]) -> ImageFeatures:
        """The features of images ``index`` (repeats allowed: several prompts on one image)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.sam_embeddings.device)
        return ImageFeatures(
            sam_embeddings=self.sam_embeddings.index_select(0, idx),
            vision_tokens=self.vision_tokens.index_select(0, idx),
            resized_hw=[self.resized_hw[i] for i in index],
            original_hw=[self.original_hw[i] for i in index],
        )


@dataclass
class MaskPrediction:
    """Masks for the targets of one sample (one per [SEG]/[REJ] slot, in answer order).

    Attributes:
        logits: [n,H,W] mask logits at the original image size (positive = inside).
        low_res_logits: [n,256,256] the mask decoder's raw output (before post-processing).
        iou_pred: [n] the mask decoder's IoU prediction.
        kinds: per slot, ``"seg"`` or ``"rej"`` (the token at that slot).
        embeddings: [n,256] the projected LM hidden states used as sparse prompts.
    """

    logits: torch.Tensor
    low_res_logits: torch.Tensor
    iou_pred: torch.Tensor
    kinds: list[TargetKind]
    embeddings: torch.Tensor


@dataclass
class LisaOutput:
    """Teacher-forced forward pass.

    Attributes:
        logits: [B,T,V] next-token logits (position t predicts token t+1); with ``forward(logits_at=M)``
            only the positions where M [B,T] is True, [N,V] in row-major order (N may be 0).
        hidden_states: [B,T,H] last-layer hidden states after the final norm.
        seg_embeddings: per sample, [n_i,256] projected embeddings of its [SEG]/[REJ] slots.
        slot_positions: per sample, LongTensor [n_i] positions of the [SEG]/[REJ] tokens in input_ids
            (the embedding is taken at position - 1, the position that predicts the token).
        masks: per sample, a :class:`MaskPrediction` ([n_i,H_i,W_i] logits) or None when no images were given.
        kinds: per sample, the token at each slot (``"seg"``/``"rej"``).
        predicted_rej: per sample, BoolTensor [n_i]: True where the model's logits at the predicting
            position prefer [REJ] over [SEG] (GSVA's teacher-forced target/no-target decision).
        logits_at: the [B,T] bool mask ``logits`` were computed at, or None when they cover every position.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor
    seg_embeddings: list[torch.Tensor]
    slot_positions: list[torch.Tensor]
    masks: list[MaskPrediction] | None
    kinds: list[list[TargetKind]]
    predicted_rej: list[torch.Tensor] = field(default_factory=list)
    logits_at: torch.Tensor | None = None


@dataclass
class GenerateOutput:
    """Generated answers for a batch of prompts.

    Attributes:
        sequences: per sample, LongTensor [n_new] the generated token ids (stop token included if emitted).
        texts: per sample, the decoded answer (special tokens kept, the stop string removed).
        seg_embeddings: per sample, [n_i,256] projected embeddings of the generated [SEG]/[REJ] tokens.
        kinds: per sample, ``"seg"``/``"rej"`` for each generated slot, in order.
        masks: per sample, a :class:`MaskPrediction` (decoded for every slot; [REJ] slots are reported as
            absent by the predictor) or None when no image was given.
        cache: for a single prompt decoded with the KV cache, ``(cache, ids)``: the keys/values of the
            whole conversation so far and its token ids [L] (prompt + answer, up to the last token fed
            to the LM), reusable as ``generate(prefix_cache=(cache, L))`` by a next turn that starts
            with ``ids``; else None.
    """

    sequences: list[torch.Tensor]
    texts: list[str]
    seg_embeddings: list[torch.Tensor]
    kinds: list[list[TargetKind]]
    masks: list[MaskPrediction] | None
    cache: tuple[Any, torch.Tensor] | None = None
