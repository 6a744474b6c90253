"""Readers on tiny fixtures written here in each dataset's exact on-disk format, plus malformed inputs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from reasonseg.data.readers import SkippedRecordsWarning, build_reader
from reasonseg.data.readers.grefer import GRefCocoReader
from reasonseg.data.readers.reasonseg import ReasonSegReader
from reasonseg.data.readers.refer import RefCocoReader
from reasonseg.data.readers.semseg import (
    ADE20K_CLASSES,
    COCOSTUFF_CLASSES,
    ade20k,
    cocostuff,
    mapillary,
    paco_lvis,
    part_name,
)
from reasonseg.data.readers.vqa import LlavaInstructReader
from reasonseg.data.samples import DataError
from reasonseg.data.templates import count_slots


def write_image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
    return path


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def shape(label: str, points: list[list[float]]) -> dict:
    return {
        "label": label,
        "labels": [label],
        "shape_type": "polygon",
        "image_name": "x.jpg",
        "points": points,
        "group_id": None,
        "group_ids": [None],
        "flags": {},
    }


# -- ReasonSeg --------------------------------------------------------------------------------------


def write_reasonseg(root: Path) -> Path:
    """train/: a.jpg (target with an ignore hole and a flag), b.jpg (small target inside a big ignore)."""
    tr = root / "train"
    write_image(tr / "a.jpg", 40, 60)
    (tr / "a.json").write_text(
        json.dumps(
            {
                "text": ["What could hold my tea?", "Which thing holds hot drinks?"],
                "is_sentence": True,
                "shapes": [
                    shape("target", rect(10, 5, 40, 30)),
                    shape("ignore", rect(20, 10, 25, 15)),  # smaller: painted after the target
                    shape("flag", rect(0, 0, 59, 39)),  # skipped
                ],
            }
        )
    )
    write_image(tr / "b.jpg", 30, 30, seed=1)
    (tr / "b.json").write_text(
        json.dumps(
            {
                "text": ["cup"],
                "is_sentence": False,
                "shapes": [shape("ignore", rect(0, 0, 29, 29)), shape("target", rect(5, 5, 9, 9))],
            }
        )
    )
    (root / "explanatory").mkdir()
    (root / "explanatory" / "train.json").write_text(
        json.dumps([{"image": "a.jpg", "query": "What could hold my tea?", "outputs": "A mug holds tea."}])
    )
    return root


def test_reasonseg_labels_ignore_flag_and_order(tmp_path: Path) -> None:
    reader = ReasonSegReader(write_reasonseg(tmp_path / "ReasonSeg"), "train", mode="eval")
    assert len(reader) == 2
    a, b = reader[0], reader[1]
    assert a.masks.shape == (1, 40, 60) and a.kind == "reasoning"
    # target rectangle x 10..40, y 5..30 inclusive, minus the ignore square x 20..25, y 10..15
    assert a.masks[0, 5:31, 10:41].sum() == 26 * 31 - 6 * 6
    assert a.ignore is not None and a.ignore[10:16, 20:26].all() and a.ignore.sum() == 36
    assert a.masks[0][a.ignore].sum() == 0
    assert a.masks[0, :, :10].sum() == 0  # the flag polygon covers everything but adds nothing
    # eval mode: first text, long template, first answer
    assert a.turns[0].text == "<image>\nWhat could hold my tea? Please respond with segmentation mask."
    assert a.turns[1].text == "It is [SEG]."
    # b: the small target is painted after the larger ignore region, so it survives
    assert b.masks[0, 5:10, 5:10].all() and b.masks.sum() == 25
    assert b.ignore is not None and b.ignore.sum() == 900 - 25
    assert b.turns[0].text == "<image>\nCan you segment the cup in this image?"


def test_reasonseg_train_mode_is_seeded_and_uses_explanations(tmp_path: Path) -> None:
    root = write_reasonseg(tmp_path / "ReasonSeg")
    r1 = ReasonSegReader(root, "train", explanatory_rate=1.0, seed=5)
    s = r1.get(0)
    assert s is not None and s.turns[1].text.endswith("A mug holds tea.") and s.meta["explanatory"]
    assert s.turns[0].text.startswith("<image>\nWhat could hold my tea? Please output segmentation mask and")
    r2 = ReasonSegReader(root, "train", explanatory_rate=0.0, seed=5)
    texts = {r2.get(0, epoch=e).turns[0].text for e in range(20)}  # type: ignore[union-attr]
    assert len(texts) > 1  # random text + template per epoch
    assert (
        r2.get(0, epoch=3).turns
        == ReasonSegReader(root, "train", explanatory_rate=0.0, seed=5).get(0, epoch=3).turns
    )  # type: ignore[union-attr]


# -- COCO-style fixtures ------------------------------------------------------------------------------


def coco_instances(path: Path, images: list[tuple[int, str, int, int]], anns: list[dict]) -> None:
    cats = [{"id": 1, "name": "cup", "supercategory": "kitchen"}, {"id": 2, "name": "mug:handle"}]
    path.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w in images],
                "annotations": anns,
                "categories": cats,
            }
        )
    )


def poly_ann(aid: int, iid: int, x0: int, y0: int, x1: int, y1: int, cat: int = 1) -> dict:
    return {
        "id": aid,
        "image_id": iid,
        "category_id": cat,
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "area": float((x1 - x0) * (y1 - y0)),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "iscrowd": 0,
    }


def rle_ann(aid: int, iid: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": aid,
        "image_id": iid,
        "category_id": 1,
        "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")},
        "area": int(mask.sum()),
        "bbox": [0, 0, 1, 1],
        "iscrowd": 0,
    }


def write_grefcoco(root: Path) -> tuple[Path, Path, np.ndarray]:
    images = root / "images"
    write_image(images / "COCO_train2014_000000000001.jpg", 32, 48)
    rle_mask = np.zeros((32, 48), bool)
    rle_mask[20:30, 30:45] = True
    g = root / "grefcoco"
    g.mkdir(parents=True)
    coco_instances(
        g / "instances.json",
        [(1, "COCO_train2014_000000000001.jpg", 32, 48)],
        [poly_ann(10, 1, 2, 2, 10, 10), rle_ann(11, 1, rle_mask)],
    )
    refs = [
        {"ref_id": 1, "image_id": 1, "ann_id": [10, 11], "split": "val", "no_target": False,
         "sentences": [{"sent": "both cups", "sent_id": 1}, {"sent": "the two cups", "sent_id": 2}]},
        {"ref_id": 2, "image_id": 1, "ann_id": [-1], "split": "val", "no_target": True,
         "sentences": [{"sent": "the giraffe", "sent_id": 3}]},
        {"ref_id": 3, "image_id": 1, "ann_id": [11], "split": "train", "no_target": False,
         "sentences": [{"sent": "What holds tea?", "sent_id": 4}]},
    ]  # fmt: skip
    (g / "grefs(unc).json").write_text(json.dumps(refs))
    return g, images, rle_mask


def test_grefcoco_multi_target_no_target_and_merge(tmp_path: Path) -> None:
    g, images, rle_mask = write_grefcoco(tmp_path)
    reader = GRefCocoReader(g, images, "val", mode="eval")
    assert len(reader) == 3  # eval: one item per sentence
    multi, _, none = reader[0], reader[1], reader[2]
    assert multi.masks.shape == (2, 32, 48) and multi.target_kinds == ["seg", "seg"]
    assert multi.masks[0, 2:10, 2:10].all() and multi.masks[0].sum() == 64  # COCO polygons: pixel areas
    assert np.array_equal(multi.masks[1].astype(bool), rle_mask)
    assert count_slots(multi.turns[1].text) == 2 and "[SEG] and [SEG]" in multi.turns[1].text
    assert none.target_kinds == ["rej"] and none.masks.shape == (1, 32, 48) and none.masks.sum() == 0
    assert "[REJ]" in none.turns[1].text and "[SEG]" not in none.turns[1].text
    merged = GRefCocoReader(g, images, "val", per_instance=False, mode="eval")[0]
    assert merged.masks.shape == (1, 32, 48) and merged.masks.sum() == 64 + rle_mask.sum()
    sentence = GRefCocoReader(g, images, "train", mode="eval")[0]
    assert sentence.turns[0].text.endswith("What holds tea? Please respond with segmentation mask.")


def test_refcoco_pickle_and_instances(tmp_path: Path) -> None:
    root = tmp_path / "refer_seg" / "refcoco"
    root.mkdir(parents=True)
    images = tmp_path / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    write_image(images / "COCO_train2014_000000000007.jpg", 20, 30)
    coco_instances(
        root / "instances.json",
        [(7, "COCO_train2014_000000000007.jpg", 20, 30)],
        [poly_ann(70, 7, 3, 4, 12, 15)],
    )
    refs = [
        {"ref_id": 0, "ann_id": 70, "image_id": 7, "split": "testA", "category_id": 1,
         "sentences": [{"sent": "left cup", "raw": "Left cup", "tokens": ["left", "cup"], "sent_id": 0},
                       {"sent": "the cup", "raw": "the cup", "tokens": ["the", "cup"], "sent_id": 1}]},
        {"ref_id": 1, "ann_id": 70, "image_id": 7, "split": "train", "category_id": 1,
         "sentences": [{"sent": "cup", "sent_id": 2}]},
    ]  # fmt: skip
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    reader = build_reader("refcoco", root, split="testA", mode="eval")
    assert isinstance(reader, RefCocoReader) and len(reader) == 2
    s = reader[1]
    assert s.kind == "referring" and s.masks.shape == (1, 20, 30) and s.masks.sum() == 9 * 11
    assert (
        s.target_texts == ["the cup"] and s.turns[0].text == "<image>\nCan you segment the cup in this image?"
    )
    assert len(RefCocoReader(root, images, "train", dataset="refcoco")) == 1


# -- semantic segmentation ---------------------------------------------------------------------------


def test_ade20k_label_map_and_class_names(tmp_path: Path) -> None:
    base = tmp_path / "ade20k"
    write_image(base / "images" / "training" / "ADE_train_00000001.jpg", 16, 16)
    label = np.zeros((16, 16), np.uint8)  # 0 = "other" -> ignore
    label[:8] = 1  # wall
    label[8:, :4] = 13  # person
    (base / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(label).save(base / "annotations" / "training" / "ADE_train_00000001.png")
    s = ade20k(tmp_path, mode="eval")[0]
    assert len(ADE20K_CLASSES) == 150 and s.target_texts == ["wall", "person"]
    assert s.masks.shape == (2, 16, 16) and s.masks[0].sum() == 128 and s.masks[1].sum() == 32
    assert s.ignore is not None and s.ignore.sum() == 256 - 160
    assert [t.role for t in s.turns] == ["user", "assistant", "user", "assistant"]
    assert s.turns[0].text.startswith("<image>\n") and "<image>" not in s.turns[2].text


def test_cocostuff_dash_classes_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "cocostuff" / "train2017"
    write_image(folder / "000000000009.jpg", 10, 10)
    label = np.full((10, 10), 255, np.uint8)
    label[:5] = 0  # person
    label[5:, :5] = COCOSTUFF_CLASSES.index("building-other")
    label[5:, 5:] = COCOSTUFF_CLASSES.index("sky-other")
    Image.fromarray(label).save(folder / "000000000009.png")
    s = cocostuff(tmp_path, mode="eval")[0]
    assert len(COCOSTUFF_CLASSES) == 182 and s.target_texts == ["person"]
    assert s.ignore is not None and s.ignore.sum() == 50


def test_mapillary_and_paco_parts(tmp_path: Path) -> None:
    base = tmp_path / "mapillary"
    (base / "training" / "v2.0" / "labels").mkdir(parents=True)
    (base / "config_v2.0.json").write_text(
        json.dumps({"labels": [{"readable": "Bird"}, {"readable": "Road"}]})
    )
    write_image(base / "training" / "images" / "m1.jpg", 8, 8)
    Image.fromarray(np.ones((8, 8), np.uint8)).save(base / "training" / "v2.0" / "labels" / "m1.png")
    assert mapillary(tmp_path, mode="eval")[0].target_texts == ["road"]

    ann = tmp_path / "vlpart" / "paco" / "annotations"
    ann.mkdir(parents=True)
    write_image(tmp_path / "coco" / "train2017" / "1.jpg", 12, 12)
    coco_instances(
        ann / "paco_lvis_v1_train.json", [(1, "train2017/1.jpg", 12, 12)], [poly_ann(5, 1, 1, 1, 6, 6, cat=2)]
    )
    s = paco_lvis(tmp_path, mode="eval")[0]
    assert s.target_texts == ["mug handle"] and s.masks.sum() == 25
    assert part_name("cup_(drink_container):handle", None) == "cup handle"
    rng = np.random.default_rng(0)
    assert {part_name("dog:head", rng) for _ in range(20)} == {"dog head", "the head of the dog"}


def test_llava_instruct_vqa(tmp_path: Path) -> None:
    write_image(tmp_path / "coco" / "train2017" / "000000000042.jpg", 9, 11)
    data = [
        {"id": "42", "image": "000000000042.jpg", "conversations": [
            {"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "Noise."},
            {"from": "human", "value": "Colourful?"}, {"from": "gpt", "value": "Yes."}]},
    ]  # fmt: skip
    (tmp_path / "llava_instruct_150k.json").write_text(json.dumps(data))
    s = build_reader("llava_instruct", tmp_path / "llava_instruct_150k.json")[0]
    assert s.kind == "vqa" and s.masks.shape == (0, 9, 11) and len(s.turns) == 4
    assert s.turns[0].text == "<image>\nWhat is shown?" and s.turns[3].text == "Yes."
    assert s.load_image().shape == (9, 11, 3)


# -- malformed inputs -------------------------------------------------------------------------------


def test_malformed_records_name_the_file_and_reason(tmp_path: Path) -> None:
    root = write_reasonseg(tmp_path / "ReasonSeg")
    tr = root / "train"
    (tr / "c.jpg").write_bytes(b"definitely not a jpeg")
    (tr / "c.json").write_text(
        json.dumps({"text": ["x"], "is_sentence": False, "shapes": [shape("target", rect(1, 1, 5, 5))]})
    )
    write_image(tr / "d.jpg", 20, 20)
    (tr / "d.json").write_text('{"text": ["x"], "is_sentence": fal')
    write_image(tr / "e.jpg", 20, 20)
    (tr / "e.json").write_text(
        json.dumps({"text": ["x"], "is_sentence": False, "shapes": [shape("target", rect(1, 1, 25, 5))]})
    )
    (tr / "f.json").write_text(json.dumps({"text": ["x"], "is_sentence": False, "shapes": []}))  # no image
    write_image(tr / "g.jpg", 20, 20)
    (tr / "g.json").write_text(json.dumps({"text": ["x"], "shapes": [shape("target", rect(1, 1, 5, 5))]}))
    good = write_image(tr / "h.jpg", 64, 64)
    (tr / "h.json").write_text(
        json.dumps({"text": ["x"], "is_sentence": False, "shapes": [shape("target", rect(1, 1, 5, 5))]})
    )
    good.write_bytes(
        good.read_bytes()[: good.stat().st_size // 2]
    )  # truncated: the header reads, the pixels don't

    reader = ReasonSegReader(root, "train", mode="eval")
    names = [p.stem for p in reader.json_paths]
    expect = {
        "c": ("c.jpg", "not a readable image"),
        "d": ("d.json", "broken JSON"),
        "e": ("e.json", "outside the 20x20 image"),
        "f": ("f.json", "no image next to it"),
        "g": ("g.json", "missing field 'is_sentence'"),
    }
    for stem, (fname, reason) in expect.items():
        with pytest.raises(DataError) as err:
            reader.get(names.index(stem))
        assert err.value.path.endswith(fname) and reason in err.value.reason, str(err.value)
    h = reader.get(names.index("h"))
    assert h is not None
    with pytest.raises(DataError, match=r"h\.jpg: corrupt image"):
        h.load_image()

    skip = ReasonSegReader(root, "train", mode="eval", skip_malformed=True)
    samples = list(skip)
    assert len(samples) == 3 and len(skip.skipped) == 5
    report = skip.report()
    assert report.startswith("reason_seg: skipped 5 of 8 records")
    assert "d.json: broken JSON" in report and "f.json" in report
    assert skip[names.index("d")].image_id.endswith("/e") is False  # replaced by the next good record
    assert skip[names.index("d")].image_id.endswith("/h")


def test_missing_and_broken_annotation_files(tmp_path: Path) -> None:
    g, images, _ = write_grefcoco(tmp_path)
    (g / "instances.json").write_text("{ nope")
    with pytest.raises(DataError, match=r"instances\.json: broken JSON"):
        GRefCocoReader(g, images, "val")
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: file is missing"):
        RefCocoReader(tmp_path / "nowhere", images, dataset="refcoco")
    (tmp_path / "bad.p").write_bytes(b"\x80\x04garbage")
    (tmp_path / "refs(unc).p").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a readable REFER pickle"):
        RefCocoReader(tmp_path, images, dataset="refcoco")
    (tmp_path / "vqa.json").write_text(
        json.dumps([{"image": "x.jpg", "conversations": [{"from": "gpt", "value": "hi"}]}])
    )
    with pytest.raises(DataError, match=r"record 0\].*alternate"):
        LlavaInstructReader(tmp_path / "vqa.json", tmp_path)[0]
    with pytest.raises(ValueError, match="unknown reader kind"):
        build_reader("imagenet", tmp_path)


def test_grefcoco_no_target_refs_filter(tmp_path: Path) -> None:
    g, images, _ = write_grefcoco(tmp_path)
    only = GRefCocoReader(g, images, "val", no_target_refs="only", mode="eval")
    assert len(only) == 1 and only[0].target_kinds == ["rej"] and only[0].target_texts == ["the giraffe"]
    dropped = GRefCocoReader(g, images, "val", no_target_refs="drop", mode="eval")
    assert len(dropped) == 2 and all(s.target_kinds == ["seg", "seg"] for s in (dropped[0], dropped[1]))
    assert len(GRefCocoReader(g, images, "val", no_target_refs="keep", mode="eval")) == 3
    with pytest.raises(ValueError, match="no_target_refs must be one of"):
        GRefCocoReader(g, images, "val", no_target_refs="some")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no refs of split 'train' left with no_target_refs='only'"):
        GRefCocoReader(g, images, "train", no_target_refs="only")


def test_grefcoco_gsva_named_expressions(tmp_path: Path) -> None:
    g, images, rle_mask = write_grefcoco(tmp_path)
    reader = GRefCocoReader(g, images, "val", expressions_per_sample=3, seed=2)
    s = reader.get(0)
    assert s is not None and s.meta["grouped"]
    assert sorted(s.target_texts) == ["both cups", "the giraffe"] or sorted(s.target_texts) == [
        "the giraffe",
        "the two cups",
    ]
    q, a = s.turns[0].text, s.turns[1].text
    assert q.startswith("<image>\n") and all(t in q for t in s.target_texts)
    for text, kind, mask in zip(s.target_texts, s.target_kinds, s.masks, strict=True):
        slot = "[SEG]" if kind == "seg" else "[REJ]"
        assert f"{text}: {slot}" in a
        assert (mask.sum() == 0) == (text == "the giraffe")
    assert (
        s.masks[s.target_texts.index("the giraffe") ^ 1].sum() == 64 + rle_mask.sum()
    )  # merged per expression


def test_pascal_part_layout(tmp_path: Path) -> None:
    base = tmp_path / "vlpart" / "pascal_part"
    base.mkdir(parents=True)
    write_image(base / "VOCdevkit" / "VOC2010" / "JPEGImages" / "2008_000002.jpg", 10, 14)
    coco_instances(base / "train.json", [(3, "2008_000002.jpg", 10, 14)], [poly_ann(9, 3, 0, 0, 4, 4, cat=2)])
    s = build_reader("pascal_part", tmp_path, mode="eval")[0]
    assert s.source == "pascal_part" and s.target_texts == ["mug handle"] and s.masks.shape == (1, 10, 14)


def test_sample_validation() -> None:
    from reasonseg.data.samples import Sample, Turn

    turns = [Turn("user", "<image>\nq"), Turn("assistant", "It is [REJ].")]
    ok = Sample(np.zeros((4, 5, 3), np.uint8), "x", turns, np.zeros((1, 4, 5)), "gres", "t")
    assert ok.target_kinds == ["rej"] and ok.masks.dtype == np.uint8 and ok.hw == (4, 5)
    with pytest.raises(ValueError, match=r"\[REJ\] target must have an all-zero mask"):
        Sample(ok.image, "x", turns, np.ones((1, 4, 5)), "gres", "t", target_kinds=["rej"])
    with pytest.raises(ValueError, match="kind"):
        Sample(ok.image, "x", turns, np.zeros((1, 4, 5)), "detection", "t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ignore shape"):
        Sample(ok.image, "x", turns, np.zeros((1, 4, 5)), "gres", "t", ignore=np.zeros((5, 4), bool))
    with pytest.raises(ValueError, match="image"):
        Sample(np.zeros((3, 5, 3), np.uint8), "x", turns, np.zeros((1, 4, 5)), "gres", "t")
    with pytest.raises(ValueError, match="start with a user turn"):
        Sample(ok.image, "x", turns[1:], np.zeros((1, 4, 5)), "gres", "t")


# -- audit: skip reports, read-time checks, encodings, empty masks, suffix case -----------------------


def llava_record(rid: str, *turns: tuple[str, str], image: str = "000000000042.jpg") -> dict:
    return {"id": rid, "image": image, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_skip_mode_warns_once_with_the_count_and_the_reasons(tmp_path: Path) -> None:
    write_image(tmp_path / "000000000042.jpg", 9, 11)
    data = [
        llava_record("good", ("human", "<image>\nWhat?"), ("gpt", "Noise.")),
        llava_record("two", ("human", "<image> <image> What?"), ("gpt", "Noise.")),
        {"id": "typo", "image": "000000000042.jpg", "conversation": []},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(data))
    with pytest.warns(SkippedRecordsWarning) as caught:
        reader = LlavaInstructReader(tmp_path / "vqa.json", tmp_path, skip_malformed=True)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("llava_instruct: skipped 2 of 3 records as malformed")
    assert "vqa.json [record 1, id 'two']" in message and "missing field 'conversations'" in message
    assert sorted(reader.skipped) == [1, 2] and [s.meta["id"] for s in reader] == ["good"]

    # records that only fail when loaded (here: images that are not images): one warning per reader
    root = write_reasonseg(tmp_path / "ReasonSeg")
    for stem in ("c", "d", "e"):
        (root / "train" / f"{stem}.jpg").write_bytes(b"not a jpeg")
        (root / "train" / f"{stem}.json").write_text((root / "train" / "b.json").read_text())
    lazy = ReasonSegReader(root, "train", mode="eval", skip_malformed=True)
    with pytest.warns(SkippedRecordsWarning) as caught:
        assert len(list(lazy)) == 2 and len(list(lazy)) == 2
    assert len(caught) == 1 and "reason_seg: skipped malformed record #2" in str(caught[0].message)
    assert "c.jpg: not a readable image" in str(caught[0].message) and len(lazy.skipped) == 3
    assert lazy.report(limit=1).endswith("... and 2 more (reader.report() lists them all)")


def test_llava_image_placeholders_are_checked_when_the_file_is_read(tmp_path: Path) -> None:
    write_image(tmp_path / "000000000042.jpg", 9, 11)
    good = llava_record("ok", ("human", "What?\n<image>"), ("gpt", "Noise."))
    bad = {
        "two": llava_record("two", ("human", "<image>\n<image>\nWhat?"), ("gpt", "Noise.")),
        "answer": llava_record("answer", ("human", "What?"), ("gpt", "<image> Noise.")),
        "later": llava_record(
            "later", ("human", "What?"), ("gpt", "Noise."), ("human", "<image> And?"), ("gpt", "No.")
        ),
    }
    for rid, rec in bad.items():
        (tmp_path / "vqa.json").write_text(json.dumps([good, rec]))
        with pytest.raises(DataError, match=r"<image> placeholder\(s\); a conversation may hold one") as err:
            LlavaInstructReader(tmp_path / "vqa.json", tmp_path)
        assert err.value.path == f"{tmp_path / 'vqa.json'} [record 1, id '{rid}']"
    (tmp_path / "vqa.json").write_text(json.dumps([good, *bad.values()]))
    with pytest.warns(SkippedRecordsWarning, match="skipped 3 of 4 records"):
        reader = LlavaInstructReader(tmp_path / "vqa.json", tmp_path, skip_malformed=True)
    s = reader[2]  # replaced by the next good record, wrapping round
    assert s.meta["id"] == "ok" and s.turns[0].text == "What?\n<image>"


def test_json_encodings_bom_accepted_non_utf8_named(tmp_path: Path) -> None:
    write_image(tmp_path / "000000000042.jpg", 9, 11)
    data = [llava_record("é", ("human", "Qu'est-ce que c'est ?"), ("gpt", "Un café."))]
    text = json.dumps(data, ensure_ascii=False)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    s = LlavaInstructReader(tmp_path / "bom.json", tmp_path)[0]
    assert s.turns[1].text == "Un café." and s.meta["id"] == "é"
    latin = text.encode("latin-1")
    (tmp_path / "latin.json").write_bytes(latin)
    with pytest.raises(DataError, match=rf"latin\.json: not UTF-8: byte 0xe9 at offset {latin.index(0xE9)}"):
        LlavaInstructReader(tmp_path / "latin.json", tmp_path)
    g, images, _ = write_grefcoco(tmp_path / "g")
    (g / "instances.json").write_bytes((g / "instances.json").read_bytes().replace(b'"cup"', b'"caf\xe9"'))
    with pytest.raises(DataError, match=r"instances\.json: not UTF-8"):
        GRefCocoReader(g, images, "val")

    # ReasonSeg: some published files are cp1252, as LISA's reader allows; read with a warning naming it
    root = write_reasonseg(tmp_path / "ReasonSeg")
    b = root / "train" / "b.json"
    b.write_bytes(b.read_bytes().replace(b'"cup"', '"café cup"'.encode("cp1252")))
    with pytest.warns(UnicodeWarning, match=r"b\.json: not UTF-8 \(byte offset \d+\), read as cp1252"):
        s = ReasonSegReader(root, "train", mode="eval")[1]
    assert s.target_texts == ["café cup"]


def test_empty_target_masks_are_malformed_but_no_target_refs_stay(tmp_path: Path) -> None:
    g, images, _ = write_grefcoco(tmp_path)
    instances = json.loads((g / "instances.json").read_text())
    empty_rle = rle_ann(12, 1, np.zeros((32, 48), bool))
    flat = poly_ann(13, 1, 4, 4, 20, 4)  # all four corners on one line: no area
    instances["annotations"] += [empty_rle, flat]
    (g / "instances.json").write_text(json.dumps(instances))
    refs = json.loads((g / "grefs(unc).json").read_text())
    refs += [
        {"ref_id": 4, "image_id": 1, "ann_id": [10, 12], "split": "val", "sentences": [{"sent": "cup a"}]},
        {"ref_id": 5, "image_id": 1, "ann_id": [13], "split": "val", "sentences": [{"sent": "cup b"}]},
    ]
    (g / "grefs(unc).json").write_text(json.dumps(refs))
    reader = GRefCocoReader(g, images, "val", mode="eval")
    assert len(reader) == 5
    for index, ann_id in ((3, 12), (4, 13)):
        with pytest.raises(
            DataError, match=rf"annotation {ann_id}: its segmentation decodes to an empty mask"
        ):
            reader[index]
    none = reader[2]  # the no-target ref ([-1]) is still a [REJ] sample with its all-zero mask
    assert none.target_kinds == ["rej"] and none.masks.sum() == 0
    skip = GRefCocoReader(g, images, "val", mode="eval", skip_malformed=True)
    with pytest.warns(SkippedRecordsWarning):
        kinds = [s.target_kinds for s in skip]
    assert kinds == [["seg", "seg"], ["seg", "seg"], ["rej"]] and sorted(skip.skipped) == [3, 4]

    root = tmp_path / "refcoco"
    root.mkdir()
    coco_instances(root / "instances.json", [(1, "COCO_train2014_000000000001.jpg", 32, 48)], [flat])
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(
            [{"ref_id": 0, "ann_id": 13, "image_id": 1, "split": "val", "sentences": [{"sent": "x"}]}], f
        )
    with pytest.raises(
        DataError, match=r"instances\.json: annotation 13: its segmentation decodes to an empty"
    ):
        RefCocoReader(root, images, "val")[0]


def test_image_suffixes_match_in_any_case(tmp_path: Path) -> None:
    root = write_reasonseg(tmp_path / "ReasonSeg")
    tr = root / "train"
    (tr / "a.jpg").rename(tr / "a.JPG")
    (tr / "b.jpg").rename(tr / "b.Jpeg")
    reader = ReasonSegReader(root, "train", mode="eval")
    assert [s.image.name for s in reader] == ["a.JPG", "b.Jpeg"]  # type: ignore[union-attr]

    ade = tmp_path / "ade20k"
    write_image(ade / "images" / "training" / "ADE_1.JPG", 8, 8)
    (ade / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(np.ones((8, 8), np.uint8)).save(ade / "annotations" / "training" / "ADE_1.png")
    assert ade20k(tmp_path, mode="eval")[0].target_texts == ["wall"]
    base = tmp_path / "mapillary"
    (base / "training" / "v2.0" / "labels").mkdir(parents=True)
    (base / "config_v2.0.json").write_text(json.dumps({"labels": [{"readable": "Road"}]}))
    write_image(base / "training" / "images" / "m1.JPEG", 8, 8)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(base / "training" / "v2.0" / "labels" / "m1.png")
    assert mapillary(tmp_path, mode="eval")[0].image.name == "m1.JPEG"  # type: ignore[union-attr]


def test_records_are_checked_when_the_annotation_file_is_opened(tmp_path: Path) -> None:
    write_image(tmp_path / "000000000042.jpg", 9, 11)
    data = [llava_record(str(i), ("human", "What?"), ("gpt", "Noise.")) for i in range(9001)]
    data[9000]["conversations"][1]["vaule"] = data[9000]["conversations"][1].pop("value")
    (tmp_path / "vqa.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"vqa\.json \[record 9000, id '9000'\]: missing field 'value'"):
        LlavaInstructReader(tmp_path / "vqa.json", tmp_path)

    g, images, _ = write_grefcoco(tmp_path / "g")
    refs = json.loads((g / "grefs(unc).json").read_text())
    good = [dict(r) for r in refs]
    for change, reason in (
        ({"ann_id": [10, 99]}, "annotation id 99 is not in"),
        ({"image_id": 5}, "image id 5 is not in"),
        ({"sentences": [{"text": "cups"}]}, "every sentence needs a 'sent' string"),
        ({"ann_id": "10"}, "'ann_id' must be a list of ints"),
    ):
        (g / "grefs(unc).json").write_text(json.dumps([{**good[0], **change}, *good[1:]]))
        with pytest.raises(DataError) as err:
            GRefCocoReader(g, images, "val")
        assert err.value.path.endswith("grefs(unc).json") and err.value.reason.startswith("ref 1: ")
        assert reason in err.value.reason
    # skip mode: the bad ref is skipped at start-up and never grouped with a good one (GSVA style)
    (g / "grefs(unc).json").write_text(json.dumps([{**good[0], "ann_id": [99]}, *good[1:]]))
    with pytest.warns(SkippedRecordsWarning, match="grefcoco: skipped 1 of 2 records"):
        reader = GRefCocoReader(g, images, "val", expressions_per_sample=3, skip_malformed=True)
    assert reader.get(0) is None and reader.get(1).target_texts == ["the giraffe"]  # type: ignore[union-attr]
    (g / "grefs(unc).json").write_text(json.dumps([*good, {**good[1], "ref_id": 9, "ann_id": "10"}]))
    with pytest.warns(
        SkippedRecordsWarning, match=r"#1 .*grefs\(unc\)\.json: ref 9: 'ann_id' must be a list"
    ):
        dropped = GRefCocoReader(g, images, "val", no_target_refs="drop", skip_malformed=True)
    assert len(dropped) == 2 and dropped.get(1) is None  # the malformed ref is reported, not filtered

    root = tmp_path / "refcoco"
    root.mkdir()
    coco_instances(root / "instances.json", [(1, "COCO_train2014_000000000001.jpg", 32, 48)], [])
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(
            [{"ref_id": 7, "ann_id": 3, "image_id": 1, "split": "val", "sentences": [{"sent": "x"}]}], f
        )
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: ref 7: annotation id 3 is not in"):
        RefCocoReader(root, images, "val")

    ann = tmp_path / "vlpart" / "paco" / "annotations"
    ann.mkdir(parents=True)
    coco_instances(
        ann / "paco_lvis_v1_train.json", [(1, "1.jpg", 12, 12)], [poly_ann(5, 1, 1, 1, 6, 6, cat=9)]
    )
    with pytest.raises(DataError, match=r"paco_lvis_v1_train\.json: annotation 5: unknown category 9"):
        paco_lvis(tmp_path)


def test_errors_name_types_in_words_and_a_folder_given_for_a_json_file(tmp_path: Path) -> None:
    from reasonseg.data.readers.base import read_json, require

    with pytest.raises(DataError, match=r"field 'is_sentence' is a str, expected bool or int$"):
        require({"is_sentence": "yes"}, "is_sentence", (bool, int), tmp_path / "a.json")
    with pytest.raises(DataError, match="is a directory, expected a JSON file"):
        read_json(tmp_path)
    with pytest.raises(DataError, match="is a directory, expected a JSON file"):
        LlavaInstructReader(tmp_path, tmp_path)


def test_a_missing_coco_image_names_its_image_id_and_annotation_file(tmp_path: Path) -> None:
    g, images, _ = write_grefcoco(tmp_path)
    for f in images.iterdir():
        f.unlink()
    reader = GRefCocoReader(g, images, "val", mode="eval")
    with pytest.raises(DataError, match=r"image file is missing \(image id 1 of .*instances\.json\)"):
        reader[0]
