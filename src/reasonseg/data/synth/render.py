"""Colour-emoji rendering with exact alpha masks (Pillow + Noto Color Emoji).

Noto Color Emoji is a bitmap (CBDT) font: Pillow renders it at its one strike size, 109, with
``embedded_color=True``. Each glyph is rendered once, cropped to its alpha bounding box and cached;
:func:`paste` scales it, composites it over a background with its own alpha, and returns the exact
object mask (alpha >= 128 after scaling).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_PACKAGE = "fonts-noto-color-emoji"
DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the only strike size of the CBDT bitmap font
ALPHA_THRESHOLD = 128  # a pixel belongs to the object when its alpha is at least half


class EmojiFontMissing(RuntimeError):
    """The colour-emoji font is not installed."""


def font_path() -> Path:
    """The emoji font file (``$REASONSEG_EMOJI_FONT`` overrides the Debian path)."""
    return Path(os.environ.get("REASONSEG_EMOJI_FONT", str(DEFAULT_FONT)))


@cache
def load_font() -> ImageFont.FreeTypeFont:
    path = font_path()
    if not path.is_file():
        raise EmojiFontMissing(
            f"colour-emoji font not found at {path}: install the Debian package {FONT_PACKAGE} "
            f"(apt-get install -y {FONT_PACKAGE}) or point REASONSEG_EMOJI_FONT at NotoColorEmoji.ttf"
        )
    return ImageFont.truetype(str(path), FONT_SIZE)


@cache
def render_glyph(emoji: str) -> np.ndarray:
    """The glyph as RGBA uint8 [h,w,4], cropped to its alpha bounding box. Cached per emoji."""
    font = load_font()
    canvas = Image.new("RGBA", (FONT_SIZE * 2, FONT_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((FONT_SIZE // 4, FONT_SIZE // 4), emoji, font=font, embedded_color=True)
    rgba = np.asarray(canvas)
    ys, xs = np.nonzero(rgba[..., 3] >= ALPHA_THRESHOLD)
    if len(ys) == 0:
        raise ValueError(f"emoji {emoji!r} rendered empty with {font_path()}")
    return np.ascontiguousarray(rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


@cache
def missing_glyph_signature() -> bytes:
    """Bytes of the font's 'no glyph' rendering (a private-use code point), to detect unsupported emoji."""
    try:
        return render_glyph("\ue000").tobytes()
    except ValueError:
        return b""


def scaled_glyph(emoji: str, longest_side: int, flip: bool = False) -> np.ndarray:
    """The glyph resized so its longest side is ``longest_side`` px -> RGBA uint8 [h,w,4].

    Resized in premultiplied alpha so transparent pixels do not bleed dark fringes.
    """
    if longest_side < 4:
        raise ValueError(f"longest_side must be >= 4 px, got {longest_side}")
    g = render_glyph(emoji)
    h, w = g.shape[:2]
    s = longest_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    im = Image.fromarray(g, "RGBA").convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def paste(canvas: np.ndarray, glyph: np.ndarray, x: int, y: int) -> np.ndarray:
    """Composite RGBA ``glyph`` onto float32 RGB ``canvas`` [H,W,3] (in place) with its top-left at (x, y).

    Returns the object's exact mask, bool [H,W] (alpha >= 128). The glyph must lie inside the canvas.
    """
    gh, gw = glyph.shape[:2]
    H, W = canvas.shape[:2]
    if x < 0 or y < 0 or x + gw > W or y + gh > H:
        raise ValueError(f"glyph {gw}x{gh} at ({x},{y}) does not fit a {W}x{H} canvas")
    alpha = glyph[..., 3:4].astype(np.float32) / 255.0
    region = canvas[y : y + gh, x : x + gw]
    region *= 1.0 - alpha
    region += glyph[..., :3].astype(np.float32) * alpha
    mask = np.zeros((H, W), dtype=bool)
    mask[y : y + gh, x : x + gw] = glyph[..., 3] >= ALPHA_THRESHOLD
    return mask


def colour_fractions(rgba: np.ndarray) -> dict[str, float]:
    """Fraction of the glyph's opaque pixels per basic colour word (HSV rules), largest first.

    Used to keep the knowledge table's colour column honest about how Noto actually draws each kind.
    """
    px = rgba[..., :3][rgba[..., 3] >= ALPHA_THRESHOLD].astype(np.float32) / 255.0
    if len(px) == 0:
        return {}
    mx, mn = px.max(1), px.min(1)
    v = mx
    s = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    r, g, b = px.T
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) / 6.0
    names = np.empty(len(px), dtype=object)
    hue = h * 360
    names[:] = "red"
    names[(hue >= 20) & (hue < 42)] = "orange"
    names[(hue >= 12) & (hue < 50) & (v < 0.72)] = "brown"
    names[(hue >= 42) & (hue < 70) & (v >= 0.72)] = "yellow"
    names[(hue >= 70) & (hue < 165)] = "green"
    names[(hue >= 165) & (hue < 255)] = "blue"
    names[(hue >= 255) & (hue < 310)] = "purple"
    names[(hue >= 310) & (hue < 345)] = "pink"
    grey = s < 0.2
    names[grey] = np.where(v[grey] > 0.8, "white", "gray")
    names[v < 0.22] = "black"
    words, counts = np.unique(names.astype(str), return_counts=True)
    order = np.argsort(-counts)
    return {str(words[i]): float(counts[i] / len(px)) for i in order}


def dominant_colour(rgba: np.ndarray, min_fraction: float = 0.5) -> str | None:
    """The colour word covering at least ``min_fraction`` of the glyph, else None (a mixed-colour object)."""
    fr = colour_fractions(rgba)
    if not fr:
        return None
    word, f = next(iter(fr.items()))
    return word if f >= min_fraction else None
