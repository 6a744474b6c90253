"""AdamW setup and the warm-up + linear-decay schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reasonseg.training.optim import OptimConfig, build_optimizer, build_scheduler, warmup_linear_factor


def test_schedule_warms_up_then_decays_to_zero() -> None:
    factors = [warmup_linear_factor(s, 4, 12) for s in range(13)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4:] == pytest.approx([1.0 - i / 8 for i in range(9)])
    assert warmup_linear_factor(50, 4, 12) == 0.0
    assert warmup_linear_factor(0, 0, 10) == 1.0


def test_scheduler_drives_the_optimizer_lr() -> None:
    model = nn.Linear(3, 1)
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=6)
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_optimizer_skips_frozen_dedups_tied_and_no_decay_group() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight.requires_grad_(False)
    cfg = OptimConfig(weight_decay=0.1)
    opt = build_optimizer([a.weight, a.weight, a.bias, b.weight, b.bias], cfg, no_decay=[a.bias])
    groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
    assert groups == [[id(a.weight), id(b.bias)], [id(a.bias)]]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer([b.weight], cfg)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="betas"):
        OptimConfig(betas=(0.9, 1.5))
    assert OptimConfig(betas=[0.9, 0.95]).betas == (0.9, 0.95)  # type: ignore[arg-type]
    torch.manual_seed(0)
