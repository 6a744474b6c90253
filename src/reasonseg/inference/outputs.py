"""Writing segmentation results: one format shared by ``reasonseg segment``, ``reasonseg chat`` and the API.

A result is the answer text plus one entry per target named in the answer, in the order of its ``[SEG]`` /
``[REJ]`` tokens: a label (``"name"`` of ``"name:[SEG]"`` when the answer gives one), whether it was rejected
(``[REJ]``: the target is not in the image, so no mask), a score and a binary mask at the original image
size. On disk (``write_result``):

- ``<stem>overlay.png``: the image with every mask drawn over it (``reasonseg.inference.visualize``);
- ``<stem>mask_<i>.png``: one 8-bit PNG per non-rejected target (255 inside, 0 outside);
- ``<stem>result.json``: instruction, answer, image size, targets with COCO RLE masks
  (``{"size": [H, W], "counts": str}`` as written by ``pycocotools.mask.encode``), bbox ``[x, y, w, h]``,
  area, score, rejection, and timings in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from reasonseg.inference.predictor import Prediction

__all__ = ["SegmentResult", "TargetResult", "WrittenFiles", "decode_rle", "encode_rle", "write_result"]


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding of an HxW binary mask: ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    if mask.ndim != 2:
        raise ValueError(f"encode_rle: expected an HxW mask, got shape {tuple(mask.shape)}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_rle`: an HxW bool mask."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    coded = {
        "size": list(rle["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    return mask_utils.decode(coded).astype(bool)


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class TargetResult:
    """One target of an answer: ``mask`` is HxW bool, ``None`` when the target was rejected ([REJ])."""

    index: int
    label: str | None
    rejected: bool
    score: float | None
    mask: np.ndarray | None

    def to_json(self, include_mask: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "label": self.label,
            "rejected": self.rejected,
            "score": None if self.score is None else round(float(self.score), 6),
        }
        if self.mask is not None:
            out["area"] = int(self.mask.sum())
            out["bbox"] = _bbox(self.mask)
            if include_mask:
                out["mask"] = encode_rle(self.mask)
        return out


@dataclass
class SegmentResult:
    """Everything one instruction produced, ready to print, save or send as JSON."""

    instruction: str
    answer: str
    image_hw: tuple[int, int]
    targets: list[TargetResult]
    timings_ms: dict[str, float] = field(default_factory=dict)
    model: str | None = None

    @classmethod
    def from_prediction(
        cls,
        prediction: Prediction,
        instruction: str,
        image_hw: tuple[int, int],
        timings_ms: dict[str, float] | None = None,
        model: str | None = None,
    ) -> SegmentResult:
        """Build from a :class:`reasonseg.inference.predictor.Prediction`: ``text``, ``masks`` bool [K,H,W]
        and ``scores`` [K] for the K ``[SEG]`` slots, ``targets`` for every slot in answer order (a ``[REJ]``
        slot has ``mask_index=None``). The masks are checked against ``image_hw``."""
        masks = _as_numpy(prediction.masks).astype(bool)
        scores = _as_numpy(prediction.scores).astype(np.float64).reshape(-1)
        n_seg = sum(t.kind == "seg" for t in prediction.targets)
        if masks.ndim != 3 or masks.shape[0] != n_seg or tuple(masks.shape[1:]) != tuple(image_hw):
            raise ValueError(
                f"prediction masks have shape {tuple(masks.shape)}; expected [{n_seg}, {image_hw[0]}, "
                f"{image_hw[1]}] (one per [SEG] target)"
            )
        if len(scores) != n_seg:
            raise ValueError(f"prediction has {n_seg} [SEG] targets but {len(scores)} scores")
        targets = []
        for i, t in enumerate(prediction.targets):
            rejected = t.kind != "seg" or t.mask_index is None
            targets.append(
                TargetResult(
                    index=i,
                    label=t.label or None,
                    rejected=rejected,
                    score=None if rejected else float(scores[t.mask_index]),
                    mask=None if rejected else masks[t.mask_index],
                )
            )
        return cls(instruction, prediction.text, (int(image_hw[0]), int(image_hw[1])), targets,
                   dict(timings_ms or {}), model)  # fmt: skip

    @property
    def masks(self) -> np.ndarray:
        """[K', H, W] bool: the masks of the non-rejected targets, in target order."""
        kept = [t.mask for t in self.targets if t.mask is not None]
        if not kept:
            return np.zeros((0, *self.image_hw), dtype=bool)
        return np.stack(kept)

    @property
    def mask_labels(self) -> list[str]:
        """One legend entry per row of :attr:`masks`."""
        return [t.label or f"target {t.index}" for t in self.targets if t.mask is not None]

    def overlay(self, image: np.ndarray) -> np.ndarray:
        """The image (HxWx3 uint8) with the masks drawn over it."""
        from reasonseg.inference.visualize import overlay_masks

        return overlay_masks(image, self.masks, self.mask_labels)

    def to_json(self, include_masks: bool = True) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "answer": self.answer,
            "image": {"height": self.image_hw[0], "width": self.image_hw[1]},
            "targets": [t.to_json(include_masks) for t in self.targets],
            "rejections": [t.index for t in self.targets if t.rejected],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "model": self.model,
        }

    def summary(self) -> str:
        """A few lines for a terminal: the answer, then one line per target."""
        lines = [self.answer]
        for t in self.targets:
            name = t.label or f"target {t.index}"
            if t.rejected:
                lines.append(f"  [{t.index}] {name}: not in the image")
            else:
                assert t.mask is not None
                lines.append(f"  [{t.index}] {name}: {int(t.mask.sum())} px, score {t.score:.3f}")
        return "\n".join(lines)


@dataclass
class WrittenFiles:
    """Paths written by :func:`write_result`."""

    overlay: Path
    masks: list[Path]
    json: Path


def write_result(
    out_dir: str | Path, image: np.ndarray, result: SegmentResult, stem: str = ""
) -> WrittenFiles:
    """Write the overlay PNG, one PNG per non-rejected mask and the JSON into ``out_dir`` (created).

    A result written before under the same ``stem`` is replaced as a whole: every file is first written
    under a temporary name and renamed only once all of them are complete, so a failure (a full disk,
    a read-only folder) leaves the earlier result as it was; afterwards the earlier result's mask PNGs
    that the new one does not have are removed (only files its ``result.json`` lists), so the folder
    never mixes two results.

    Args:
        out_dir: output directory.
        image: the image the masks belong to, HxWx3 uint8 RGB.
        result: what to write.
        stem: file name prefix, e.g. ``"turn01_"`` for the turns of a chat.

    Raises:
        ValueError: the image does not match the result.
        OSError: the directory or a file could not be written (nothing of the new result is left).
    """
    import io
    import os

    from PIL import Image

    if image.shape[:2] != result.image_hw:
        raise ValueError(f"image is {image.shape[:2]} but the result is for {result.image_hw}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    overlay_path = out / f"{stem}overlay.png"
    payloads = {overlay_path: png(result.overlay(image))}
    mask_paths: list[Path] = []
    for t in result.targets:
        if t.mask is not None:
            path = out / f"{stem}mask_{t.index}.png"
            payloads[path] = png(t.mask.astype(np.uint8) * 255)
            mask_paths.append(path)
    record = result.to_json(include_masks=True)
    record["files"] = {"overlay": overlay_path.name, "masks": [p.name for p in mask_paths]}
    json_path = out / f"{stem}result.json"
    payloads[json_path] = (json.dumps(record, indent=2) + "\n").encode()
    stale = [out / name for name in _listed_masks(json_path) if out / name not in payloads]

    temps: list[Path] = []
    try:
        for path, data in payloads.items():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temps.append(tmp)
            tmp.write_bytes(data)
        for tmp, path in zip(temps, payloads, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    for path in stale:
        path.unlink(missing_ok=True)
    return WrittenFiles(overlay_path, mask_paths, json_path)


def _listed_masks(json_path: Path) -> list[str]:
    """The mask file names an earlier ``result.json`` lists (none when it is absent or unreadable)."""
    try:
        masks = json.loads(json_path.read_text())["files"]["masks"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    # Plain names of this writer's own pattern only: never a path, never another file.
    return [
        m for m in masks if isinstance(m, str) and Path(m).name == m and "mask_" in m and m.endswith(".png")
    ]
