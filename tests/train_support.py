"""Shared helpers of the training tests: a handful of tiny segmentation samples and the collator.

``collator_for(model)`` is the data package's ``LisaCollator`` when it is importable; until then a
minimal stand-in built from the shared pieces (``encode_conversation`` + ``SamTransform``) with the
contract's ``LisaBatch`` fields, so the training tests exercise the real model either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reasonseg.data.samples import Sample, Turn

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 220, 40)}


def make_samples(n: int = 4, size: int = 32, seed: int = 0) -> list[Sample]:
    """n images (size x size) with one coloured square each on grey noise; "segment the <colour> square"."""
    rng = np.random.default_rng(seed)
    out = []
    names = list(COLOURS)
    for i in range(n):
        img = rng.integers(90, 130, size=(size, size, 3), dtype=np.uint8)
        colour = names[i % len(names)]
        s = int(rng.integers(size // 3, size // 2))
        y, x = (int(v) for v in rng.integers(0, size - s, size=2))
        img[y : y + s, x : x + s] = COLOURS[colour]
        mask = np.zeros((1, size, size), dtype=np.uint8)
        mask[0, y : y + s, x : x + s] = 1
        turns = [Turn("user", f"Can you segment the {colour} square?"), Turn("assistant", "Sure, [SEG].")]
        out.append(Sample(img, f"toy-{seed}-{i}", turns, mask, "referring", "toy"))
    return out


def toy_dataset(n: int = 4, size: int = 32, seed: int = 0) -> list[Sample]:
    """Entry point for recipes (``data.datasets: [{kind: callable, target: train_support:toy_dataset}]``)."""
    return make_samples(n, size, seed)


@dataclass
class StandInBatch:
    pixels: torch.Tensor
    resized_hw: list[tuple[int, int]]
    original_hw: list[tuple[int, int]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    masks: list[torch.Tensor]
    ignore: list[torch.Tensor | None]
    image_keys: list[str]


class StandInCollator:
    def __init__(self, model: Any) -> None:
        from reasonseg.data.transforms import SamTransform

        self.tokenizer, self.template = model.tokenizer, model.template
        self.num_image_tokens, self.pad = model.num_image_tokens, model.pad_token_id
        self.max_length = model.config.max_length
        self.sam = SamTransform(target_length=model.sam.image_size)

    def __call__(self, samples: Sequence[Sample]) -> StandInBatch:
        from reasonseg.data.conversation import encode_conversation

        encs = [
            encode_conversation(
                self.tokenizer, self.template, s.turns, self.num_image_tokens, self.max_length
            )
            for s in samples
        ]
        t = max(len(e) for e in encs)
        ids = torch.full((len(encs), t), self.pad, dtype=torch.long)
        labels = torch.full((len(encs), t), -100, dtype=torch.long)
        att = torch.zeros((len(encs), t), dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, : len(e)], labels[i, : len(e)], att[i, : len(e)] = e.input_ids, e.labels, 1
        prepared = [self.sam.prepare(s.load_image()) for s in samples]
        return StandInBatch(
            pixels=torch.stack([p.pixels for p in prepared]),
            resized_hw=[p.resized_hw for p in prepared],
            original_hw=[p.original_hw for p in prepared],
            input_ids=ids,
            attention_mask=att,
            labels=labels,
            masks=[torch.from_numpy(s.masks) for s in samples],
            ignore=[None if s.ignore is None else torch.from_numpy(s.ignore) for s in samples],
            image_keys=[s.image_id for s in samples],
        )


def collator_for(model: Any) -> Any:
    try:
        from reasonseg.training.trainer import build_collator

        return build_collator(model)
    except ImportError:
        return StandInCollator(model)
