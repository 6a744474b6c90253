"""The vision-to-language projector: image features [B,N,C] -> LM input embeddings [B,N,H]."""

from __future__ import annotations

import torch
from torch import nn

from reasonseg.model.config import ProjectorConfig

__all__ = ["Projector"]


class Projector(nn.Module):
    """``linear``: one Linear(C,H) (LISA v1); ``mlp2x_gelu``: Linear(C,H)-GELU-Linear(H,H) (LLaVA-1.5).

    The layers live in ``self.layers`` (an ``nn.Sequential``), so the weights are ``layers.0.*``
    (and ``layers.2.*`` for the MLP).
    """

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        if config.kind == "linear":
            self.layers = nn.Sequential(nn.Linear(config.in_dim, config.out_dim))
        else:
            self.layers = nn.Sequential(
                nn.Linear(config.in_dim, config.out_dim), nn.GELU(), nn.Linear(config.out_dim, config.out_dim)
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B,N,C] -> [B,N,H]."""
        return self.layers(features)
