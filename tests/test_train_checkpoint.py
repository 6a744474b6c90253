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
