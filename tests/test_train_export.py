"""`reasonseg export`: LoRA merged into a standalone directory that LisaModel.from_pretrained loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reasonseg.cli import main
from reasonseg.training.recipe import recipe_from_dict
from reasonseg.training.trainer import Trainer
from train_support import make_samples


@pytest.mark.slow
def test_export_merges_lora_and_loads_standalone(tmp_path: Path) -> None:
    from peft.tuners.lora import LoraLayer

    from reasonseg.model.lisa import LisaModel

    run = tmp_path / "run"
    recipe = recipe_from_dict(
        {
            "model": {"preset": "lisa-mobile", "tiny": True},
            "freeze": {"train_projector": True, "lora": {"dropout": 0.0}},
            "optim": {"lr": 2e-2, "warmup_steps": 0, "total_steps": 4},
            "train": {"output_dir": str(run), "micro_batch_size": 2, "progress_bar": False, "num_threads": 1},
        }
    )
    samples = make_samples(2)
    trainer = Trainer(recipe, dataset=samples)  # model and LisaCollator built from the recipe
    trainer.fit()
    trained = trainer.model.eval()
    batch = trainer.collate(samples)
    with torch.no_grad():
        ref = trained(batch)

    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    # A second export into the now non-empty folder is refused unless forced; other files stay.
    (out / "README.md").write_text("model card")
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert (out / "README.md").read_text() == "model card"
    loaded = LisaModel.from_pretrained(out)
    assert not any(isinstance(m, LoraLayer) for m in loaded.modules())
    with torch.no_grad():
        got = loaded(batch)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(got.masks, ref.masks, strict=True):
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-3)
    # The [SEG] rows were trained: the export differs from a fresh model there.
    fresh = LisaModel.from_preset("lisa-mobile", tiny=True)
    seg = loaded.seg_token_id
    emb = loaded.mllm.lm.get_input_embeddings().weight
    assert not torch.equal(emb[seg], fresh.mllm.lm.get_input_embeddings().weight[seg])
