"""Export a training run as a standalone model directory that ``LisaModel.from_pretrained`` loads.

The run's recipe (``<run>/recipe.yaml``, written by the trainer) rebuilds the starting model and the
same freeze plan (LoRA layers included); the checkpoint's trained tensors are copied in, the LoRA
adapters are merged into their base projections and removed, and the plain model is saved, either in
full or as a delta against the base weights named in its config.

    reasonseg export runs/lisa-mobile --out models/lisa-mobile-ft
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from reasonseg.training.checkpoint import CheckpointError, latest_checkpoint, load_trainable
from reasonseg.training.freeze import merge_lora
from reasonseg.training.recipe import load_recipe
from reasonseg.training.trainer import build_model

__all__ = ["ExportResult", "export_run"]


@dataclass
class ExportResult:
    """Where the model went, from which checkpoint, and how many LoRA layers were merged."""

    output_dir: Path
    checkpoint: Path
    merged_lora_layers: int


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    delta: bool = False,
    dtype: torch.dtype | None = None,
) -> ExportResult:
    """Merge a run's newest (or the given) checkpoint into a standalone ``save_pretrained`` directory.

    Args:
        run_dir: the recipe's ``train.output_dir`` (holds ``recipe.yaml`` and ``checkpoints/``).
        out_dir: where to write ``config.json`` + weights + tokenizer.
        checkpoint: a specific checkpoint directory; default the newest complete one.
        delta: write only the difference to the base weights (see ``LisaModel.save_pretrained``).
        dtype: storage dtype of a delta export (e.g. ``torch.float16``).
    """
    run = Path(run_dir)
    recipe = load_recipe(run / "recipe.yaml")
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"{run / 'checkpoints'}: no complete checkpoint to export")
    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)  # as the trainer does: randomly initialised frozen parts come out the same
    model = build_model(recipe.model)
    plan = recipe.freeze.apply(model)
    plan.load_state_dict(load_trainable(ckpt))
    for hook in plan.hooks:
        hook.remove()
    merged = merge_lora(model)
    model.requires_grad_(False)
    model.eval().save_pretrained(out_dir, delta=delta, dtype=dtype)
    return ExportResult(Path(out_dir), ckpt, merged)
