"""Image loading (bad and unusual inputs) and SAM pre/post-processing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reasonseg.data.transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    ImageError,
    SamTransform,
    load_image,
    postprocess_masks,
    preprocess_shape,
)


def _png(arr: np.ndarray, **save_kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save_kwargs)
    return buf.getvalue()


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)


def test_rgb_file_round_trip(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(_png(rgb))
    for src in (path, str(path), path.read_bytes(), Image.open(path), rgb):
        out = load_image(src)
        assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
        np.testing.assert_array_equal(out, rgb)


def test_non_image_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match=r"notes\.jpg.*not a recognised image format"):
        load_image(path)


def test_truncated_jpeg_is_a_clear_error(tmp_path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.kron(rgb, np.ones((8, 8, 1), dtype=np.uint8))).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg.*(truncated|corrupt)"):
        load_image(path)


def test_grayscale_becomes_three_equal_channels(rgb: np.ndarray) -> None:
    gray = rgb[..., 0]
    out = load_image(_png(gray))
    assert out.shape == (30, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    np.testing.assert_array_equal(load_image(gray[..., None]), out)  # HxWx1 array


def test_rgba_drops_alpha(rgb: np.ndarray) -> None:
    alpha = np.full((30, 40, 1), 7, dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    np.testing.assert_array_equal(load_image(_png(rgba)), rgb)
    np.testing.assert_array_equal(load_image(rgba), rgb)


def test_sixteen_bit_png_keeps_the_top_eight_bits() -> None:
    arr16 = (np.arange(30 * 40, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)
    assert arr16.max() > 255
    out = load_image(_png(arr16))
    expected = (arr16 >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    np.testing.assert_array_equal(load_image(arr16)[..., 1], expected)


def test_exif_orientation_is_applied(rgb: np.ndarray) -> None:
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    out = load_image(buf.getvalue())
    assert out.shape == (40, 30, 3)
    np.testing.assert_array_equal(out, np.rot90(rgb, k=-1))


def test_one_pixel_image_goes_through_the_sam_transform() -> None:
    one = np.array([[[10, 200, 30]]], dtype=np.uint8)
    img = load_image(_png(one))
    assert img.shape == (1, 1, 3)
    sample = SamTransform(64).prepare(img)
    assert (
        sample.pixels.shape == (3, 64, 64) and sample.resized_hw == (64, 64) and sample.original_hw == (1, 1)
    )
    expected = (torch.tensor([10.0, 200.0, 30.0]) - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    torch.testing.assert_close(sample.pixels[:, 5, 7], expected)
    logits = postprocess_masks(torch.randn(1, 1, 16, 16), sample.resized_hw, sample.original_hw, 64)
    assert logits.shape == (1, 1, 1, 1)


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_png(rgb))
    with pytest.raises(ImageError, match=r"big\.png: 40x30 = 1200 pixels exceeds the limit of 1000"):
        load_image(path, max_pixels=1000)
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(rgb, max_pixels=1000)
    assert load_image(path, max_pixels=1200).shape == (30, 40, 3)


@pytest.mark.parametrize(
    ("src", "message"),
    [
        (b"", "empty file"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "empty image"),
        (np.zeros((4, 5, 2), dtype=np.uint8), "expected HxW"),
        (np.full((4, 5), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((4, 5), dtype=np.complex64), "unsupported pixel type"),
        (12345, "cannot load an image from a int"),
    ],
)
def test_other_bad_inputs(src: object, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(src)  # type: ignore[arg-type]


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_float_bool_and_palette_inputs(rgb: np.ndarray) -> None:
    np.testing.assert_array_equal(load_image(rgb.astype(np.float32) / 255.0), rgb)
    np.testing.assert_array_equal(load_image(np.array([[True, False]]))[0, :, 0], [255, 0])
    pal = Image.fromarray(rgb).convert("P")
    assert load_image(pal).shape == (30, 40, 3)


def test_sam_transform_matches_the_reference_rule(rgb: np.ndarray) -> None:
    assert preprocess_shape(375, 500, 1024) == (768, 1024)
    assert preprocess_shape(1, 3, 1024) == (341, 1024)
    t = SamTransform(64)
    sample = t.prepare(rgb)  # 30x40 -> 48x64, padded to 64x64
    assert sample.resized_hw == (48, 64)
    assert torch.all(sample.pixels[:, 48:, :] == 0)
    resized = np.asarray(Image.fromarray(rgb).resize((64, 48), Image.Resampling.BILINEAR)).astype(np.float32)
    expected = (
        torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(PIXEL_MEAN)[:, None, None]
    ) / torch.tensor(PIXEL_STD)[:, None, None]
    torch.testing.assert_close(sample.pixels[:, :48], expected)
    coords = t.apply_coords(np.array([[40.0, 30.0]]), (30, 40))
    np.testing.assert_allclose(coords, [[64.0, 48.0]])
    boxes = t.apply_boxes(torch.tensor([[0.0, 0.0, 20.0, 15.0]]), (30, 40))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 32.0, 24.0]]))


def test_transform_rejects_non_rgb_arrays() -> None:
    with pytest.raises(ImageError, match="HxWx3 uint8"):
        SamTransform().prepare(np.zeros((4, 4), dtype=np.uint8))


def test_postprocess_masks_crops_the_padding() -> None:
    low = torch.full((1, 1, 16, 16), -1.0)
    low[..., :8, :4] = 1.0  # inside the content (resized 32x64 of a 64x64 input: rows 0..7 of 16)
    out = postprocess_masks(low, (32, 64), (10, 20), target_length=64)
    assert out.shape == (1, 1, 10, 20)
    mask = out[0, 0] > 0
    assert mask[:, :2].all() and not mask[:, 8:].any()


@pytest.mark.parametrize("resized_hw", [(768, 1024), (1024, 576), (1024, 1024), (683, 1024), (1, 1024)])
def test_postprocess_masks_upsamples_only_the_content_bit_identically(resized_hw: tuple[int, int]) -> None:
    """Upsampling only the low-res rows/columns under the content gives exactly the pixels of Meta's
    full 1024x1024 upsampling followed by the crop."""
    low = torch.randn(2, 1, 256, 256)
    full = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
    full = full[..., : resized_hw[0], : resized_hw[1]]
    expected = F.interpolate(full, (300, 400), mode="bilinear", align_corners=False)
    assert torch.equal(postprocess_masks(low, resized_hw, (300, 400), 1024), expected)
