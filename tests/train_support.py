"""Shared helpers of the training tests: a handful of tiny segmentation samples and the collator.

``collator_for(model)`` is the data package's ``LisaCollator``, built the way ``reasonseg train`` builds it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def collator_for(model: Any) -> Any:
    """The data package's ``LisaCollator`` for ``model`` (what ``reasonseg train`` builds)."""
    from reasonseg.training.trainer import build_collator

    return build_collator(model)
