"""SAM's prompt encoder: points and boxes -> sparse tokens, a low-res mask -> a dense map.

Coordinates are in the model's input frame (after ``SamTransform.apply_coords``), pixels, (x, y).
Parameter names match Meta's ``segment_anything``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reasonseg.model.sam.common import LayerNorm2d, memoised

__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) with a fixed random Gaussian frequency matrix (a checkpoint buffer)."""

    positional_encoding_gaussian_matrix: torch.Tensor

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """[..., 2] coordinates in [0, 1] -> [..., 2 * num_pos_feats] (sin then cos), in the buffer's dtype.

        The phases are computed in float32 whatever the model's dtype: a bf16 product would put errors
        of a tenth of a radian into the high frequencies."""
        gauss = self.positional_encoding_gaussian_matrix
        proj = (2 * coords.float() - 1) @ gauss.float()
        proj = 2 * math.pi * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1).to(gauss.dtype)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (h, w) grid: [C, h, w]."""
        h, w = size
        dev = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [h, w, 2] as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[B, N, 2] pixel coordinates (x, y) in an image of ``image_size`` (h, w) -> [B, N, C]."""
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]], dtype=torch.float32)
        return self._encode(coords.float() * scale)


class PromptEncoder(nn.Module):
    """Embeds point, box and mask prompts for the mask decoder.

    Args:
        embed_dim: token width (256 in SAM).
        image_embedding_size: (h, w) of the image embedding (64x64 for 1024 input).
        input_image_size: (H, W) of the padded model input (1024x1024).
        mask_in_chans: hidden channels of the mask downscaler.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: [1, embed_dim, h, w].

        It depends only on the frozen frequency buffer, so it is computed once (about 2 ms on a CPU
        core, paid on every mask decode otherwise) and recomputed when the buffer changes (load,
        in-place edit, device or dtype move). Under autograd it is always recomputed.
        """
        size = tuple(self.image_embedding_size)
        buf = self.pe_layer.positional_encoding_gaussian_matrix
        return memoised(self, "_dense_pe", buf, lambda: self.pe_layer(size).unsqueeze(0), extra=size)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """[B, N, 2] points, [B, N] labels (1 fg, 0 bg, -1 padding) -> [B, N (+1 if pad), C]."""
        points = points.float() + 0.5  # pixel centres
        labels = labels.to(points.device)
        if pad:
            # Without a box, a "not a point" token keeps the sparse prompt length the model was trained on.
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(lab == 0, self.point_embeddings[0].weight, 0.0)
        return emb + torch.where(lab == 1, self.point_embeddings[1].weight, 0.0)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """[B, 4] boxes (x0, y0, x1, y1) -> [B, 2, C] corner tokens."""
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_type = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])  # [2, C]
        return emb + corner_type

    def _batch_size(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: ([B, N, 2] coordinates (x, y), [B, N] labels) or None.
            boxes: [B, 4] (x0, y0, x1, y1) or None.
            masks: [B, 1, 4h, 4w] low-res mask logits or None.
        Returns:
            sparse [B, N', C] (points, then box corners) and dense [B, C, h, w].
        """
        bs = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        parts = [weight.new_empty(bs, 0, self.embed_dim)]
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
