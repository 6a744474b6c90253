"""Protocols on tiny datasets written here in the real on-disk formats (ReasonSeg labelme JSON, gRefCOCO)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reasonseg.evaluation.protocols import DataSpec, build_protocol, gsva_turns, lisa_turns
from reasonseg.evaluation.runner import RunConfig, run_evaluation
from reasonseg.evaluation.segmenter import EvalItem, EvalMode, SegmentResult


def write_reasonseg(root: Path, split: str = "val") -> Path:
    """Three images: a short query, a long query, and a short query with an ignore region."""
    d = root / split
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    specs = [
        (
            "a_short",
            ["the cat", "unused second query"],
            False,
            [("target", [[2, 2], [12, 2], [12, 10], [2, 10]])],
        ),
        (
            "b_long",
            ["Something you could sit on after a long day."],
            True,
            [("target", [[5, 5], [20, 5], [20, 15]])],
        ),
        (
            "c_ignore",
            ["the lamp"],
            False,
            [
                ("target", [[0, 0], [16, 0], [16, 16], [0, 16]]),
                ("ignore", [[4, 4], [8, 4], [8, 8], [4, 8]]),
                ("flag", [[0, 0], [1, 0], [1, 1]]),
            ],
        ),
    ]
    for name, texts, is_sentence, shapes in specs:
        Image.fromarray(rng.integers(0, 255, (18, 24, 3), dtype=np.uint8)).save(d / f"{name}.jpg", quality=95)
        anno = {
            "text": texts,
            "is_sentence": is_sentence,
            "shapes": [{"label": lb, "shape_type": "polygon", "points": pts} for lb, pts in shapes],
        }
        (d / f"{name}.json").write_text(json.dumps(anno))
    return root


def write_grefcoco(root: Path) -> Path:
    """Two images: image 1 has a two-object expression and a no-target one; image 2 one object."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for iid in (1, 2):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
            root / "images" / f"{iid}.png"
        )
    box = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]  # noqa: E731
    instances = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 30} for i in (1, 2)],
        "annotations": [
            {"id": 10, "image_id": 1, "segmentation": box(1, 1, 8, 8), "category_id": 1},
            {"id": 11, "image_id": 1, "segmentation": box(15, 5, 25, 15), "category_id": 1},
            {"id": 20, "image_id": 2, "segmentation": box(3, 3, 12, 9), "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    grefs = [
        {
            "ref_id": 0,
            "image_id": 1,
            "ann_id": [10, 11],
            "split": "val",
            "sentences": [{"sent": "Both Boxes."}],
        },
        {"ref_id": 1, "image_id": 1, "ann_id": [-1], "split": "val", "sentences": [{"sent": "the dog"}]},
        {"ref_id": 2, "image_id": 2, "ann_id": [20], "split": "val", "sentences": [{"sent": "left box"}]},
        {"ref_id": 3, "image_id": 2, "ann_id": [20], "split": "train", "sentences": [{"sent": "train only"}]},
    ]
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "grefs(unc).json").write_text(json.dumps(grefs))
    return root


def write_refcoco(root: Path) -> Path:
    """LISA's refer_seg layout: refcoco/refs(unc).p + instances.json, images under images/mscoco/images/train2014."""
    import pickle

    folder, images = root / "refcoco", root / "images" / "mscoco" / "images" / "train2014"
    folder.mkdir(parents=True)
    images.mkdir(parents=True)
    Image.fromarray(np.full((16, 20, 3), 128, np.uint8)).save(images / "COCO_1.jpg", quality=95)
    instances = {
        "images": [{"id": 1, "file_name": "COCO_1.jpg", "height": 16, "width": 20}],
        "annotations": [
            {"id": 5, "image_id": 1, "segmentation": [[0, 0, 10, 0, 10, 8, 0, 8]], "category_id": 1},
            {"id": 6, "image_id": 1, "segmentation": [[12, 4, 20, 4, 20, 16, 12, 16]], "category_id": 1},
        ],
    }
    refs = [
        {"ref_id": 7, "ann_id": 5, "image_id": 1, "split": "val",
         "sentences": [{"sent": "Top Left Box"}, {"sent": "the grey one"}]},
        {"ref_id": 8, "ann_id": 6, "image_id": 1, "split": "val", "sentences": [{"sent": "right box"}]},
        {"ref_id": 9, "ann_id": 6, "image_id": 1, "split": "testA", "sentences": [{"sent": "not in val"}]},
    ]  # fmt: skip
    (folder / "instances.json").write_text(json.dumps(instances))
    with open(folder / "refs(unc).p", "wb") as fh:
        pickle.dump(refs, fh, protocol=2)
    return folder


class OracleSegmenter:
    """Returns the ground truth (optionally wrong at chosen slots) with correct [REJ] decisions."""

    name = "oracle"

    def __init__(self, wrong: Sequence[tuple[str, int]] = ()) -> None:
        self.wrong = set(wrong)
        self.prompts: list[str] = []

    def segment(self, items: Sequence[EvalItem], mode: EvalMode) -> list[SegmentResult]:
        out = []
        for it in items:
            s = it.load()
            self.prompts.append(s.turns[0].text + " || " + s.turns[-1].text)
            masks = s.masks == 1
            rejected = [k == "rej" for k in s.target_kinds]
            for key, slot in self.wrong:
                if key == it.key:
                    masks[slot] = ~masks[slot]
                    rejected[slot] = not rejected[slot]
            out.append(SegmentResult(masks=masks, rejected=rejected))
        return out


def test_data_spec_parsing() -> None:
    s = DataSpec.parse("reasonseg:/data/Reason Seg:val")
    assert (s.dataset, s.root, s.split, s.split_by) == ("reasonseg", Path("/data/Reason Seg"), "val", None)
    r = DataSpec.parse("refcoco+:/d/refer_seg/refcoco+:unc:testA")
    assert (r.dataset, r.split_by, r.split) == ("refcoco+", "unc", "testA")
    assert str(r) == "refcoco+:/d/refer_seg/refcoco+:unc:testA"
    assert DataSpec.parse("grefcoco:/g:testB").split == "testB"
    # gRefCOCO-format worlds (reasonseg synth) have a plain "test" split
    assert DataSpec.parse("grefcoco:/w/refer_seg/grefcoco:test").split == "test"
    with pytest.raises(ValueError, match="splits"):
        DataSpec.parse("grefcoco:/g:dev")
    with pytest.raises(ValueError, match="splits"):
        DataSpec.parse("reasonseg:/x:dev")
    with pytest.raises(ValueError, match="split family"):
        DataSpec.parse("refcocog:/x:bogus:val")
    with pytest.raises(ValueError, match="unknown dataset"):
        DataSpec.parse("coco:/x:val")
    with pytest.raises(ValueError, match=r"unknown dataset 'bogus' \(known: reasonseg"):
        DataSpec.parse("bogus:foo")  # named even when the rest of the spec is malformed too
    with pytest.raises(ValueError, match="expected"):
        DataSpec.parse("reasonseg")


def test_published_prompts() -> None:
    short, long = lisa_turns("the cat", is_sentence=False), lisa_turns("Find it.", is_sentence=True)
    assert short[0].text == "<image>\n What is the cat in this image? Please output segmentation mask."
    assert long[0].text == "<image>\n Find it. Please output segmentation mask."
    assert short[1].text == long[1].text == "[SEG]."
    g = gsva_turns(["both boxes.", "the dog"], ["seg", "rej"])
    assert (
        g[0].text == "<image>\n What are both boxes, the dogin this image? Please output segmentation masks."
    )
    assert g[1].text == "Sure,both boxes:[SEG], the dog:[REJ]."


def test_reasonseg_protocol(tmp_path: Path) -> None:
    proto = build_protocol(f"reasonseg:{write_reasonseg(tmp_path / 'RS')}:val")
    assert proto.name == "reasonseg/val" and not proto.rules.rejection
    assert [(it.key, it.group, it.query) for it in proto.items] == [
        ("a_short", "short", "the cat"),
        ("b_long", "long", "Something you could sit on after a long day."),
        ("c_ignore", "short", "the lamp"),
    ]
    s = proto.items[2].load()
    assert s.turns[1].text == "[SEG]." and s.masks.shape == (1, 18, 24)
    assert s.ignore is not None and s.ignore[5, 5] and s.masks[0, 5, 5] == 0 and s.masks[0, 1, 1] == 1

    seg = OracleSegmenter(wrong=[("b_long", 0)])  # the long query is answered with the complement
    res = run_evaluation(
        seg,
        proto.items,
        proto.rules,
        RunConfig(tmp_path / "out", "teacher-forced", progress=False),
        groups=proto.groups,
    )
    m = res.summary["metrics"]
    assert m["short"]["giou"] == pytest.approx(1.0, abs=1e-6) and m["short"]["n_samples"] == 2
    assert m["long"]["giou"] == 0.0 and m["long"]["ciou"] == 0.0
    assert m["overall"]["giou"] == pytest.approx(m["short"]["giou"] * 2 / 3, abs=1e-12)
    assert "What is the cat in this image?" in seg.prompts[0]


def test_grefcoco_protocol_groups_expressions_per_image(tmp_path: Path) -> None:
    proto = build_protocol(f"grefcoco:{write_grefcoco(tmp_path / 'G')}:val")
    assert proto.rules.rejection and [it.key for it in proto.items] == ["1", "2"]
    s = proto.items[0].load()
    assert s.target_kinds == ["seg", "rej"] and s.masks.shape == (2, 20, 30)
    # both boxes merged (pycocotools fills [x0, x1) x [y0, y1)); the no-target expression is empty
    assert s.masks[0].sum() == 7 * 7 + 10 * 10 and s.masks[1].sum() == 0
    assert s.turns[1].text == "Sure,both boxes:[SEG], the dog:[REJ]."

    seg = OracleSegmenter(wrong=[("1", 1)])  # the no-target expression is not rejected and gets a mask
    res = run_evaluation(
        seg, proto.items, proto.rules, RunConfig(tmp_path / "out", "teacher-forced", progress=False)
    )
    m = res.summary["metrics"]["overall"]
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (0, 1, 2, 0)
    assert m["n_acc"] == 0.0 and m["t_acc"] == 1.0
    assert m["giou"] == pytest.approx(2 / 3, abs=1e-6)
    # the wrongly kept slot predicted the whole image: its area inflates the union sum
    assert m["union"] == (7 * 7 + 10 * 10) + 20 * 30 + 9 * 6
    assert m["ciou"] == pytest.approx(m["intersection"] / m["union"], abs=1e-12)


def test_refcoco_protocol_one_item_per_sentence(tmp_path: Path) -> None:
    proto = build_protocol(f"refcoco:{write_refcoco(tmp_path / 'refer_seg')}:unc:val")
    assert proto.name == "refcoco(unc)/val" and not proto.rules.rejection
    assert [(it.key, it.query) for it in proto.items] == [
        ("7-0", "top left box"),
        ("7-1", "the grey one"),
        ("8-0", "right box"),
    ]
    s = proto.items[0].load()
    assert s.turns[0].text == "<image>\n What is top left box in this image? Please output segmentation mask."
    assert s.turns[1].text == "[SEG]." and s.masks.shape == (1, 16, 20) and s.masks[0].sum() == 10 * 8
    seg = OracleSegmenter(wrong=[("8-0", 0)])
    res = run_evaluation(
        seg, proto.items, proto.rules, RunConfig(tmp_path / "out", "teacher-forced", progress=False)
    )
    m = res.summary["metrics"]["overall"]
    # two perfect sentences (I = U = 80), one complement prediction (I = 0, U = 320): cIoU is a ratio of sums
    assert m["giou"] == pytest.approx(2 / 3, abs=1e-6)
    assert (m["intersection"], m["union"]) == (160, 160 + 16 * 20)
