"""SAM's mask decoder: image embedding + prompt tokens -> low-res mask logits and IoU predictions.

Parameter names match Meta's ``segment_anything``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from reasonseg.model.sam.common import LayerNorm2d
from reasonseg.model.sam.transformer import TwoWayTransformer

__all__ = ["MLP", "MaskDecoder"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between: [..., in] -> [..., out]."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nn.Module):
    """Predicts ``1 + num_multimask_outputs`` masks per prompt and a quality (IoU) score for each.

    Mask 0 is the single-mask output; masks 1.. are the multimask (ambiguity-resolving) outputs.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for N prompts.

        Args:
            image_embeddings: [1, C, h, w] (shared by all prompts, as in Meta's code) or [N, C, h, w].
            image_pe: [1, C, h, w] from ``PromptEncoder.get_dense_pe()``.
            sparse_prompt_embeddings: [N, T, C]; dense_prompt_embeddings: [N, C, h, w] (or [1, ...]).
            multimask_output: return the 3 multimask outputs instead of the single mask.
        Returns:
            low_res_masks [N, M, 4h, 4w] logits and iou_pred [N, M], M = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks [N, K, 4h, 4w] and scores [N, K]; see ``forward``."""
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # [1+K, C]
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)

        src = _per_prompt(image_embeddings, n, "image_embeddings") + dense_prompt_embeddings
        pos_src = _per_prompt(image_pe, n, "image_pe")
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # [N, K, C]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # [N, C/8, 4h, 4w]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # [N, K, C/8]
        b, c8, uh, uw = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c8, uh * uw)).view(b, -1, uh, uw)
        return masks, self.iou_prediction_head(iou_token_out)


def _per_prompt(x: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Broadcast a [1, C, h, w] map to n prompts; pass an [n, C, h, w] map through."""
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, -1, -1, -1)
    raise ValueError(f"MaskDecoder: {name} has batch {x.shape[0]}, expected 1 or the number of prompts ({n})")
