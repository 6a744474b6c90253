"""A test double of ``ReasonSegPredictor`` for the serving tests (never used by the real server).

It follows the predictor's interface (``set_image`` once per image, then ``predict`` / ``predict_batch``)
and counts calls so tests can check batching and the encoder cache. Its "model" is a brightness threshold:
the mask of an instruction containing "dark" is the pixels darker than the mean, otherwise the brighter
ones; an instruction containing "absent" yields one rejected target.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from reasonseg.inference.errors import PromptTooLongError
from reasonseg.inference.predictor import Prediction, Target


class FakePredictor:
    lock = threading.Lock()
    set_image_calls = 0
    predict_calls = 0
    batch_calls: ClassVar[list[int]] = []  # sizes of predict_batch calls
    histories: ClassVar[list[Any]] = []

    @classmethod
    def reset(cls) -> None:
        with cls.lock:
            cls.set_image_calls = 0
            cls.predict_calls = 0
            cls.batch_calls = []
            cls.histories = []

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.features: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        with FakePredictor.lock:
            FakePredictor.set_image_calls += 1
        self.features = image.astype(np.float32).mean(axis=2)  # HxW, 4 bytes/px: what the cache charges

    def _one(self, instruction: str) -> Prediction:
        assert self.features is not None, "set_image first"
        if self.fail_on is not None and self.fail_on in instruction:
            raise RuntimeError("fake model failure")
        if "too long" in instruction:
            raise PromptTooLongError("the prompt is 2000 tokens ... over the LM's context of 1024 tokens")
        h, w = self.features.shape
        if "absent" in instruction:
            return Prediction(
                text="Sorry, absent thing:[REJ].",
                masks=np.zeros((0, h, w), bool),
                scores=np.zeros(0, np.float32),
                iou_predictions=np.zeros(0, np.float32),
                targets=[Target("rej", "absent thing", None)],
            )
        dark = "dark" in instruction
        mask = self.features < self.features.mean() if dark else self.features >= self.features.mean()
        label = "dark part" if dark else "bright part"
        return Prediction(
            text=f"Sure, {label}:[SEG].",
            masks=mask[None],
            scores=np.array([0.75], np.float32),
            iou_predictions=np.array([0.5], np.float32),
            targets=[Target("seg", label, 0)],
        )

    def predict(self, instruction: str, history: Sequence[Any] | None = None) -> Prediction:
        with FakePredictor.lock:
            FakePredictor.predict_calls += 1
            FakePredictor.histories.append(list(history) if history else None)
        return self._one(instruction)

    def predict_batch(self, instructions: Sequence[str]) -> list[Prediction]:
        with FakePredictor.lock:
            FakePredictor.batch_calls.append(len(instructions))
        return [self._one(text) for text in instructions]


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but carries almost no data: a decompression
    bomb's signature, cheap to build."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def make_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A small RGB test picture: a bright square on a dark noisy background (HxWx3 uint8)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 220
    return img
