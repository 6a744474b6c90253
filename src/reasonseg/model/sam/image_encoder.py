"""SAM's ViT image encoder (ViT-B/L/H): windowed and global attention with decomposed relative positions.

``[B, 3, L, L]`` pixels (normalised and padded, see ``reasonseg.data.transforms``) -> ``[B, out_chans,
L/16, L/16]`` embeddings. Parameter names match Meta's ``segment_anything`` (``patch_embed.proj``,
``pos_embed``, ``blocks.N.{norm1,attn.{qkv,proj,rel_pos_h,rel_pos_w},norm2,mlp.{lin1,lin2}}``, ``neck``).

Attention runs through ``scaled_dot_product_attention``; the decomposed relative-position term of
MViTv2/ViTDet (``q . R_h`` along rows plus ``q . R_w`` along columns) is folded into one additive bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reasonseg.model.sam.common import LayerNorm2d, MLPBlock, attention, linear

__all__ = ["Block", "ImageEncoderViT", "PatchEmbed", "ViTAttention", "window_partition", "window_unpartition"]


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: [B, C, H, W] -> [B, H/p, W/p, D] (channels last)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> ([B * nWin, window, window, C], (Hp, Wp)), zero-padding bottom/right to a multiple."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nWin, window, window, C] -> [B, H, W, C]."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1).transpose(2, 3)
    x = x.reshape(b, hp, wp, -1)
    return x[:, :h, :w] if (hp > h or wp > w) else x


def _relative_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings indexed by (query, key) offset: [q_size, k_size, C].

    ``rel_pos`` ([2*S-1, C]) is linearly resampled when the attention span differs from the one it was
    trained for, and coordinates are rescaled when query and key lengths differ (ViTDet's rule).
    """
    span = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != span:
        rel_pos = F.interpolate(rel_pos.T[None], size=span, mode="linear")[0].T
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_ratio
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_ratio
    offsets = (q_coords - k_coords) + (k_size - 1) * k_ratio
    return rel_pos[offsets.long()]


class ViTAttention(nn.Module):
    """Multi-head self-attention over a [B, H, W, C] grid, optionally with decomposed relative positions.

    Registered in ``Block`` as ``attn`` (Meta's class is called ``Attention``; only the parameter names
    matter for checkpoints).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViTAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("ViTAttention: input_size is required with use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        n = h * w
        # [B, N, 3, heads, d] -> 3 x [B, heads, N, d]
        q, k, v = (
            linear(x, self.qkv).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        bias = self._rel_pos_bias(q, (h, w)) if self.use_rel_pos else None
        out = attention(q, k, v, bias)  # [B, heads, N, d]
        return linear(out.transpose(1, 2).reshape(b, h, w, c), self.proj)

    def _rel_pos_bias(self, q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Additive bias [B, heads, N, N] from the (unscaled) queries: bias[(i,j),(k,l)] = q.Rh[i,k] + q.Rw[j,l]."""
        h, w = hw
        b, heads, n, d = q.shape
        rh = _relative_table(h, h, self.rel_pos_h).to(q.dtype)  # [h, h, d]
        rw = _relative_table(w, w, self.rel_pos_w).to(q.dtype)  # [w, w, d]
        qg = q.reshape(b * heads, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", qg, rh)  # [B*heads, h, w, h]
        rel_w = torch.einsum("bhwc,wkc->bhwk", qg, rw)  # [B*heads, h, w, w]
        bias = rel_h[..., :, None] + rel_w[..., None, :]  # [B*heads, h, w, h, w]
        return bias.reshape(b, heads, n, n)


class Block(nn.Module):
    """Pre-norm transformer block with windowed (``window_size > 0``) or global attention on [B, H, W, C]."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = ViTAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, H, W, C]."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            # Padding happens after the norm: padded tokens are zeros and take part in attention as
            # keys, exactly as in the original model.
            x, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return self.mlp(self.norm2(x), residual=x)


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: [B, 3, img_size, img_size] -> [B, out_chans, img_size/p, img_size/p]."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = (
            nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
        )
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, L, L] normalised pixels -> [B, out_chans, L/p, L/p]."""
        x = self.patch_embed(x)  # [B, h, w, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
