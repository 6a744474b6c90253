"""Drawing masks over images, and masks as PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["PALETTE", "mask_to_png", "overlay_masks"]

# Distinct, colour-blind-friendly-ish colours (RGB), cycled over masks.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (a one-pixel outline)."""
    pad = np.pad(mask, 1)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return mask & ~inner


def overlay_masks(
    image: np.ndarray, masks: np.ndarray, labels: list[str] | None = None, alpha: float = 0.5
) -> np.ndarray:
    """Blend coloured masks (with outlines and optional text labels) over an image.

    Args:
        image: HxWx3 uint8 RGB.
        masks: [K, H, W] bool (or [H, W] for one mask).
        labels: one string per mask, drawn at the mask's top-left corner, or None.
        alpha: mask opacity in [0, 1].
    Returns:
        HxWx3 uint8 RGB.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"overlay_masks: image must be HxWx3 uint8, got {image.shape} {image.dtype}")
    masks = np.asarray(masks).astype(bool)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"overlay_masks: masks must be [K, {image.shape[0]}, {image.shape[1]}], got {masks.shape}"
        )
    if labels is not None and len(labels) != len(masks):
        raise ValueError(f"overlay_masks: {len(labels)} labels for {len(masks)} masks")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay_masks: alpha must be in [0, 1], got {alpha}")
    out = image.astype(np.float32)
    for k, m in enumerate(masks):
        colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
        out[_boundary(m)] = colour
    result = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if labels:
        pil = Image.fromarray(result)
        draw = ImageDraw.Draw(pil)
        for k, (m, text) in enumerate(zip(masks, labels, strict=True)):
            if not text or not m.any():
                continue
            ys, xs = np.nonzero(m)
            x, y = int(xs.min()), int(ys.min())
            left, top, right, bottom = draw.textbbox((x, y), text)
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=PALETTE[k % len(PALETTE)])
            draw.text((x, y), text, fill=(255, 255, 255))
        result = np.asarray(pil).copy()
    return result


def mask_to_png(mask: np.ndarray) -> bytes:
    """One [H, W] mask (bool, or numbers where > 0 means inside) -> 8-bit grayscale PNG bytes (0 / 255)."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"mask_to_png: expected an [H, W] mask, got shape {mask.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
