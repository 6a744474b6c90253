"""bench/ablation_query_blindness.py long-head runs end to end on the tiny lisa-mobile and a small
synthetic world: slot states are extracted once, the head and mask decoder take steps, and the test
split's mean IoU and pair IoU are printed. Only that it runs and prints sane values is asserted."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_long_head_runs_on_the_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ablation_query_blindness as abl
    from reasonseg.data.synth import WorldConfig, generate_world, render

    if not render.font_path().is_file():
        pytest.skip("needs fonts-noto-color-emoji")
    world = tmp_path / "world"
    generate_world(WorldConfig(n=40, seed=3, split_fractions=(0.5, 0.2, 0.3)), world, workers=1)
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
    n = torch.get_num_threads()
    try:
        abl.main(
            f"long-head --recipe {path} --world {world} --train-samples 6 --steps 2 --batch-size 2 "
            "--threads 1 --eval-every 1".split()
        )
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert re.search(r"slots: \d+ train on \d+ images, \d+ test", out)
    steps = re.findall(r"step (\d+): BCE ([\d.]+) Dice ([\d.]+) .*mean IoU ([\d.]+), pair IoU ([\d.]+)", out)
    assert [s[0] for s in steps] == ["1", "2"]
    for _, bce, dice, iou, pair in steps:
        assert math.isfinite(float(bce)) and 0 <= float(dice) <= 1
        assert 0 <= float(iou) <= 1 and 0 <= float(pair) <= 1
