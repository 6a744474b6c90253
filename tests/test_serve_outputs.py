"""Result files shared by ``segment``, ``chat`` and the API: COCO RLE, mask PNGs, overlay, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reasonseg.inference.outputs import SegmentResult, TargetResult, decode_rle, encode_rle, write_result
from reasonseg.inference.predictor import Prediction, Target


def _prediction(h: int = 20, w: int = 30) -> Prediction:
    a = np.zeros((h, w), bool)
    a[2:6, 3:9] = True
    b = np.zeros((h, w), bool)
    b[10:, 20:] = True
    return Prediction(
        text="Sure, they are cup:[SEG], spoon:[REJ] and plate:[SEG].",
        masks=np.stack([a, b]),
        scores=np.array([0.9, 0.6], np.float32),
        iou_predictions=np.zeros(2, np.float32),
        targets=[Target("seg", "cup", 0), Target("rej", "spoon", None), Target("seg", "plate", 1)],
    )


def test_rle_matches_pycocotools_and_round_trips() -> None:
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = encode_rle(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(decode_rle(rle), mask)
    ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle["counts"].encode() == ref["counts"]
    assert int(mask_utils.area(ref)) == int(mask.sum())
    with pytest.raises(ValueError, match="HxW"):
        encode_rle(mask[None])


def test_targets_keep_answer_order_with_rejections() -> None:
    result = SegmentResult.from_prediction(
        _prediction(), "find the tableware", (20, 30), {"predict": 1.5}, "m"
    )
    assert [t.label for t in result.targets] == ["cup", "spoon", "plate"]
    assert [t.rejected for t in result.targets] == [False, True, False]
    assert result.targets[1].mask is None and result.targets[1].score is None
    assert result.targets[2].score == pytest.approx(0.6)
    out = result.to_json()
    assert out["rejections"] == [1]
    assert out["targets"][0]["bbox"] == [3, 2, 6, 4] and out["targets"][0]["area"] == 24
    assert result.masks.shape == (2, 20, 30) and result.mask_labels == ["cup", "plate"]
    assert "spoon: not in the image" in result.summary()


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match=r"expected \[2, 21, 30\]"):
        SegmentResult.from_prediction(_prediction(), "x", (21, 30))


def test_write_result_files(tmp_path: Path) -> None:
    image = np.full((20, 30, 3), 128, np.uint8)
    result = SegmentResult.from_prediction(
        _prediction(), "find the tableware", (20, 30), {"predict": 1.5}, "m"
    )
    files = write_result(tmp_path / "out", image, result, stem="turn01_")
    assert [p.name for p in files.masks] == ["turn01_mask_0.png", "turn01_mask_2.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(files.masks[1])) > 0, result.targets[2].mask)
    overlay = np.asarray(Image.open(files.overlay))
    assert overlay.shape == (20, 30, 3)
    assert not np.array_equal(overlay[3, 4], image[3, 4])  # masked pixel is tinted
    record = json.loads(files.json.read_text())
    assert record["answer"].startswith("Sure") and record["timings_ms"] == {"predict": 1.5}
    np.testing.assert_array_equal(decode_rle(record["targets"][2]["mask"]), result.targets[2].mask)
    assert record["files"]["masks"] == ["turn01_mask_0.png", "turn01_mask_2.png"]
    with pytest.raises(ValueError, match="image is"):
        write_result(tmp_path, image[:10], result)


def test_write_result_replaces_an_earlier_result_as_a_whole(tmp_path: Path) -> None:
    image = np.full((20, 30, 3), 128, np.uint8)
    two = SegmentResult.from_prediction(_prediction(), "find the tableware", (20, 30))
    write_result(tmp_path, image, two)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mask_7.png").write_bytes(b"a file of the user's, not listed by result.json")
    none = SegmentResult("nothing", "It is [REJ].", (20, 30), [TargetResult(0, None, True, None, None)])
    files = write_result(tmp_path, image, none)
    assert files.masks == []
    # The earlier result's masks are gone, so the folder holds one consistent result; other files stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mask_7.png",
        "notes.txt",
        "overlay.png",
        "result.json",
    ]
    assert json.loads(files.json.read_text())["answer"] == "It is [REJ]."


def test_a_failed_write_leaves_the_earlier_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.full((20, 30, 3), 128, np.uint8)
    first = SegmentResult.from_prediction(_prediction(), "find the tableware", (20, 30))
    write_result(tmp_path, image, first)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = Path.write_bytes
    calls = []

    def disk_full(self: Path, data: bytes) -> int:
        calls.append(self.name)
        if len(calls) == 3:  # the third file of the new result
            raise OSError(28, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    other = SegmentResult.from_prediction(_prediction(), "something else", (20, 30))
    with pytest.raises(OSError, match="No space left"):
        write_result(tmp_path, image, other)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary files either
