"""Checkpoints: atomic on disk (a kill never leaves one that looks complete) and an exact round trip."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reasonseg.training.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    capture_rng_state,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from reasonseg.training.optim import OptimConfig, build_optimizer, build_scheduler


def _toy() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=20)
    opt = build_optimizer(model.parameters(), cfg)
    return model, opt, build_scheduler(opt, cfg)


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    x = torch.randn(3, 4)  # draws from the torch RNG, so RNG restore matters
    loss = model(x).pow(2).mean() + float(np.random.rand()) * 0 + random.random() * 0
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _save(root: Path, step: int, model: nn.Module, opt, sched, **kw) -> Path:
    return save_checkpoint(
        root,
        step,
        trainable=dict(model.named_parameters()),
        optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(),
        trainer_state={"data_position": step * 3},
        **kw,
    )


def test_round_trip_continues_exactly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model, opt, sched = _toy()
    for _ in range(3):
        _step(model, opt, sched)
    ckpt = _save(tmp_path, 3, model, opt, sched)
    for _ in range(4):
        _step(model, opt, sched)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # a different process state, as after a restart
    model2, opt2, sched2 = _toy()
    loaded = load_checkpoint(ckpt)
    model2.load_state_dict(loaded.trainable)
    opt2.load_state_dict(loaded.optimizer_state)
    sched2.load_state_dict(loaded.scheduler_state)
    restore_rng_state(loaded.rng_state)
    assert loaded.step == 3 and loaded.trainer_state["data_position"] == 9
    for _ in range(4):
        _step(model2, opt2, sched2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == a


def test_failure_before_marker_leaves_nothing_complete(tmp_path: Path) -> None:
    model, opt, sched = _toy()
    _save(tmp_path, 1, model, opt, sched)

    def crash() -> None:
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2, model, opt, sched, after_shared_files=crash)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    # The next save cleans the leftover temporary directory.
    _save(tmp_path, 3, model, opt, sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000003"]


def test_damaged_checkpoints_are_not_complete(tmp_path: Path) -> None:
    model, opt, sched = _toy()
    good = _save(tmp_path, 5, model, opt, sched)
    assert is_complete(good)
    # Truncated file: the marker's size no longer matches.
    with open(good / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    assert not is_complete(good)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(good)
    # A directory with the final name but no marker (e.g. copied by hand half-way).
    (tmp_path / "step-00000007").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_keep_last_and_world_size_check(tmp_path: Path) -> None:
    model, opt, sched = _toy()
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, model, opt, sched, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    with pytest.raises(CheckpointError, match="written by 1 processes, resuming with 2"):
        load_checkpoint(tmp_path / "step-00000004", world_size=2)
    info = json.loads((tmp_path / "step-00000004" / COMPLETE_MARKER).read_text())
    assert set(info["files"]) == {
        "trainable.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng-rank00000.pt",
    }


_SAVER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from reasonseg.training.checkpoint import save_checkpoint
    root = Path(sys.argv[1])
    big = {"w": torch.randn(2_000_000)}          # 8 MB: a save takes long enough to be interrupted
    step = 0
    print("ready", flush=True)
    while True:
        step += 1
        save_checkpoint(root, step, trainable=big, optimizer_state={"state": {}, "x": big["w"]},
                        scheduler_state={}, trainer_state={}, keep_last=3)
    """
)


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_a_complete_looking_partial(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    rng = random.Random(0)
    for attempt in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(root)],
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(0.3 + rng.random() * 0.7)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for d in root.iterdir():
            if d.name.startswith("step-") and (d / COMPLETE_MARKER).exists():
                # Every directory that claims completeness loads in full.
                loaded = load_checkpoint(d)
                assert loaded.trainable["w"].numel() == 2_000_000, (attempt, d)
        assert latest_checkpoint(root) is not None


def _trainer_recipe(out: Path, dropout: float, total_steps: int = 3, **overrides: object):  # type: ignore[no-untyped-def]
    """A tiny lisa-mobile recipe on the toy samples of ``train_support`` (one thread, no progress bar)."""
    from reasonseg.training.recipe import recipe_from_dict

    data: dict = {
        "model": {"preset": "lisa-mobile", "tiny": True, "load_base_weights": False},
        "data": {
            "datasets": [{"kind": "callable", "target": "train_support:toy_dataset", "options": {"n": 6}}],
            "collate": "train_support:collator_for",
        },
        "freeze": {"train_projector": True, "lora": {"dropout": dropout}},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "total_steps": total_steps},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 2,
            "checkpoint_every": 1,
            "keep_checkpoints": None,
            "progress_bar": False,
            "num_threads": 1,
        },
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        data[section][name] = value
    return recipe_from_dict(data)


@pytest.mark.usefixtures("fresh_accelerator_state")
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_trainer_resume_is_bit_exact_with_lora_dropout(tmp_path: Path, dropout: float) -> None:
    """Interrupted after step 2 and resumed: every later step's loss and grad norm equal the uninterrupted
    run's exactly, LoRA dropout (which draws from torch's global RNG every forward) included. Building
    the data loader's iterator must not draw from the restored RNG stream."""
    from accelerate.state import AcceleratorState

    from reasonseg.training.trainer import Trainer

    clean = Trainer(_trainer_recipe(tmp_path / "clean", dropout)).fit()
    AcceleratorState._reset_state()
    first = Trainer(_trainer_recipe(tmp_path / "cut", dropout)).fit(max_steps=2)
    assert first.steps == 2
    AcceleratorState._reset_state()
    torch.manual_seed(987)  # a different process state, as after a restart
    resumed = Trainer(_trainer_recipe(tmp_path / "cut", dropout)).fit(resume=True)
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step-00000002"
    got = [(h.step, h.loss, h.grad_norm, h.lr) for h in resumed.history]
    want = [(h.step, h.loss, h.grad_norm, h.lr) for h in clean.history]
    assert got == want


def test_recipe_changes_name_dotted_fields_and_only_safe_ones_pass() -> None:
    from reasonseg.training.trainer import check_resume_recipe, recipe_changes

    old = {"optim": {"lr": 0.01, "total_steps": 4}, "data": {"datasets": [{"path": "a"}]}, "train": {}}
    new = {"optim": {"lr": 1, "total_steps": 7}, "data": {"datasets": [{"path": "b"}, {"path": "c"}]}}
    assert recipe_changes(old, new) == {
        "data.datasets[0].path": ("a", "b"),
        "data.datasets[1].path": ("<absent>", "c"),
        "optim.lr": (0.01, 1),
        "optim.total_steps": (4, 7),
        "train": ({}, "<absent>"),
    }
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.01 -> 1; ") as err:
        check_resume_recipe(old, new, where="runs/x")
    assert "total_steps: 4 -> 7" not in str(err.value)  # safe: not listed among the refused changes
    safe = {"optim": {"lr": 0.01, "total_steps": 9}, "data": {"datasets": [{"path": "a"}]}, "train": {}}
    assert check_resume_recipe(old, safe, where="runs/x") == {"optim.total_steps": (4, 9)}


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_resume_with_a_changed_recipe_is_refused_and_keeps_the_recipe_file(tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState

    from reasonseg.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(_trainer_recipe(run, 0.05, total_steps=4)).fit(max_steps=2)
    saved = (run / "recipe.yaml").read_text()
    AcceleratorState._reset_state()
    changed = _trainer_recipe(run, 0.05, total_steps=7, optim__lr=1.0, train__micro_batch_size=1)
    with pytest.raises(ValueError) as err:
        Trainer(changed).fit(resume=True)
    message = str(err.value)
    assert "optim.lr: 0.01 -> 1.0" in message and "train.micro_batch_size: 2 -> 1" in message
    assert "optim.total_steps" in message  # named among the fields that may change, not as a refusal
    assert "optim.total_steps: 4 -> 7" not in message
    assert (run / "recipe.yaml").read_text() == saved  # never overwritten with values not used
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000001", "step-00000002"]


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_resume_of_a_finished_run_and_extending_total_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from accelerate.state import AcceleratorState

    from reasonseg.training.optim import warmup_linear_factor
    from reasonseg.training.trainer import Trainer

    run = tmp_path / "run"
    first = Trainer(_trainer_recipe(run, 0.05, total_steps=2)).fit()
    assert first.history[-1].step == 2
    capsys.readouterr()
    AcceleratorState._reset_state()
    again = Trainer(_trainer_recipe(run, 0.05, total_steps=2)).fit(resume=True)
    assert again.steps == 2 and again.final_checkpoint == run / "checkpoints" / "step-00000002"
    assert "already finished at step 2 of optim.total_steps=2" in capsys.readouterr().err
    # total_steps extended (safe on resume): step 3 runs at the new schedule's lr, not the old one's 0
    AcceleratorState._reset_state()
    longer = Trainer(_trainer_recipe(run, 0.05, total_steps=4, train__checkpoint_every=5)).fit(resume=True)
    assert [h.step for h in longer.history] == [1, 2, 3, 4]
    assert longer.history[2].lr == 1e-2 * warmup_linear_factor(2, 1, 4) > 0
    assert longer.history[3].lr == 1e-2 * warmup_linear_factor(3, 1, 4)
    assert "total_steps: 4" in (run / "recipe.yaml").read_text()  # the values now in use
    AcceleratorState._reset_state()
    with pytest.raises(ValueError, match=r"at step 4, beyond optim.total_steps=3"):
        Trainer(_trainer_recipe(run, 0.05, total_steps=3)).fit(resume=True)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_resume_compares_with_recipe_yaml_when_the_checkpoint_has_no_recipe(tmp_path: Path) -> None:
    """Checkpoints written before they recorded their recipe: the run's recipe.yaml is the reference,
    its missing fields at their defaults."""
    import yaml
    from accelerate.state import AcceleratorState

    from reasonseg.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(_trainer_recipe(run, 0.05, total_steps=3)).fit(max_steps=1)
    state_file = run / "checkpoints" / "step-00000001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["recipe"]
    text = json.dumps(state)
    state_file.write_text(text[:-1] + " " * (state_file.stat().st_size - len(text)) + "}")  # same size
    data = yaml.safe_load((run / "recipe.yaml").read_text())
    del data["train"]["head_init_samples"]  # as if written before that field existed
    (run / "recipe.yaml").write_text(yaml.safe_dump(data))
    AcceleratorState._reset_state()
    with pytest.raises(ValueError, match=r"optim\.warmup_steps: 1 -> 0"):
        Trainer(_trainer_recipe(run, 0.05, total_steps=3, optim__warmup_steps=0)).fit(resume=True)
    AcceleratorState._reset_state()
    assert Trainer(_trainer_recipe(run, 0.05, total_steps=3)).fit(resume=True).steps == 3
