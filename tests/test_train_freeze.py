"""The freeze policy, piece by piece, on the tiny LISA model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reasonseg.training.freeze import (
    LoraSettings,
    apply_lisa_freeze_policy,
    apply_lora,
    find_lora_targets,
    freeze_all,
    freeze_sam_encoders,
    freeze_vision_tower,
    mark_trainable,
    merge_lora,
    set_frozen_eval,
)
from reasonseg.training.optim import OptimConfig, build_optimizer


@pytest.fixture(scope="module")
def tiny_lisa_7b() -> nn.Module:
    from reasonseg.model.lisa import LisaModel

    return LisaModel.from_preset("lisa-7b-v1", tiny=True)


@pytest.fixture
def model(tiny_lisa_7b: nn.Module) -> nn.Module:
    return copy.deepcopy(tiny_lisa_7b).train()


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def test_encoders_frozen_and_heads_trained(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_vision_tower(model.mllm)
    freeze_sam_encoders(model)
    assert not _trainable(model.mllm.vision_tower) and not _trainable(model.mllm.projector)
    assert not _trainable(model.sam.image_encoder) and not _trainable(model.sam.prompt_encoder)
    assert _trainable(model.sam.mask_decoder)

    plan = apply_lisa_freeze_policy(model, LoraSettings())
    assert all(p.requires_grad for p in model.text_hidden_fcs.parameters())
    assert all(p.requires_grad for p in model.sam.mask_decoder.parameters())
    assert not _trainable(model.sam.image_encoder) and not _trainable(model.mllm.vision_tower)
    names = set(plan.full)
    assert all(p.requires_grad == (n in names or n in plan.rows) for n, p in model.named_parameters())
    # The LM body is frozen apart from LoRA; projector stays frozen unless asked.
    lm_full = [n for n in names if n.startswith("mllm.lm.")]
    assert lm_full and all(".lora_A." in n or ".lora_B." in n for n in lm_full)
    assert not _trainable(model.mllm.projector)


def test_the_head_can_be_kept_frozen() -> None:
    from reasonseg.model import LisaModel

    m = LisaModel.from_preset("lisa-mobile", tiny=True)
    plan = apply_lisa_freeze_policy(m, LoraSettings(r=0), train_head=False)
    assert not _trainable(m.text_hidden_fcs) and _trainable(m.sam.mask_decoder)
    assert not any(n.startswith("text_hidden_fcs.") for n in plan.full)


def test_lora_goes_only_on_the_lm_q_and_v(model: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    apply_lisa_freeze_policy(model, LoraSettings(r=4, targets=("q_proj", "v_proj")))
    lora_layers = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    n_layers = model.mllm.lm.config.num_hidden_layers
    assert len(lora_layers) == 2 * n_layers
    assert all(n.startswith("mllm.lm.") and n.rsplit(".", 1)[1] in ("q_proj", "v_proj") for n in lora_layers)
    # CLIP's attention has q_proj/v_proj too: untouched.
    assert not any(isinstance(m, LoraLayer) for m in model.mllm.vision_tower.modules())


def test_targets_are_exact_child_names() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(4, 4)
            self.q_proj_extra = nn.Linear(4, 4)
            self.inner = nn.Sequential(nn.Linear(4, 4))

    root = nn.Sequential(Block(), Block())
    assert find_lora_targets(root, ["q_proj"]) == ["0.q_proj", "1.q_proj"]
    with pytest.raises(ValueError, match=r"no nn\.Linear child"):
        find_lora_targets(root, ["k_proj"])


def test_only_new_token_rows_change(model: nn.Module) -> None:
    plan = apply_lisa_freeze_policy(model, LoraSettings())
    emb = model.mllm.lm.get_input_embeddings().weight
    head = model.mllm.lm.get_output_embeddings().weight
    assert emb is not head  # the tiny lisa-7b preset has an untied head
    new = model.slot_token_ids()
    before_emb, before_head = emb.detach().clone(), head.detach().clone()
    opt = build_optimizer(
        plan.parameters(), OptimConfig(lr=0.1, weight_decay=0.1), no_decay=plan.row_params()
    )
    ids = torch.randint(0, emb.shape[0], (2, 12))
    ids[:, 5] = new[0]
    for _ in range(2):
        logits = model.mllm.lm(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        assert emb.grad is not None and head.grad is not None
        old = torch.ones(emb.shape[0], dtype=torch.bool)
        old[new] = False
        assert emb.grad[old].abs().max() == 0 and head.grad[old].abs().max() == 0
        opt.step()
        opt.zero_grad()
    old = torch.ones(emb.shape[0], dtype=torch.bool)
    old[new] = False
    assert torch.equal(emb.detach()[old], before_emb[old]) and torch.equal(
        head.detach()[old], before_head[old]
    )
    assert not torch.equal(emb.detach()[new[0]], before_emb[new[0]])
    assert not torch.equal(head.detach()[new], before_head[new])


def test_tied_embedding_is_one_row_tensor() -> None:
    from reasonseg.model.lisa import LisaModel

    mobile = LisaModel.from_preset("lisa-mobile", tiny=True)
    plan = apply_lisa_freeze_policy(mobile, LoraSettings(), train_projector=True)
    assert len(plan.rows) == 1 and len(plan.hooks) == 1
    assert all(p.requires_grad for p in mobile.mllm.projector.parameters())


def test_plan_state_dict_holds_only_trained_values(model: nn.Module) -> None:
    plan = apply_lisa_freeze_policy(model, LoraSettings())
    state = plan.state_dict()
    (row_name,) = [k for k in state if k.endswith("@rows") and "embed_tokens" in k]
    assert state[row_name].shape[0] == len(model.slot_token_ids())
    assert sum(v.numel() for v in state.values()) < sum(p.numel() for p in model.parameters()) / 4
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(1.0)
    plan.load_state_dict(state)  # back to the saved values
    for k, v in plan.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(KeyError, match="missing"):
        plan.load_state_dict({k: v for k, v in state.items() if k != row_name})


def test_merge_lora_restores_plain_layers_and_keeps_outputs(model: nn.Module) -> None:
    keys_before = set(model.state_dict())
    apply_lora(model.mllm.lm, LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)  # make the adapters matter
    model.eval()
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        ref = model.mllm.lm(input_ids=ids).logits
        assert merge_lora(model) == 2 * model.mllm.lm.config.num_hidden_layers
        merged = model.mllm.lm(input_ids=ids).logits
    assert set(model.state_dict()) == keys_before
    torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-4)


def test_frozen_modules_switch_to_eval(model: nn.Module) -> None:
    plan = mark_trainable(model, modules=[model.text_hidden_fcs], row_tensors=[], new_token_ids=[])
    assert plan.num_trainable() == sum(p.numel() for p in model.text_hidden_fcs.parameters())
    model.train()
    switched = set_frozen_eval(model)
    assert "sam" in switched and not model.sam.training
    assert model.text_hidden_fcs.training
    freeze_all(model)
    assert not _trainable(model)
