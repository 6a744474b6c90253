"""The typed sample every reader produces, and the errors readers raise.

(``Turn`` is re-exported from :mod:`reasonseg.data.conversation`.)

A :class:`Sample` is one training/eval example: an image (a path, decoded lazily, or an HxWx3 uint8 array),
the conversation turns, the target masks in the order of the ``[SEG]``/``[REJ]`` slots of the answer, an
optional ignore mask, and where it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from reasonseg.data.conversation import Turn  # the one conversation-turn type of the toolkit

__all__ = [
    "SAMPLE_KINDS",
    "DataError",
    "Sample",
    "SampleKind",
    "TargetKind",
    "Turn",
    "image_size",
    "read_rgb",
    "stack_masks",
]

SampleKind = Literal["semantic", "referring", "reasoning", "vqa", "gres"]
SAMPLE_KINDS: tuple[str, ...] = ("semantic", "referring", "reasoning", "vqa", "gres")
TargetKind = Literal["seg", "rej"]


class DataError(ValueError):
    """A malformed dataset record. ``path`` names the file, ``reason`` says what is wrong with it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Sample:
    """One example.

    Attributes:
        image: a path (decoded on :meth:`load_image`) or an HxWx3 uint8 RGB array.
        image_id: a stable key for the image (used for caching image embeddings).
        turns: alternating user/assistant turns.
        masks: uint8 [K,H,W] in {0,1}, one per ``[SEG]``/``[REJ]`` slot of the assistant answers, in order;
            an all-zero mask for a ``[REJ]`` slot. K may be 0 (VQA).
        ignore: bool [H,W] (pixels excluded from loss and metrics) or None.
        kind: one of ``SAMPLE_KINDS``.
        source: dataset name (``"reason_seg"``, ``"refcoco"``, ``"synth_gres"``, ...).
        target_kinds: ``"seg"`` or ``"rej"`` per mask (defaults to ``"seg"`` for non-empty masks).
        target_texts: the phrase each target answers (for logging and per-target output), or empty strings.
        meta: free-form provenance (split, query family, ...); never used by the model.
    """

    image: Path | np.ndarray
    image_id: str
    turns: list[Turn]
    masks: np.ndarray
    kind: SampleKind
    source: str
    ignore: np.ndarray | None = None
    target_kinds: list[TargetKind] = field(default_factory=list)
    target_texts: list[str] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SAMPLE_KINDS:
            raise ValueError(f"Sample.kind must be one of {SAMPLE_KINDS}, got {self.kind!r}")
        if not isinstance(self.image, (Path, np.ndarray)):
            self.image = Path(self.image)
        m = np.asarray(self.masks)
        if m.ndim != 3:
            raise ValueError(f"Sample.masks must be [K,H,W], got shape {m.shape} ({self.image_id})")
        self.masks = m.astype(np.uint8, copy=False)
        if self.ignore is not None:
            ig = np.asarray(self.ignore, dtype=bool)
            if ig.shape != m.shape[1:]:
                raise ValueError(
                    f"Sample.ignore shape {ig.shape} != mask shape {m.shape[1:]} ({self.image_id})"
                )
            self.ignore = ig
        if isinstance(self.image, np.ndarray) and self.image.shape[:2] != m.shape[1:]:
            raise ValueError(
                f"Sample image {self.image.shape[:2]} != mask size {m.shape[1:]} ({self.image_id})"
            )
        if not self.target_kinds:
            self.target_kinds = ["seg" if mk.any() else "rej" for mk in m]
        if len(self.target_kinds) != len(m):
            raise ValueError(f"{len(self.target_kinds)} target kinds for {len(m)} masks ({self.image_id})")
        for k, mk in zip(self.target_kinds, m, strict=True):
            if k == "rej" and mk.any():
                raise ValueError(f"a [REJ] target must have an all-zero mask ({self.image_id})")
        if not self.target_texts:
            self.target_texts = [""] * len(m)
        if len(self.target_texts) != len(m):
            raise ValueError(f"{len(self.target_texts)} target texts for {len(m)} masks ({self.image_id})")
        if not self.turns or self.turns[0].role != "user":
            raise ValueError(f"Sample.turns must start with a user turn ({self.image_id})")

    @property
    def hw(self) -> tuple[int, int]:
        """(H, W) of the image and masks."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    def load_image(self) -> np.ndarray:
        """The image as HxWx3 uint8 RGB; raises :class:`DataError` naming the file when it can't be decoded."""
        if isinstance(self.image, np.ndarray):
            return self.image
        img = read_rgb(self.image)
        if img.shape[:2] != self.hw:
            raise DataError(
                self.image,
                f"image is {img.shape[1]}x{img.shape[0]} but its masks are {self.hw[1]}x{self.hw[0]}",
            )
        return img


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header only (after EXIF orientation); DataError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(p, "image file is missing")
    try:
        with Image.open(p) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(p, f"not a readable image ({exc.__class__.__name__}: {exc})") from exc
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB (EXIF orientation applied).

    Uses the shared ``reasonseg.data.transforms.load_image`` when it is available so every part of the
    toolkit decodes images the same way; errors are re-raised as :class:`DataError` naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "image file is missing")
    try:
        from reasonseg.data.transforms import load_image  # shared decoder (SAM helper's module)
    except ImportError:
        load_image = None
    try:
        if load_image is not None:
            return load_image(p)
        from PIL import Image, ImageOps

        with Image.open(p) as im:
            im.load()
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(p, f"corrupt image ({exc.__class__.__name__}: {exc})") from exc


def stack_masks(masks: Sequence[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """Stack K HxW masks into uint8 [K,H,W] (an empty [0,H,W] array when K == 0)."""
    if not masks:
        return np.zeros((0, *hw), dtype=np.uint8)
    return np.stack([np.asarray(m, dtype=np.uint8) for m in masks])
