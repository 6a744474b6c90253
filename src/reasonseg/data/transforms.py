"""Image loading and SAM's pre/post-processing, in one place.

- :func:`load_image`: any image source -> HxWx3 uint8 RGB with EXIF orientation applied; anything that
  is not a usable image raises :class:`ImageError` naming the source and the problem.
- :class:`SamTransform`: resize the longest side to ``target_length`` (new side = int(old*scale + 0.5),
  PIL bilinear), normalise with SAM's mean/std on the 0-255 scale, zero-pad bottom/right to a square.
- :func:`postprocess_masks`: low-res logits -> upsample to the padded square (bilinear), crop the
  padding, resize (bilinear) to the original size. Threshold the result at 0 to get masks.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from struct import error as struct_error  # PIL raises it on some malformed headers

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "ImageError",
    "SamInput",
    "SamTransform",
    "load_image",
    "postprocess_masks",
    "preprocess_shape",
]

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

ImageSource = str | Path | bytes | Image.Image | np.ndarray


class ImageError(ValueError):
    """The input is not an image we can use (unreadable, truncated, empty, too large, odd array)."""


def _describe(src: ImageSource) -> str:
    if isinstance(src, str | Path):
        return str(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {src.shape} {src.dtype}>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.size}>"
    return f"<{type(src).__name__}>"


def load_image(src: ImageSource, *, max_pixels: int = 64_000_000) -> np.ndarray:
    """Load an image as HxWx3 uint8 RGB.

    Args:
        src: a path, encoded bytes, a PIL image, or an array (HxW, HxWx1, HxWx3 or HxWx4; uint8, uint16,
            bool or float in [0, 1] or [0, 255]).
        max_pixels: images with more pixels than this are refused before decoding.
    Returns:
        HxWx3 uint8 RGB. EXIF orientation is applied; alpha is dropped; 16-bit data keeps its top 8 bits;
        grayscale is replicated to three channels.
    Raises:
        ImageError: naming the source and the reason.
    """
    name = _describe(src)
    if isinstance(src, np.ndarray):
        return _from_array(src, name, max_pixels)
    if isinstance(src, Image.Image):
        return _from_pil(src, name, max_pixels)
    if isinstance(src, str | Path):
        path = Path(src)
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if not path.is_file():
            raise ImageError(f"{name}: not a file")
        data = path.read_bytes()
    elif isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
    else:
        raise ImageError(f"cannot load an image from a {type(src).__name__}")
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: image too large ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: cannot read image ({exc})") from None
    return _from_pil(img, name, max_pixels)


def _check_size(w: int, h: int, name: str, max_pixels: int) -> None:
    if w < 1 or h < 1:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (max_pixels)")


def _from_pil(img: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    _check_size(img.width, img.height, name, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img) or img
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: image too large ({exc})") from None
    except (OSError, ValueError, SyntaxError, struct_error) as exc:
        raise ImageError(f"{name}: corrupt or truncated image data ({exc})") from None
    _check_size(img.width, img.height, name, max_pixels)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _from_array(np.asarray(img), name, max_pixels, sixteen_bit=mode.startswith("I"))
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    # L, LA, 1, P, RGBA, CMYK, YCbCr, LAB, HSV: PIL's conversion to RGB (alpha is dropped).
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: cannot convert mode {mode} to RGB ({exc})") from None


def _from_array(arr: np.ndarray, name: str, max_pixels: int, sixteen_bit: bool = False) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    _check_size(arr.shape[1], arr.shape[0], name, max_pixels)
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16 or (sixteen_bit and np.issubdtype(arr.dtype, np.integer)):
        # 16-bit data: keep the top 8 bits (x >> 8), the same rounding as PIL's 16->8 bit conversion.
        wide = arr.astype(np.int64)
        if arr.dtype != np.uint16 and wide.max(initial=0) <= 255:
            out = np.clip(wide, 0, 255).astype(np.uint8)  # 32-bit container holding 8-bit values
        else:
            out = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: float image contains NaN or infinity")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        out = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        out = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported pixel type {arr.dtype}")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    elif out.shape[2] == 4:
        out = out[..., :3]
    return np.ascontiguousarray(out)


def preprocess_shape(h: int, w: int, target_length: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to ``target_length``: int(side * scale + 0.5)."""
    scale = target_length / max(h, w)
    # At least 1 px: an image over 2048 times longer than wide would otherwise round its short side to 0.
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


@dataclass
class SamInput:
    """One image ready for SAM.

    pixels: float32 [3, L, L], normalised, zero-padded bottom/right.
    resized_hw: (h, w) of the image content inside ``pixels``; original_hw: (H, W) of the source image.
    """

    pixels: torch.Tensor
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]


class SamTransform:
    """SAM's input transform for a square input of side ``target_length`` (1024 for the real models)."""

    def __init__(self, target_length: int = 1024) -> None:
        if target_length <= 0:
            raise ValueError(f"SamTransform: target_length must be positive, got {target_length}")
        self.target_length = target_length
        self._mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        self._std = torch.tensor(PIXEL_STD).view(3, 1, 1)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> hxwx3 uint8 with the longest side = target_length (PIL bilinear)."""
        h, w = image.shape[:2]
        nh, nw = preprocess_shape(h, w, self.target_length)
        return np.array(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))

    def prepare(self, image: np.ndarray) -> SamInput:
        """HxWx3 uint8 RGB (see :func:`load_image`) -> :class:`SamInput`."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageError(f"SamTransform.prepare: expected HxWx3 uint8, got {image.shape} {image.dtype}")
        resized = self.resize(image)
        h, w = resized.shape[:2]
        # Written in place into the zero-padded square: one pass instead of four temporaries.
        x = torch.zeros(3, self.target_length, self.target_length)
        content = x[:, :h, :w]
        content.copy_(torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1))
        content.sub_(self._mean).div_(self._std)
        return SamInput(pixels=x, resized_hw=(h, w), original_hw=(image.shape[0], image.shape[1]))

    def apply_coords(
        self, coords: np.ndarray | torch.Tensor, original_hw: tuple[int, int]
    ) -> np.ndarray | torch.Tensor:
        """[..., 2] pixel coordinates (x, y) in the original image -> the model's input frame (float)."""
        oh, ow = original_hw
        nh, nw = preprocess_shape(oh, ow, self.target_length)
        scale = (nw / ow, nh / oh)
        if isinstance(coords, torch.Tensor):
            return coords.float() * coords.new_tensor(scale, dtype=torch.float32)
        return np.asarray(coords, dtype=np.float64) * np.asarray(scale)

    def apply_boxes(
        self, boxes: np.ndarray | torch.Tensor, original_hw: tuple[int, int]
    ) -> np.ndarray | torch.Tensor:
        """[..., 4] boxes (x0, y0, x1, y1) in the original image -> the model's input frame."""
        shape = tuple(boxes.shape)
        out = self.apply_coords(boxes.reshape(-1, 2, 2), original_hw)
        return out.reshape(shape)


def postprocess_masks(
    low_res_logits: torch.Tensor,
    resized_hw: tuple[int, int],
    original_hw: tuple[int, int],
    target_length: int = 1024,
) -> torch.Tensor:
    """Decoder logits -> logits at the original image size.

    Args:
        low_res_logits: [N, C, l, l] (l = target_length / 4, i.e. 256).
        resized_hw: image content size inside the padded input; original_hw: (H, W) of the source.
    Returns:
        [N, C, H, W] float32 logits (upsampled in float32 whatever the model's dtype, so a bf16 model's
        mask borders are not rounded twice); ``> 0`` gives the masks.
    """
    x = low_res_logits.float()
    rh, rw = resized_hw
    lh, lw = x.shape[-2:]
    if lh == lw and target_length % lw == 0:
        # Only the low-res rows/columns under the kept content (+1 for the bilinear neighbour) are
        # upsampled: with the same integer scale the kept pixels are bit-identical to upsampling the
        # whole map and cropping, and a 4:3 photo skips a quarter of the work.
        s = target_length // lw
        x = x[..., : min(lh, -(-rh // s) + 1), : min(lw, -(-rw // s) + 1)]
        x = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(x, (target_length, target_length), mode="bilinear", align_corners=False)
    x = x[..., :rh, :rw]
    return F.interpolate(x, tuple(original_hw), mode="bilinear", align_corners=False)
