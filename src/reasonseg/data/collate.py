"""Batching: a list of :class:`~reasonseg.data.samples.Sample` -> one typed :class:`LisaBatch`.

The collator renders each sample's turns with the model's conversation template
(:func:`reasonseg.data.conversation.encode_conversation`: image placeholder expanded to the vision
tokens, labels -100 outside the answers), pads on the right, prepares the image for SAM, and checks
that the ``[SEG]``/``[REJ]`` tokens in ``input_ids`` (found by id) match the sample's masks one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reasonseg.data.conversation import (
    IGNORE_INDEX,
    REJ_TOKEN,
    SEG_TOKEN,
    ConversationTemplate,
    encode_conversation,
)
from reasonseg.data.samples import Sample
from reasonseg.data.transforms import SamTransform


@dataclass
class LisaBatch:
    """A padded training/eval batch of B samples.

    Attributes:
        pixels: float32 [B,3,L,L] SAM input (normalised, zero-padded bottom/right).
        resized_hw: per sample (h, w) of the image inside ``pixels``.
        original_hw: per sample (H, W) of the source image (= its masks' size).
        input_ids: long [B,T], right-padded with the pad token.
        attention_mask: long [B,T], 1 on real tokens.
        labels: long [B,T], -100 except on the assistant answers.
        masks: per sample uint8 [K_i,H_i,W_i], one per [SEG]/[REJ] token of ``input_ids`` in order.
        ignore: per sample bool [H_i,W_i] or None.
        target_kinds: per sample "seg"/"rej" per mask.
        image_keys: per sample a stable image id (for encoder-output caching).
        kinds: per sample its ``Sample.kind``; sources: per sample its ``Sample.source``.
    """

    pixels: torch.Tensor
    resized_hw: list[tuple[int, int]]
    original_hw: list[tuple[int, int]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    masks: list[torch.Tensor]
    ignore: list[torch.Tensor | None]
    target_kinds: list[list[str]]
    image_keys: list[str]
    kinds: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class LisaCollator:
    """Callable collate function for a DataLoader (picklable, so it works with worker processes).

    Args:
        tokenizer: the model's tokenizer (knows ``<image>``, ``[SEG]``, ``[REJ]`` as single tokens).
        template: conversation template or its name (``"llava_v1"``, ``"chatml"``).
        sam_transform: the SAM input transform (``SamTransform(target_length=model.sam.image_size)``).
        num_image_tokens: vision tokens the image placeholder expands to.
        max_length: truncate longer conversations (the collator then refuses a sample whose answer lost
            a [SEG]/[REJ] slot, naming the image).
        pad_token_id: default: the tokenizer's pad token, else its EOS token.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str | ConversationTemplate,
        sam_transform: SamTransform,
        num_image_tokens: int,
        *,
        max_length: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.template = template
        self.sam_transform = sam_transform
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; pass pad_token_id")
        self.pad_token_id = int(pad)
        # [SEG] is required; [REJ] only exists in GSVA-style vocabularies (LISA's has [SEG] alone).
        self.slot_ids = {self._token_id(SEG_TOKEN)}
        try:
            self.slot_ids.add(self._token_id(REJ_TOKEN))
            self.has_rej = True
        except KeyError:
            self.has_rej = False

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or (tid == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary; add it as a special token")
        return int(tid)

    def _count_slots(self, enc: Any) -> int:
        return sum(int(t) in self.slot_ids for t in enc.input_ids.tolist())

    def _slot_mismatch(self, s: Sample, enc: Any, n_slots: int) -> str:
        """Why a sample's [SEG]/[REJ] tokens and its masks disagree: truncation by ``max_length`` only when
        the conversation was actually cut (and the uncut one would match), else the sample itself."""
        head = (
            f"{s.image_id} ({s.source}): {n_slots} [SEG]/[REJ] tokens in the encoded conversation but "
            f"{s.masks.shape[0]} target masks"
        )
        full = enc
        if self.max_length is not None:
            full = encode_conversation(self.tokenizer, self.template, s.turns, self.num_image_tokens, None)
        if len(full) > len(enc):
            n_full = self._count_slots(full)
            if n_full == s.masks.shape[0]:
                return (
                    f"{head}: the answer was cut by max_length={self.max_length} (the conversation has "
                    f"{len(full)} tokens), losing {n_full - n_slots} of them; shorten the sample or raise "
                    "max_length"
                )
            head += f" ({n_full} before the cut to max_length={self.max_length})"
        return (
            f"{head}: the sample's conversation and its masks disagree (each {SEG_TOKEN}/{REJ_TOKEN} in "
            "the turns needs one mask, in order)"
        )

    def __call__(self, samples: Sequence[Sample]) -> LisaBatch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        encs = []
        for s in samples:
            if not self.has_rej and any(REJ_TOKEN in t.text for t in s.turns):
                raise ValueError(
                    f"{s.image_id} ({s.source}): the conversation holds {REJ_TOKEN} but the tokenizer has no "
                    f"{REJ_TOKEN} token (LISA vocabularies have only {SEG_TOKEN}; use a GSVA preset or data without "
                    "no-target queries)"
                )
            enc = encode_conversation(
                self.tokenizer, self.template, s.turns, self.num_image_tokens, self.max_length
            )
            n_slots = self._count_slots(enc)
            if n_slots != s.masks.shape[0]:
                raise ValueError(self._slot_mismatch(s, enc, n_slots))
            encs.append(enc)
        t = max(len(e) for e in encs)
        b = len(samples)
        input_ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)  # [B,T]
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)  # [B,T]
        attention = torch.zeros((b, t), dtype=torch.long)  # [B,T]
        for i, e in enumerate(encs):
            n = len(e)
            input_ids[i, :n] = e.input_ids
            labels[i, :n] = e.labels
            attention[i, :n] = 1
        prepared = [self.sam_transform.prepare(s.load_image()) for s in samples]
        return LisaBatch(
            pixels=torch.stack([p.pixels for p in prepared]),  # [B,3,L,L]
            resized_hw=[p.resized_hw for p in prepared],
            original_hw=[p.original_hw for p in prepared],
            input_ids=input_ids,
            attention_mask=attention,
            labels=labels,
            masks=[torch.from_numpy(s.masks) for s in samples],
            ignore=[None if s.ignore is None else torch.from_numpy(s.ignore) for s in samples],
            target_kinds=[list(s.target_kinds) for s in samples],
            image_keys=[s.image_id for s in samples],
            kinds=[s.kind for s in samples],
            sources=[s.source for s in samples],
        )
