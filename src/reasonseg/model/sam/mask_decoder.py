"""SAM's mask decoder: image embedding + prompt tokens -> low-res mask logits and IoU predictions.

Parameter names match Meta's ``segment_anything``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from reasonseg.model.sam.common import LayerNorm2d, memoised
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

    def _pe_tokens(self, image_pe: torch.Tensor) -> torch.Tensor:
        """``image_pe`` [1, C, h, w] as tokens [1, h*w, C]; memoised for the same tensor (e.g. the
        prompt encoder's memoised ``get_dense_pe()``) while it is unchanged and autograd is off."""
        if image_pe.shape[0] != 1:
            raise ValueError(f"MaskDecoder: image_pe must have batch 1, got {tuple(image_pe.shape)}")
        return memoised(self, "_pe_memo", image_pe, lambda: image_pe.flatten(2).transpose(1, 2).contiguous())

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

        image = _per_prompt(image_embeddings, n, "image_embeddings")
        b, c, h, w = image.shape
        # The image + dense prompt sum written straight in token layout [N, h*w, C] (one pass; the
        # transformer would otherwise copy the NCHW sum into that layout), and the positional
        # encoding's token layout kept for as long as the same encoding is passed in.
        dense = torch.broadcast_to(dense_prompt_embeddings, (b, c, h, w))
        if torch.is_grad_enabled() and (image.requires_grad or dense.requires_grad):
            src = (image + dense).flatten(2).transpose(1, 2).contiguous()  # out= cannot be differentiated
        else:
            src = torch.empty(b, h * w, c, dtype=image.dtype, device=image.device)
            torch.add(image.flatten(2).transpose(1, 2), dense.flatten(2).transpose(1, 2), out=src)
        hs, src = self.transformer.forward_tokens(src, self._pe_tokens(image_pe), tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # [N, K, C]

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # [N, K, C/8]
        if _standard_upscaling(self.output_upscaling):
            up = _upscale_channels_last(self.output_upscaling, src.reshape(b, h, w, c))  # [N, 4h, 4w, C/8]
            uh, uw = up.shape[1:3]
            masks = (hyper_in @ up.reshape(b, uh * uw, -1).transpose(1, 2)).view(b, -1, uh, uw)
        else:
            upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # [N, C/8, 4h, 4w]
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


def _standard_upscaling(seq: nn.Sequential) -> bool:
    """SAM's upscaling: ConvT(2,2) -> LayerNorm2d -> GELU -> ConvT(2,2) -> GELU, exact GELU, no groups."""
    if len(seq) != 5:
        return False
    c1, ln, a1, c2, a2 = seq
    convs_ok = all(
        isinstance(c, nn.ConvTranspose2d)
        and c.kernel_size == (2, 2)
        and c.stride == (2, 2)
        and c.padding == (0, 0)
        and c.output_padding == (0, 0)
        and c.dilation == (1, 1)
        and c.groups == 1
        and c.bias is not None
        for c in (c1, c2)
    )
    gelus_ok = all(isinstance(a, nn.GELU) and a.approximate == "none" for a in (a1, a2))
    return convs_ok and gelus_ok and isinstance(ln, LayerNorm2d)


def _conv_t2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A stride-2, 2x2 transposed convolution on a channels-last map [N, h, w, Cin] -> [N, 2h, 2w, Cout].

    Each input pixel writes its own 2x2 output block, so the layer is one matrix product
    [N*h*w, Cin] x [Cin, 2*2*Cout] followed by a reshuffle: much faster on a CPU than the generic
    transposed-convolution kernel, and it needs no NCHW<->NHWC copies.
    """
    n, h, w, cin = x.shape
    cout = conv.out_channels
    weight = conv.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)  # [Cin, (i, j, Cout)]
    bias = conv.bias.repeat(4)  # type: ignore[union-attr]
    y = torch.addmm(bias, x.reshape(n * h * w, cin), weight)  # [N*h*w, (i, j, Cout)]
    y = y.view(n, h, w, 2, 2, cout).permute(0, 1, 3, 2, 4, 5)  # [N, h, i, w, j, Cout]
    return y.reshape(n, 2 * h, 2 * w, cout)


def _upscale_channels_last(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``output_upscaling`` on channels-last input [N, h, w, C] -> [N, 4h, 4w, C/8] (channels last)."""
    c1, ln, _, c2, _ = seq
    y = _conv_t2x2(x, c1)
    y = F.gelu(F.layer_norm(y, (y.shape[-1],), ln.weight, ln.bias, ln.eps))
    return F.gelu(_conv_t2x2(y, c2))
