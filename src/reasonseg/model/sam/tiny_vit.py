"""TinyViT, the image encoder of MobileSAM: a distilled 5M-parameter replacement for SAM's ViT-H.

``[B, 3, L, L]`` pixels -> ``[B, out_chans, L/16, L/16]``. Stages: a convolutional stem (stride 4), one
stage of MBConv blocks, then windowed-attention stages; each stage but the last ends in a patch-merging
block, and the final merge keeps the resolution so the output grid is L/16 like SAM's ViT.

Parameter names match MobileSAM's checkpoint (``patch_embed.seq``, ``layers.N.blocks.M.{conv1,conv2,
conv3}`` / ``{attn,mlp,local_conv}``, ``layers.N.downsample``, ``norm_head``, ``head``, ``neck``), so
``mobile_sam.pt`` loads with ``strict=True``. ``norm_head``/``head`` (TinyViT's ImageNet classifier) are
unused by SAM and kept only so the checkpoint loads strictly.

Speed (CPU inference; outputs equal to the reference within float rounding):
- Conv+BatchNorm pairs run as one convolution with the BatchNorm folded in, whenever the module is in
  eval mode (the folded weights are recomputed per call from the live parameters, so loading weights or
  fine-tuning never leaves a stale copy; training mode runs the two layers as usual).
- Activations flow channels_last, so the [B, C, H, W] <-> [B, H, W, C] switches around the depthwise
  ``local_conv`` and the attention are free views instead of copies.
- Attention is ``scaled_dot_product_attention`` with the learned per-offset bias as an additive mask;
  the gathered [heads, N, N] bias is cached between calls while the module is in eval mode without
  autograd, and rebuilt whenever the parameter changes (tracked by its version counter).
- On CPU in fp32 without autograd, the memory-bound element-wise steps are fused into oneDNN's
  convolution/linear kernels (conv+GELU, conv+residual add, fc1+GELU, fc2+residual add) through the
  ``torch.ops.mkldnn`` pointwise ops that ``torch.compile`` itself emits. The same holds in bf16, where
  oneDNN uses AMX/AVX-512 BF16 (``--dtype auto``); elsewhere (GPU, training) the plain ops run. The
  activation stays the exact (erf) GELU either way.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from reasonseg.model.sam.common import LayerNorm2d, attention, fusable, linear

__all__ = ["Conv2dBN", "TinyViT"]


class Conv2dBN(nn.Module):
    """Conv2d (no bias) followed by BatchNorm2d; folded into a single convolution in eval mode.

    Submodules are ``c`` and ``bn`` as in MobileSAM's checkpoint. [B, Cin, H, W] -> [B, Cout, H', W'].
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the convolution equivalent to conv + eval-mode BatchNorm, folded in float32
        and rounded once to the convolution's dtype (a bf16 model does not round every step)."""
        bn = self.bn
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
        weight = self.c.weight.float() * scale[:, None, None, None]
        bias = bn.bias.float() - bn.running_mean.float() * scale
        dtype = self.c.weight.dtype
        return weight.to(dtype), bias.to(dtype)

    def forward(
        self, x: torch.Tensor, gelu: bool = False, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``act(conv_bn(x) + residual)`` with ``act`` = GELU if ``gelu`` else identity."""
        if self.training:
            y = self.bn(self.c(x))
        else:
            weight, bias = self.folded()
            c = self.c
            if fusable(x, weight):
                pad, stride, dil = list(c.padding), list(c.stride), list(c.dilation)  # type: ignore[arg-type]
                if residual is None:
                    attr = "gelu" if gelu else "none"
                    return torch.ops.mkldnn._convolution_pointwise(
                        x, weight, bias, pad, stride, dil, c.groups, attr, [], "none"
                    )
                y = torch.ops.mkldnn._convolution_pointwise.binary(
                    x, residual, weight, bias, pad, stride, dil, c.groups, "add", 1.0, None, [], None
                )
                return F.gelu(y) if gelu else y
            y = F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)
        if residual is not None:
            y = y + residual
        return F.gelu(y) if gelu else y


class PatchEmbed(nn.Module):
    """Stem: two stride-2 3x3 Conv+BN with GELU between. [B, 3, H, W] -> [B, D, H/4, W/4]."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),  # applied inside seq[0] (fused); kept so the checkpoint's seq.0 / seq.2 names line up
            Conv2dBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](self.seq[0](x, gelu=True))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU. [B, C, H, W] -> same."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x, gelu=True), gelu=True)
        return self.conv3(y, gelu=True, residual=x)


class PatchMerging(nn.Module):
    """Downsampling between stages: 1x1, depthwise 3x3 (stride 2, or 1 for the final merge), 1x1.

    [B, C, H, W] -> [B, C', H/stride, W/stride].
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x, gelu=True), gelu=True))


class ConvLayer(nn.Module):
    """Stage of MBConv blocks, then an optional merge. [B, C, H, W] -> [B, C', H', W']."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class Mlp(nn.Module):
    """Pre-norm MLP on tokens with its residual: [..., C] -> [..., C]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + fc2(gelu(fc1(norm(x))))``: the block's MLP branch including its residual."""
        return linear(linear(self.norm(x), self.fc1, "gelu"), self.fc2, residual=x)


class WindowAttention(nn.Module):
    """Pre-norm multi-head attention inside one window, with a learned bias per (|dy|, |dx|) offset.

    [B', N, C] -> [B', N, C] with N = window_h * window_w. The qkv projection is laid out per head as
    (q, k, v) chunks of (key_dim, key_dim, head_dim), as in the checkpoint.
    """

    attention_bias_idxs: torch.Tensor

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int]) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.head_dim = dim // num_heads  # attn_ratio 1: values as wide as keys
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * self.key_dim + self.head_dim))
        self.proj = nn.Linear(num_heads * self.head_dim, dim)

        points = list(itertools.product(range(window[0]), range(window[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = [
            offsets.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(offsets))
            for p in points
            for q in points
        ]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)), False
        )
        self._bias_cache: tuple[tuple[int, int, torch.device], torch.Tensor] | None = None

    def bias(self) -> torch.Tensor:
        """The learned bias gathered per (query, key) pair: [heads, N, N]."""
        p = self.attention_biases
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._bias_cache = None
            return p[:, self.attention_bias_idxs]
        key = (p._version, p.data_ptr(), p.device)
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, p[:, self.attention_bias_idxs])
        return self._bias_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = linear(self.norm(x), self.qkv).view(b, n, self.num_heads, 2 * self.key_dim + self.head_dim)
        qkv = qkv.transpose(1, 2)  # [B', heads, N, 2*kd + d]
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.head_dim], dim=-1)
        out = attention(q, k, v, self.bias(), scale=self.key_dim**-0.5)  # [B', heads, N, d]
        return linear(out.transpose(1, 2).reshape(b, n, -1), self.proj)


class TinyViTBlock(nn.Module):
    """Windowed attention, a depthwise 3x3 ``local_conv``, then an MLP. [B, H, W, C] -> [B, H, W, C]."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, (window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        if h == ws and w == ws:
            return self.attn(x.reshape(b, h * w, c)).view(b, h, w, c)
        # Zero padding goes in before the attention's LayerNorm, so padded tokens take part as keys
        # (normalised zeros), exactly as in the original model.
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        nh, nw = hp // ws, wp // ws
        win = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        out = self.attn(win).view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        return out[:, :h, :w] if (pad_b or pad_r) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._windowed_attention(x)
        # [B, H, W, C] is the channels_last layout of [B, C, H, W]: the permutes below are free views.
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.mlp(x)


class BasicLayer(nn.Module):
    """Stage of TinyViT blocks, then an optional merge. [B, C, H, W] -> [B, C', H', W']."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]; free when x is channels_last
        for blk in self.blocks:
            y = blk(y)
        x = y.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """MobileSAM's TinyViT encoder. [B, in_chans, L, L] -> [B, out_chans, L/16, L/16].

    Args:
        img_size: input side L (a multiple of 16 times the last stage's window layout is not required).
        embed_dims / depths / num_heads / window_sizes: per stage; stage 0 is convolutional (its
            num_heads / window_size are unused).
        mlp_ratio: MLP width of the attention stages; mbconv_expand_ratio: MBConv width of stage 0.
        local_conv_size: kernel of the depthwise conv between attention and MLP.
        out_chans: channels of the neck (SAM's prompt embedding size).
        num_classes: width of the unused classifier ``head`` (1000 in MobileSAM's checkpoint).
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        if not (n == len(depths) == len(num_heads) == len(window_sizes)) or n < 2:
            raise ValueError(
                "TinyViT: embed_dims, depths, num_heads and window_sizes need one entry per stage (>= 2 stages), "
                f"got {embed_dims}, {depths}, {num_heads}, {window_sizes}"
            )
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        for i in range(n):
            merge = None
            if i < n - 1:
                # Every merge halves the grid except the final one, so the output grid is L/16.
                merge = PatchMerging(embed_dims[i], embed_dims[i + 1], stride=1 if i == n - 2 else 2)
            if i == 0:
                self.layers.append(ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, merge))
            else:
                self.layers.append(
                    BasicLayer(
                        embed_dims[i],
                        depths[i],
                        num_heads[i],
                        window_sizes[i],
                        mlp_ratio,
                        local_conv_size,
                        merge,
                    )
                )
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, L, L] normalised pixels -> [B, out_chans, L/16, L/16] (contiguous)."""
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x).contiguous()


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
