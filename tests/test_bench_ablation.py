"""bench/ablation_query_blindness.py long-head and rej-margin run end to end on the tiny lisa-mobile and
a small synthetic world. long-head: slot states are extracted once, the head and mask decoder take
steps, and the test split's mean IoU and pair IoU are printed; rej-margin: the margins, AUCs and the
calibrated bias are printed. Only that they run and print sane values is asserted. selection is checked
on predictions made of the world's own object masks: the target itself, and another object."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reasonseg.data.synth import WorldConfig, generate_world, render

    if not render.font_path().is_file():
        pytest.skip("needs fonts-noto-color-emoji")
    path = tmp_path_factory.mktemp("ablation") / "world"
    generate_world(WorldConfig(n=40, seed=3, split_fractions=(0.5, 0.2, 0.3)), path, workers=1)
    return path


@pytest.mark.usefixtures("fresh_accelerator_state")
@pytest.mark.parametrize("mode", ["lm", "oracle", "distil"])
def test_long_head_runs_on_the_tiny_model(
    tmp_path: Path, world: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    import ablation_query_blindness as abl

    recipe = {
        "model": {"preset": "lisa-mobile", "tiny": True},
        "data": {"num_workers": 0, "datasets": [{"name": "synth", "kind": "synth", "path": str(world)}]},
        "loss": {"ce": 0.0},
        "freeze": {"lora": {"r": 0}, "train_projector": False, "train_new_token_rows": False},
        "optim": {"total_steps": 2, "warmup_steps": 0},
        "train": {"output_dir": str(tmp_path / "run"), "head_init_samples": 4, "num_threads": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out_dir = str(tmp_path / "distilled")
    n = torch.get_num_threads()
    try:
        abl.main(
            f"long-head --recipe {path} --world {world} --train-samples 6 --steps 2 --batch-size 2 "
            "--threads 1 --eval-every 1".split()
            + {"lm": [], "oracle": ["--oracle"]}.get(
                mode, ["--distil", "--oracle-steps", "2", "--out", out_dir]
            )
        )
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert re.search(r"slots: \d+ train on \d+ images, \d+ test", out)
    steps = re.findall(r"step (\d+): BCE ([\d.]+) Dice ([\d.]+) .*mean IoU ([\d.]+), pair IoU ([\d.]+)", out)
    # distil: its oracle phase, then head and decoder together
    assert [s[0] for s in steps] == ["1", "2"] * (2 if mode == "distil" else 1)
    for _, bce, dice, iou, pair in steps:
        assert math.isfinite(float(bce)) and 0 <= float(dice) <= 1
        assert 0 <= float(iou) <= 1 and 0 <= float(pair) <= 1
    if mode == "distil":
        probe = re.search(r"linear probe .*: ([\d.]+) train, ([\d.]+) test \(majority class ([\d.]+)\)", out)
        assert probe and all(0 <= float(x) <= 1 for x in probe.groups())
        assert re.search(r"test slots of family \w+.*: [\d.]+ of \d+", out)
        assert re.search(r"head fitted: MSE [\d.]+ train, [\d.]+ test", out)
        from reasonseg.model import LisaModel

        assert isinstance(LisaModel.from_pretrained(out_dir), LisaModel)  # saved whole, loads back


def test_rej_margin_runs_on_the_tiny_model(
    tmp_path: Path, world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ablation_query_blindness as abl
    from reasonseg.model import LisaModel

    model_dir = tmp_path / "model"
    LisaModel.from_preset("lisa-mobile", tiny=True).save_pretrained(model_dir)
    n = torch.get_num_threads()
    try:
        abl.main(
            f"rej-margin --model {model_dir} --world {world} --limit-train 6 --limit-test 6 --threads 1".split()
        )
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    for split in ("train", "test"):
        m = re.search(
            rf"{split}: 6 queries \((\d+) no-target\); margin \[REJ\]-\[SEG\] mean (\S+) no-target, (\S+) target; AUC (\S+)",
            out,
        )
        assert m, out
        assert math.isfinite(float(m.group(3)))
    assert re.search(r"bias chosen on train: \S+ -> test N-acc \S+, T-acc [\d.]+", out)


def test_presence_probe_runs_on_the_tiny_model(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ablation_query_blindness as abl

    n = torch.get_num_threads()
    try:
        abl.main(f"presence --world {world} --grids 2,4 --steps 3 --threads 1 --tiny".split())
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert re.search(r"\d+ train and \d+ test images, \d+ kinds, [\d.]+ kinds per image", out), out
    rows = re.findall(
        r"\| (\d+)x\d+ \| (\d+) \| ([\w ,]+) \| ([\d.na]+) \| ([\d.na]+) \| ([\d.]+) \| ([\d.]+) \|", out
    )
    assert [(r[0], r[2]) for r in rows] == [
        (g, probe) for g in ("2", "4") for probe in ("mean, linear", "tokens, linear", "tokens, MLP")
    ]
    for row in rows:
        aucs = [float(x) for x in row[3:5] if x != "nan"]
        assert aucs and all(0 <= a <= 1 for a in aucs)
        assert all(0 <= float(x) <= 1 for x in row[5:])


def test_selection_tells_a_wrong_object_from_the_target(
    tmp_path: Path, world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Predictions that are exactly the target object, and exactly another object of the same image."""
    import json

    import numpy as np
    from pycocotools import mask as mask_utils

    import ablation_query_blindness as abl
    from reasonseg.data.readers.coco import CocoInstances

    root = world / "refer_seg" / "grefcoco"
    coco = CocoInstances(root / "instances.json")
    objects: dict[int, list[int]] = {}
    for ann_id, ann in coco.anns.items():
        objects.setdefault(int(ann["image_id"]), []).append(ann_id)

    def rle_of(ann_id: int) -> dict:
        rle = mask_utils.encode(np.asfortranarray(coco.ann_mask(ann_id)))
        return {"counts": rle["counts"].decode(), "size": list(rle["size"])}

    right, wrong = [], []
    for ref in json.loads((root / "grefs(unc).json").read_text()):
        objs = objects[ref["image_id"]]
        if ref["no_target"] or len(ref["ann_id"]) != 1 or len(objs) < 2:
            continue
        target = ref["ann_id"][0]
        other = next(i for i in objs if i != target)
        for out, ann_id in ((right, target), (wrong, other)):
            out.append({"key": f"{ref['ref_id']}-0", "targets": [{"pred_rle": rle_of(ann_id)}]})
        if len(right) == 5:
            break
    assert len(right) == 5
    dirs = []
    for name, records in (("right", right), ("wrong", wrong)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "per_sample.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        dirs.append(str(tmp_path / name))
    abl.main(["selection", "--world", str(world), "--eval", *dirs])
    rows = re.findall(
        r"\| \S+/(right|wrong) \| (\d+) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+) \|",
        capsys.readouterr().out,
    )
    by_name = {r[0]: r[1:] for r in rows}
    assert by_name["right"][:3] == ("5", "100.0", "100.0")
    assert float(by_name["right"][4]) == pytest.approx(1.0)
    assert by_name["wrong"][:3] == ("5", "100.0", "0.0")
    assert 0 < float(by_name["wrong"][3]) < 100 and float(by_name["wrong"][4]) < 0.5
