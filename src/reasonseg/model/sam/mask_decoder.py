"""SAM's mask decoder: image embedding + prompt tokens -> low-res mask logits and IoU predictions.

Parameter names match Meta's ``segment_anything``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from reasonseg.model.sam.common import LayerNorm2d, linear, memoised
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
        sel = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, sel
        )
        return masks, iou_pred[:, sel]

    def _pe_tokens(self, image_pe: torch.Tensor) -> torch.Tensor:
        """``image_pe`` [1, C, h, w] as tokens [1, h*w, C]; memoised for the same tensor (e.g. the
        prompt encoder's memoised ``get_dense_pe()``) while it is unchanged and autograd is off."""
        if image_pe.shape[0] != 1:
            raise ValueError(f"MaskDecoder: image_pe must have batch 1, got {tuple(image_pe.shape)}")
        return memoised(self, "_pe_memo", image_pe, lambda: image_pe.flatten(2).transpose(1, 2).contiguous())

    def _src_tokens(self, image: torch.Tensor, dense: torch.Tensor, n: int) -> torch.Tensor:
        """The image + dense prompt sum in token layout [n, h*w, C], the transformer's keys.

        The image [1|n, C, h, w] is laid out as tokens once and memoised while the same tensor is
        passed in with autograd off (follow-up queries on one image). A dense prompt that is one
        vector per prompt broadcast over the map (``no_mask_embed``, as LISA passes it: zero spatial
        strides) is added as [n, 1, C], a contiguous broadcast, instead of as a strided map.
        """
        _per_prompt(image, n, "image_embeddings")  # checks the batches: 1 or n
        _per_prompt(dense, n, "dense_prompt_embeddings")
        b, c, h, w = image.shape

        def layout() -> torch.Tensor:
            return image.flatten(2).transpose(1, 2).contiguous()

        tokens = memoised(self, "_image_memo", image, layout) if b == 1 else layout()  # [1|n, h*w, C]
        dense = torch.broadcast_to(dense, (dense.shape[0], c, h, w))
        if dense.stride(2) == 0 and dense.stride(3) == 0:
            src = tokens + dense[:, :, 0, 0].unsqueeze(1)
        else:
            src = (tokens + dense.flatten(2).transpose(1, 2)).contiguous()
        return src if src.shape[0] == n else src.expand(n, -1, -1).contiguous()

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        mask_slice: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks [N, K', 4h, 4w] of the mask tokens in ``mask_slice`` (all ``num_mask_tokens`` by
        default; only those are upscaled into masks) and the scores [N, K] of all; see ``forward``."""
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # [1+K, C]
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)

        src = self._src_tokens(image_embeddings, dense_prompt_embeddings, n)  # [N, h*w, C]
        c, h, w = image_embeddings.shape[1:]
        hs, src = self.transformer.forward_tokens(src, self._pe_tokens(image_pe), tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # [N, K, C]

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )[:, mask_slice]  # [N, K', C/8]
        if _standard_upscaling(self.output_upscaling):
            masks = _upscaled_masks(self.output_upscaling, src, (h, w), hyper_in)
        else:
            upscaled = self.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))  # [N, C/8, 4h, 4w]
            _, c8, uh, uw = upscaled.shape
            masks = (hyper_in @ upscaled.reshape(n, c8, uh * uw)).view(n, -1, uh, uw)
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


def _conv_t2x2(x: torch.Tensor, conv: nn.ConvTranspose2d, act: str = "none") -> torch.Tensor:
    """A stride-2, 2x2 transposed convolution (+ exact GELU for ``act="gelu"``) on pixels as rows:
    [P, Cin] -> [4P, Cout], each input pixel's 2x2 output block as 4 consecutive rows in (i, j) order.

    Each input pixel writes its own 2x2 block, so the layer is one matrix product [P, Cin] x
    [Cin, (i, j, Cout)]: much faster on a CPU than the generic transposed-convolution kernel.
    """
    cout = conv.out_channels
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * cout, conv.in_channels)  # [(i, j, Cout), Cin]
    return linear(x, (weight, conv.bias.repeat(4)), act).view(-1, cout)  # type: ignore[union-attr]


def _upscaled_masks(
    seq: nn.Sequential, src: torch.Tensor, hw: tuple[int, int], hyper_in: torch.Tensor
) -> torch.Tensor:
    """SAM's ``output_upscaling`` on the image tokens src [N, h*w, C] and the product with the
    hypernetwork outputs hyper_in [N, K, C/8] -> masks [N, K, 4h, 4w].

    Every step up to the product works on one pixel at a time (both transposed convolutions write a
    2x2 block per input pixel; LayerNorm2d and GELU are per pixel), so the pixels stay rows in the
    order the convolutions emit them, (n, y, x, i, j, k, l), and only the K-channel masks are put in
    image order at the end, rather than the 64- and 32-channel maps between the steps.
    """
    c1, ln, _, c2, _ = seq
    n = src.shape[0]
    h, w = hw
    y = _conv_t2x2(src.reshape(-1, src.shape[-1]), c1)  # [N*h*w*4, C/4]
    y = F.gelu(F.layer_norm(y, (y.shape[-1],), ln.weight, ln.bias, ln.eps))
    y = _conv_t2x2(y, c2, "gelu")  # [N*h*w*16, C/8]
    masks = y.view(n, -1, y.shape[-1]) @ hyper_in.transpose(1, 2)  # [N, h*w*16, K]
    k = masks.shape[-1]
    masks = masks.view(n, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)  # [N, K, h, i, k, w, j, l]
    return masks.reshape(n, k, 4 * h, 4 * w)
