"""The synthetic world: knowledge table, rendering, scenes, queries, writers, determinism, split hygiene."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from reasonseg.cli import main
from reasonseg.data.readers import build_reader
from reasonseg.data.readers.grefer import GRefCocoReader
from reasonseg.data.synth import WorldConfig, generate_world, render
from reasonseg.data.synth.knowledge import CATEGORIES, KINDS, PROPERTIES, kinds_with
from reasonseg.data.synth.queries import (
    FAMILIES,
    QUERY_KINDS,
    TEST_FAMILIES,
    Family,
    left_to_right,
    position,
    reasoning,
)
from reasonseg.data.synth.scene import TEST_BACKGROUNDS, Instance, Scene, SceneConfig, compose_scene
from reasonseg.data.synth.world import MIN_POLYGON_IOU, build_scene, split_of

pytestmark = pytest.mark.skipif(not render.font_path().is_file(), reason="needs fonts-noto-color-emoji")

CFG = WorldConfig(n=40, seed=3, split_fractions=(0.5, 0.2, 0.3))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(CFG, out, workers=1)
    return out


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- knowledge and rendering -------------------------------------------------------------------------


def test_knowledge_table_is_complete_and_consistent() -> None:
    assert len(KINDS) >= 150
    assert {k.category for k in KINDS.values()} == set(CATEGORIES)
    assert len({k.emoji for k in KINDS.values()}) == len(KINDS)
    for k in KINDS.values():
        assert k.properties and k.attributes, k.name
    for pid in PROPERTIES:
        assert kinds_with(pid), f"property {pid} has no kind"
    # explanations agree in number
    assert PROPERTIES["vitamin_c"].explain("the grapes", True) == "The grapes are rich in vitamin C."
    assert PROPERTIES["tell_time"].explain("the wristwatch", False) == "The wristwatch tells the time."
    assert PROPERTIES["pouch"].explain("the kangaroo", False) == "The kangaroo carries its young in a pouch."
    assert (
        PROPERTIES["public"].explain("the buses", True) == "The buses carry many passengers on a fixed route."
    )
    # no agreement marker survives into any query or explanation text
    for p in PROPERTIES.values():
        for text in (p.explain("the thing", False), p.explain("the things", True)):
            assert "{" not in text and "}" not in text, text


def test_every_kind_renders_and_its_colour_matches_the_drawing() -> None:
    for k in KINDS.values():
        g = render.render_glyph(k.emoji)
        assert g.shape[2] == 4 and min(g.shape[:2]) >= 20, k.name
        assert (g[..., 3] >= render.ALPHA_THRESHOLD).mean() > 0.15, k.name
        if k.colour is not None:
            assert render.dominant_colour(g) == k.colour, k.name


def test_paste_mask_is_the_alpha(tmp_path: Path) -> None:
    glyph = render.scaled_glyph(KINDS["banana"].emoji, 60, flip=True)
    canvas = np.zeros((80, 90, 3), np.float32)
    mask = render.paste(canvas, glyph, 5, 7)
    assert mask.sum() == (glyph[..., 3] >= 128).sum()
    assert np.array_equal(mask[7 : 7 + glyph.shape[0], 5 : 5 + glyph.shape[1]], glyph[..., 3] >= 128)
    assert canvas[~mask].max() < 255 and canvas[mask].max() > 0
    with pytest.raises(ValueError, match="does not fit"):
        render.paste(canvas, glyph, 60, 60)


def test_missing_font_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REASONSEG_EMOJI_FONT", str(tmp_path / "none.ttf"))
    render.load_font.cache_clear()
    try:
        with pytest.raises(render.EmojiFontMissing, match="fonts-noto-color-emoji"):
            render.load_font()
    finally:
        monkeypatch.undo()
        render.load_font.cache_clear()


# -- scenes and queries ------------------------------------------------------------------------------


def test_scene_occlusion_removes_hidden_pixels() -> None:
    cfg = SceneConfig(min_objects=5, max_objects=5, max_scale=0.45)
    occluded = 0
    for seed in range(6):
        scene = compose_scene("coffee", cfg, np.random.default_rng(seed))
        H, W = scene.hw
        assert max(H, W) == 512
        masks = np.stack([i.mask for i in scene.instances])
        assert masks.sum(0).max() <= 1  # visible parts never overlap
        for inst in scene.instances:
            assert inst.area >= cfg.min_visible * inst.full_area
            side = max(inst.box[2] - inst.box[0], inst.box[3] - inst.box[1])
            assert cfg.min_scale * 512 - 2 <= side <= cfg.max_scale * 512 + 2
            occluded += inst.area < inst.full_area
    assert occluded > 0


def _square_scene(boxes: list[tuple[str, int, int, int]]) -> Scene:
    insts = []
    for z, (name, x, y, s) in enumerate(boxes):
        m = np.zeros((200, 300), bool)
        m[y : y + s, x : x + s] = True
        insts.append(Instance(KINDS[name], m, (x, y, x + s, y + s), int(m.sum()), z, False))
    return Scene(np.zeros((200, 300, 3), np.uint8), insts, "coffee")


def test_queries_pick_exactly_their_targets() -> None:
    scene = _square_scene([("orange", 200, 20, 40), ("lemon", 20, 120, 40), ("hammer", 120, 60, 40)])
    rng = np.random.default_rng(0)
    fam = FAMILIES["rsn.what"]
    found = set()
    for _ in range(40):
        q = reasoning(scene, fam, rng)
        assert q is not None and sorted(t.split(" ")[0] for t in q.texts) == ["What", "Which"]
        pid = next(p for p in PROPERTIES if q.subject == f"something that {PROPERTIES[p].clause}")
        assert [scene.instances[t].kind.name for t in q.targets] == [
            scene.instances[t].kind.name
            for t in left_to_right(
                scene, [i for i, x in enumerate(scene.instances) if x.kind.name in kinds_with(pid)]
            )
        ]
        found.add(pid)
    assert "vitamin_c" in found
    vc = [
        q
        for q in (reasoning(scene, fam, np.random.default_rng(s)) for s in range(200))
        if q and "vitamin C" in q.texts[0]
    ]
    assert vc and vc[0].targets == [1, 0]  # lemon (x=20) before orange (x=200): left to right
    assert vc[0].explanation == "The lemon and the orange are rich in vitamin C."
    absent = reasoning(scene, fam, rng, absent=True)
    assert absent is not None and absent.targets == [] and absent.explanation is None
    pos = position(
        scene, Family("t", "position", ("the {extreme} {thing}",), False), np.random.default_rng(1)
    )
    assert pos is not None and len(pos.targets) == 1


def test_families_cover_every_query_kind_and_some_are_held_out() -> None:
    for qk in QUERY_KINDS:
        fams = [f for f in FAMILIES.values() if f.query_kind == qk]
        assert len(fams) >= 3, qk
        assert any(f.held_out for f in fams) and any(not f.held_out for f in fams), qk


# -- the written world -------------------------------------------------------------------------------


def test_world_layout_and_summary(world: Path) -> None:
    summary = json.loads((world / "world.json").read_text())
    assert summary["n"] == 40 and sum(summary["splits"].values()) == 40
    assert summary["polygon_iou_min"] >= MIN_POLYGON_IOU
    assert summary["no_target_refs"] > 0 and summary["multi_target_refs"] > 0
    kinds = {k.split("/")[0] for k in summary["query_kinds"]}
    assert kinds == set(QUERY_KINDS)
    assert not [p for p in world.rglob("*") if ".tmp" in p.name]  # atomic writes leave nothing behind
    refs = json.loads((world / "refer_seg" / "grefcoco" / "grefs(unc).json").read_text())
    for r in refs:
        assert isinstance(r["ann_id"], list) and (r["ann_id"] == [-1]) == r["no_target"]


def test_splits_are_disjoint(world: Path) -> None:
    inst = json.loads((world / "refer_seg" / "grefcoco" / "instances.json").read_text())
    refs = json.loads((world / "refer_seg" / "grefcoco" / "grefs(unc).json").read_text())
    split_of_image = {im["id"]: im["synth"]["split"] for im in inst["images"]}
    bgs: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    hashes: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for im in inst["images"]:
        split = im["synth"]["split"]
        bgs[split].add(im["synth"]["background"])
        path = world / "reason_seg" / "ReasonSeg" / split / im["file_name"]
        hashes[split].add(hashlib.sha256(path.read_bytes()).hexdigest())
        assert split == split_of(CFG.seed, im["id"] - 1, CFG.split_fractions)
    assert all(bgs[s] for s in bgs)
    assert bgs["test"] <= TEST_BACKGROUNDS and not (bgs["train"] | bgs["val"]) & TEST_BACKGROUNDS
    assert (
        not hashes["train"] & hashes["test"]
        and not hashes["train"] & hashes["val"]
        and not hashes["val"] & hashes["test"]
    )
    fams = {s: {r["synth"]["family"] for r in refs if r["split"] == s} for s in ("train", "val", "test")}
    assert not (fams["train"] | fams["val"]) & TEST_FAMILIES
    assert fams["test"] & TEST_FAMILIES
    for r in refs:
        assert r["split"] == split_of_image[r["image_id"]]
    for split in ("train", "val", "test"):  # ReasonSeg folders hold exactly their split's images
        stems = {p.stem for p in (world / "reason_seg" / "ReasonSeg" / split).glob("*.json")}
        assert stems == {Path(im["file_name"]).stem for im in inst["images"] if im["synth"]["split"] == split}


def test_real_readers_load_the_world_exactly(world: Path) -> None:
    gres = build_reader("synth", world, split="test", mode="eval")
    assert isinstance(gres, GRefCocoReader) and len(gres) > 0
    checked = 0
    for i in range(len(gres)):
        s = gres[i]
        index = int(s.image_id.split("/")[-1]) - 1
        scene, split, queries, _ = build_scene(CFG, index)
        assert split == "test"
        q = next(q for q in queries if s.target_texts[0] in q.texts)
        if q.targets:
            exact = np.stack([scene.instances[t].mask for t in q.targets])
            assert np.array_equal(s.masks.astype(bool), exact)  # RLE: exact, in [SEG] order
            assert s.turns[1].text.count("[SEG]") == len(q.targets)
        else:
            assert s.target_kinds == ["rej"] and "[REJ]" in s.turns[1].text
        assert s.load_image().shape[:2] == scene.hw
        checked += 1
    assert checked > 0
    rs = build_reader("synth_reason_seg", world, split="train", mode="eval")
    for i in range(len(rs)):
        s = rs[i]
        index = int(s.image_id.split("_")[-1])
        scene, _, _, q = build_scene(CFG, index)
        union = np.any(np.stack([scene.instances[t].mask for t in q.targets]), axis=0)
        keep = ~s.ignore if s.ignore is not None else np.ones_like(union)
        pred = s.masks[0].astype(bool)
        iou = (pred & union & keep).sum() / ((pred | union) & keep).sum()
        assert iou >= MIN_POLYGON_IOU, (s.image_id, iou)
        assert s.turns[0].text.startswith("<image>\n")


def test_rerun_is_byte_identical_with_any_worker_count(world: Path, tmp_path: Path) -> None:
    small = WorldConfig(n=6, seed=11)
    generate_world(small, tmp_path / "a", workers=1)
    generate_world(small, tmp_path / "b", workers=2)
    generate_world(small, tmp_path / "a", workers=1)  # rerun into the same folder
    da, db = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert da == db and len(da) > 10
    generate_world(WorldConfig(n=3, seed=12), tmp_path / "c")
    assert tree_digest(tmp_path / "c") != da
    # Writing a smaller world with another seed over an old one leaves exactly the new world.
    generate_world(WorldConfig(n=3, seed=12), tmp_path / "a")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "c")


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["synth", "--out", str(tmp_path / "w"), "--n", "3", "--seed", "1", "--image-size", "256"]) == 0
    )
    assert "wrote 3 scenes" in capsys.readouterr().out
    summary = json.loads((tmp_path / "w" / "world.json").read_text())
    assert summary["image_size"] == 256
    assert main(["synth", "--out", str(tmp_path / "x"), "--n", "0"]) == 2


def test_a_world_of_chosen_kinds_uses_only_them() -> None:
    """``WorldConfig(kinds=...)``: objects only of those kinds; no-target queries name only kinds,
    categories and properties of the set (so "unknown word -> absent" is no shortcut); bad names fail."""
    kinds = ("banana", "camera", "cat", "car", "hammer", "guitar")
    cfg = WorldConfig(n=30, seed=5, kinds=kinds)
    assert cfg.kinds == tuple(sorted(kinds))
    cats = {KINDS[k].category for k in kinds}
    props = {p for k in kinds for p in KINDS[k].properties}
    names_seen: set[str] = set()
    absent = 0
    for index in range(cfg.n):
        scene, _, refs, rs = build_scene(cfg, index)
        names_seen |= {inst.kind.name for inst in scene.instances}
        for q in [*refs, rs]:
            if q.targets:
                continue
            absent += 1
            if q.query_kind == "semantic":
                assert q.subject in kinds
            elif q.query_kind == "category":
                assert any(CATEGORIES[c].plural == q.subject for c in cats)
            elif q.query_kind == "reasoning":
                assert any(q.subject == f"something that {PROPERTIES[p].clause}" for p in props)
    assert names_seen <= set(kinds) and len(names_seen) >= 4 and absent >= 3
    with pytest.raises(ValueError, match=r"unknown kind.*unicorn"):
        WorldConfig(n=3, kinds=("banana", "unicorn"))
    with pytest.raises(ValueError, match="at least 2 kinds"):
        WorldConfig(n=3, kinds=("banana",))


def test_cli_synth_kinds(tmp_path: Path) -> None:
    out = tmp_path / "w"
    argv = ["synth", "--out", str(out), "--n", "4", "--image-size", "128", "--kinds", "banana, cat,camera"]
    assert main(argv) == 0
    assert json.loads((out / "world.json").read_text())["config"]["kinds"] == ["banana", "camera", "cat"]
    assert main([*argv[:-1], "banana,dragon"]) == 2


def test_reader_over_the_world_in_dataloader_workers(world: Path) -> None:
    import torch

    reader = build_reader("synth", world, split="train", seed=4)
    want = [reader.get(i).image_id for i in range(12)]  # type: ignore[union-attr]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(reader, range(12)), batch_size=4, num_workers=2, collate_fn=list
    )
    got = [s.image_id for batch in loader for s in batch]
    assert got == want
