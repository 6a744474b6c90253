"""Through the real CLI: DDP on CPU equals one process, and kill -9 + --resume equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

TESTS = Path(__file__).parent


def _recipe(tmp: Path, name: str, **train: object) -> Path:
    data = {
        "model": {"preset": "lisa-mobile", "tiny": True},
        "data": {
            "datasets": [{"kind": "callable", "target": "train_support:toy_dataset", "options": {"n": 8}}],
            "collate": "train_support:collator_for",
        },
        # LoRA dropout draws different masks for a batch of 4 and two of 2: off for the comparison.
        "freeze": {"train_projector": True, "lora": {"dropout": 0.0}},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "total_steps": 5},
        "train": {
            "output_dir": str(tmp / name),
            "micro_batch_size": 4,
            "checkpoint_every": 100,
            "progress_bar": False,
            "num_threads": 1,
            **train,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}


def _losses(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "history.json").read_text())]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    one = _recipe(tmp_path, "one", micro_batch_size=4)
    two = _recipe(tmp_path, "two", micro_batch_size=2)
    cli = [sys.executable, "-m", "reasonseg.cli", "train"]
    subprocess.run([*cli, str(one)], check=True, env=_env(), timeout=300)
    # Two CPU processes: torchrun sets the rendezvous environment, accelerate's Accelerator reads it and
    # runs DDP over gloo (`accelerate launch --cpu` would start a single process on one machine).
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*launch, "-m", "reasonseg.cli", "train", str(two)], check=True, env=_env(), timeout=300)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)
    state = json.loads(
        (tmp_path / "two" / "checkpoints" / "step-00000005" / "trainer_state.json").read_text()
    )
    assert state["world_size"] == 2


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    settings = {"micro_batch_size": 2, "grad_accum": 2, "checkpoint_every": 2, "keep_checkpoints": None}
    total = {"optim": 10}
    clean = _recipe(tmp_path, "clean", **settings)
    killed = _recipe(tmp_path, "killed", **settings)
    for path in (clean, killed):
        data = yaml.safe_load(path.read_text())
        data["optim"]["total_steps"] = total["optim"]
        path.write_text(yaml.safe_dump(data))
    cli = [sys.executable, "-m", "reasonseg.cli", "train"]
    subprocess.run([*cli, str(clean)], check=True, env=_env(), timeout=300)

    proc = subprocess.Popen(
        [*cli, str(killed)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    marker = tmp_path / "killed" / "checkpoints" / "step-00000004" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"training ended before the kill: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = tmp_path / "killed" / "checkpoints"
    done = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert "step-00000010" not in done, "the kill must land before the end"
    subprocess.run([*cli, str(killed), "--resume"], check=True, env=_env(), timeout=300)

    final_clean = load_file(
        str(tmp_path / "clean" / "checkpoints" / "step-00000010" / "trainable.safetensors")
    )
    final_resumed = load_file(str(ckpts / "step-00000010" / "trainable.safetensors"))
    assert final_clean.keys() == final_resumed.keys()
    for k, v in final_clean.items():
        assert (v == final_resumed[k]).all(), k
    assert _losses(tmp_path / "clean") == _losses(tmp_path / "killed")
