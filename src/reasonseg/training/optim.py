"""AdamW over the trainable parameters and LISA's schedule: linear warm-up, then linear decay to zero."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["OptimConfig", "build_optimizer", "build_scheduler", "warmup_linear_factor"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and schedule settings (LISA: lr 3e-4, wd 0, betas (0.9, 0.95), 100 warm-up steps, clip 1.0).

    ``total_steps`` counts optimiser steps (after gradient accumulation).
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    total_steps: int = 5000
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0,1), got {self.betas!r}")
        if self.total_steps < 1:
            raise ValueError(f"optim.total_steps must be >= 1, got {self.total_steps!r}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"optim.warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps!r}"
            )
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip!r}")


def warmup_linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate before optimiser step ``step`` (0-based).

    Rises linearly from 1/warmup_steps to 1 over the first ``warmup_steps`` steps, then falls linearly
    to 0 at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = total_steps - step
    span = max(1, total_steps - warmup_steps)
    return max(0.0, remaining / span)


def build_optimizer(
    params: Iterable[nn.Parameter], config: OptimConfig, *, no_decay: Iterable[nn.Parameter] = ()
) -> torch.optim.AdamW:
    """AdamW over ``params`` (only those with ``requires_grad``; each parameter once, by identity).

    Parameters in ``no_decay`` get weight decay 0: that is required for tensors of which only some rows
    are trained (the new tokens' embedding rows), since decoupled decay would otherwise shrink the
    frozen rows too.
    """
    skip = {id(p) for p in no_decay}
    seen: set[int] = set()
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (plain if id(p) in skip else decay).append(p)
    if not seen:
        raise ValueError("build_optimizer: no trainable parameter (check the freeze policy)")
    groups = [g for g in ({"params": decay}, {"params": plain, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then linear decay, stepped once per optimiser step."""
    warmup, total = config.warmup_steps, config.total_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_linear_factor(step, warmup, total)
    )
