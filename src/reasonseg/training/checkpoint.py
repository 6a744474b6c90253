"""Crash-safe training checkpoints.

Layout of one checkpoint (``<output>/checkpoints/step-00000100/``)::

    trainable.safetensors   the trainable parameters only (the "model delta"; partly trained tensors
                            hold just their trained rows, see ``freeze.trainable_state_dict``)
    optimizer.pt            optimizer.state_dict()
    scheduler.pt            lr scheduler state_dict()
    trainer_state.json      step, data position, anything the trainer needs to continue exactly
    rng-rank00000.pt        python / numpy / torch (and CUDA) RNG states of each process
    COMPLETE                written last: JSON with the step and the size of every file above

How a kill at any moment is made harmless: everything is written into a hidden temporary directory
(``.tmp-step-00000100``), every file is fsynced, the ``COMPLETE`` marker is written and fsynced last,
then the directory is renamed to its final name (an atomic ``rename`` on POSIX) and the parent directory
fsynced. A reader accepts only directories with the final name *and* a marker whose listed files exist
with the listed sizes, so a half-written checkpoint never looks complete; a leftover temporary directory
is removed by the next save.

With several processes, rank 0 writes the shared files and every rank its own RNG file; ``barrier`` (the
accelerator's ``wait_for_everyone``) orders the steps.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointError",
    "LoadedCheckpoint",
    "capture_rng_state",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_trainable",
    "restore_rng_state",
    "save_checkpoint",
]

COMPLETE_MARKER = "COMPLETE"
_NAME = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or inconsistent; the message names it."""


def capture_rng_state() -> dict[str, Any]:
    """RNG states of this process: python ``random``, numpy's global generator, torch CPU and CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _rng_name(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after optimiser step ``step``."""
    return f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    """True when ``path`` is a finished checkpoint: final name, marker present, listed files intact."""
    path = Path(path)
    if not _NAME.match(path.name) or not path.is_dir():
        return False
    marker = path / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text())
        files: dict[str, int] = info["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    done = list_checkpoints(root)
    return done[-1] if done else None


def _remove(path: Path) -> None:
    """Delete a checkpoint so that no moment shows it half-deleted under its final name: rename it to a
    temporary name first (atomic), then delete that."""
    doomed = path.with_name(f"{_TMP_PREFIX}old-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _noop() -> None:
    return None


def save_checkpoint(
    root: Path,
    step: int,
    *,
    trainable: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = _noop,
    keep_last: int | None = None,
    after_shared_files: Callable[[], None] | None = None,
    extra_writer: Callable[[Path], None] | None = None,
) -> Path:
    """Write one checkpoint atomically; every process calls this with its own ``rank``.

    Args:
        root: directory that holds the checkpoints (created if needed).
        step: optimiser steps done; names the checkpoint.
        trainable: name -> tensor of the trained parameters (rank 0's is written).
        optimizer_state / scheduler_state: ``state_dict()`` of each (rank 0's is written).
        trainer_state: JSON-serialisable dict (step, data position, ...).
        barrier: called between phases so that all ranks finish a phase before the next one.
        keep_last: when set, older complete checkpoints beyond this many are deleted after the save.
        after_shared_files: test hook called on rank 0 after the shared files and before the marker.
        extra_writer: called on every rank with the temporary directory, for state only a distributed
            engine can write (DeepSpeed / FSDP shards via ``accelerator.save_state``).

    Returns:
        The final checkpoint directory.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP_PREFIX}{checkpoint_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()

    _torch_save(capture_rng_state(), tmp / _rng_name(rank))
    if extra_writer is not None:
        extra_writer(tmp)
    if rank == 0:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()}
        save_file(tensors, str(tmp / "trainable.safetensors"), metadata={"step": str(step)})
        _fsync_file(tmp / "trainable.safetensors")
        _torch_save(dict(optimizer_state), tmp / "optimizer.pt")
        _torch_save(dict(scheduler_state), tmp / "scheduler.pt")
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump({"step": step, "world_size": world_size, **trainer_state}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    barrier()

    if rank == 0:
        if after_shared_files is not None:
            after_shared_files()
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        for sub in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}):
            _fsync_dir(sub)
        missing = [_rng_name(r) for r in range(world_size) if _rng_name(r) not in files]
        if missing:
            raise CheckpointError(f"{tmp}: RNG files missing for {missing}")
        with open(tmp / COMPLETE_MARKER, "w") as f:
            json.dump({"step": step, "world_size": world_size, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        if keep_last is not None and keep_last > 0:
            for old in list_checkpoints(root)[:-keep_last]:
                _remove(old)
    barrier()
    return final


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns for one process."""

    path: Path
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    trainer_state: dict[str, Any]
    rng_state: dict[str, Any]


def load_checkpoint(path: Path, *, rank: int = 0, world_size: int = 1) -> LoadedCheckpoint:
    """Read a complete checkpoint for process ``rank``; raises CheckpointError naming what is wrong."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (missing or damaged {COMPLETE_MARKER})")
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    saved_world = int(trainer_state.get("world_size", 1))
    if saved_world != world_size:
        raise CheckpointError(
            f"{path}: written by {saved_world} processes, resuming with {world_size}; an exact resume "
            "needs the same number of processes"
        )
    rng_file = path / _rng_name(rank)
    if not rng_file.is_file():
        raise CheckpointError(f"{path}: no RNG state for rank {rank} ({rng_file.name})")
    # Our own files: they hold numpy RNG arrays and python tuples, hence weights_only=False.
    return LoadedCheckpoint(
        path=path,
        step=int(trainer_state["step"]),
        trainable=load_file(str(path / "trainable.safetensors")),
        optimizer_state=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        scheduler_state=torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False),
        trainer_state=trainer_state,
        rng_state=torch.load(rng_file, map_location="cpu", weights_only=False),
    )


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    """Only the trained parameters of a complete checkpoint (for export; any process count)."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (missing or damaged {COMPLETE_MARKER})")
    return load_file(str(path / "trainable.safetensors"))
