"""The tiny LISA model overfits 4 examples: teacher-forced mask IoU >= 0.9 (bench/bench_train.py times it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reasonseg.training.recipe import recipe_from_dict
from reasonseg.training.trainer import Trainer, build_model
from train_support import collator_for, make_samples  # tests/ is on sys.path under pytest

OVERFIT_RECIPE = {
    "model": {"preset": "lisa-mobile", "tiny": True},
    "freeze": {"train_projector": True, "lora": {"dropout": 0.0}},
    "optim": {"lr": 2e-2, "warmup_steps": 0, "total_steps": 150},
    "train": {"micro_batch_size": 4, "checkpoint_every": 1000, "progress_bar": False, "num_threads": 1},
}


def mask_ious(model: torch.nn.Module, batch: object) -> list[float]:
    """Teacher-forced IoU of each sample's single target (prediction: logit > 0)."""
    model.eval()
    with torch.no_grad():
        out = model(batch)
    ious = []
    for pred, gt in zip(out.masks, batch.masks, strict=True):  # type: ignore[attr-defined]
        p, g = pred.logits[0] > 0, gt[0].bool()
        ious.append(float((p & g).sum()) / max(float((p | g).sum()), 1.0))
    return ious


@pytest.mark.slow
def test_tiny_model_overfits_four_examples(tmp_path: Path) -> None:
    recipe = recipe_from_dict(OVERFIT_RECIPE).replace(
        train={"output_dir": str(tmp_path / "run"), "encoder_cache": str(tmp_path / "cache")}
    )
    model = build_model(recipe.model)
    samples = make_samples(4)
    collate = collator_for(model)
    trainer = Trainer(recipe, model=model, dataset=samples, collate=collate)
    before = mask_ious(model, collate(samples))
    result = trainer.fit()
    after = mask_ious(model, collate(samples))
    assert result.steps == 150
    assert sum(after) / 4 >= 0.9, (before, after)
    assert min(after) >= 0.8, after
    assert result.history[-1].loss < 0.7 * result.history[0].loss
    # The encoder cache served every image after the first step.
    assert trainer.cache is not None and trainer.cache.stats.misses == 4
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    assert any((tmp_path / "run" / "tensorboard").iterdir())
