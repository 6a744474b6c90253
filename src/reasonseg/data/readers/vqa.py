"""LLaVA-Instruct visual question answering (no masks), as LISA mixes it in.

On disk: one JSON list ``[{"id", "image": "000000123.jpg", "conversations": [{"from": "human"|"gpt",
"value": str}, ...]}, ...]`` and the COCO train2017 images under ``image_root``. The first human turn
carries the ``<image>`` placeholder (added at the front when a record lacks it); a record with more than
one, or one in a later turn, is malformed (the model takes one image, before the first question). Every
record's structure is checked when the file is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reasonseg.data.readers.base import Reader, ReadMode, read_json, require
from reasonseg.data.samples import DataError, Sample, Turn, image_size
from reasonseg.data.templates import IMAGE_TOKEN, REJ_TOKEN, SEG_TOKEN

ROLES = {"human": "user", "gpt": "assistant"}


class LlavaInstructReader(Reader):
    """LLaVA-Instruct reader -> ``kind="vqa"`` samples with zero masks."""

    source = "llava_instruct"

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path,
        *,
        mode: ReadMode = "train",
        seed: int = 0,
        skip_malformed: bool = False,
    ) -> None:
        super().__init__(mode=mode, seed=seed, skip_malformed=skip_malformed)
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        records = read_json(self.json_path)
        if not isinstance(records, list):
            raise DataError(self.json_path, "expected a JSON list of conversations")
        self.records: list[Any] = records
        self.check_records()

    def __len__(self) -> int:
        return len(self.records)

    def _check(self, index: int) -> None:
        self._turns(index)

    def _turns(self, index: int) -> tuple[str, list[Turn]]:
        """(image file name, turns) of record ``index``; DataError naming the file and the record."""
        rec = self.records[index]
        rid = rec.get("id") if isinstance(rec, dict) else None
        where = f"{self.json_path} [record {index}" + (f", id {rid!r}]" if rid is not None else "]")
        image = require(rec, "image", str, where)
        convs = require(rec, "conversations", list, where)
        if not convs:
            raise DataError(where, "empty 'conversations'")
        turns: list[Turn] = []
        for j, c in enumerate(convs):
            who = require(c, "from", str, where)
            value = require(c, "value", str, where)
            if who not in ROLES:
                raise DataError(where, f"conversations[{j}]: 'from' must be human or gpt, got {who!r}")
            expected = "user" if j % 2 == 0 else "assistant"
            if ROLES[who] != expected:
                raise DataError(
                    where, f"conversations[{j}]: turns must alternate human/gpt, starting with human"
                )
            if SEG_TOKEN in value or REJ_TOKEN in value:
                raise DataError(where, f"conversations[{j}]: contains a segmentation token")
            n_images = value.count(IMAGE_TOKEN)
            if n_images > (1 if j == 0 else 0):
                raise DataError(
                    where,
                    f"conversations[{j}]: {n_images} {IMAGE_TOKEN} placeholder(s); a conversation may hold "
                    "one, in its first (human) turn",
                )
            turns.append(Turn(expected, value))
        if IMAGE_TOKEN not in turns[0].text:
            turns[0] = Turn("user", f"{IMAGE_TOKEN}\n{turns[0].text}")
        return image, turns

    def _load(self, index: int, rng: np.random.Generator | None) -> Sample:
        image, turns = self._turns(index)
        rec = self.records[index]
        path = self.image_root / image
        hw = image_size(path)
        return Sample(
            image=path,
            image_id=f"coco/{Path(image).stem}",
            turns=turns,
            masks=np.zeros((0, *hw), dtype=np.uint8),
            kind="vqa",
            source=self.source,
            meta={"id": rec.get("id")},
        )
