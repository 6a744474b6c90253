"""Vision towers: where the multimodal LM's image tokens come from.

* :class:`ClipVisionTower`: a Hugging Face CLIP vision model; the patch features of a selectable
  hidden layer (LLaVA/LISA use the second to last), CLS token dropped: [B,3,S,S] -> [B,(S/p)^2,C].
* :class:`SamPooledVisionTower`: no weights of its own; it average-pools the SAM image embedding
  [B,256,h,w] (computed once for the mask decoder anyway) to a ``g`` x ``g`` grid: -> [B,g*g,256].

``sam_pixels_to_clip`` derives CLIP's input from SAM's (so one preprocessed tensor serves both):
undo SAM's normalisation, crop the un-padded region, resize the short side to CLIP's size (bicubic),
centre-crop, and normalise with CLIP's statistics; this follows CLIPImageProcessor's recipe on the
already-resized image rather than the original (a close, not bit-exact, match).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reasonseg.data.transforms import PIXEL_MEAN, PIXEL_STD
from reasonseg.model.config import VisionTowerConfig

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SAM_MEAN",
    "SAM_STD",
    "ClipVisionTower",
    "SamPooledVisionTower",
    "build_vision_tower",
    "sam_pixels_to_clip",
]

SAM_MEAN, SAM_STD = PIXEL_MEAN, PIXEL_STD  # SAM's normalisation, defined once in data/transforms
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipVisionTower(nn.Module):
    """A CLIP vision model returning the patch features of layer ``select_layer`` (CLS dropped).

    The CLIP weights are under ``clip.*`` with Hugging Face's ``CLIPVisionModel`` names
    (``clip.vision_model.encoder.layers.N...``).
    """

    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.config = config
        self.clip = CLIPVisionModel(CLIPVisionConfig(**(config.clip or {})))
        self.image_size = int(config.clip["image_size"])  # type: ignore[index]

    def forward(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """clip_pixels [B,3,S,S] (CLIP-normalised) -> patch features [B,N,C]."""
        out = self.clip(pixel_values=clip_pixels, output_hidden_states=True)
        feats = out.hidden_states[self.config.select_layer]  # [B,1+N,C]
        return feats[:, 1:]  # drop CLS


class SamPooledVisionTower(nn.Module):
    """SAM image embedding [B,C,h,w] -> [B,g*g,C] by adaptive average pooling (row-major tokens)."""

    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.grid = config.pool_grid

    def forward(self, sam_embeddings: torch.Tensor) -> torch.Tensor:
        """sam_embeddings [B,C,h,w] -> [B,g*g,C]."""
        pooled = F.adaptive_avg_pool2d(sam_embeddings, self.grid)  # [B,C,g,g]
        return pooled.flatten(2).transpose(1, 2)


def build_vision_tower(config: VisionTowerConfig) -> nn.Module:
    """The tower for ``config.kind``."""
    return ClipVisionTower(config) if config.kind == "clip" else SamPooledVisionTower(config)


def sam_pixels_to_clip(
    pixels: torch.Tensor, resized_hw: Sequence[tuple[int, int]], size: int
) -> torch.Tensor:
    """SAM input [B,3,L,L] (normalised, zero-padded bottom/right) -> CLIP input [B,3,size,size].

    ``resized_hw[i]`` is image i's size inside the padded square (``SamInput.resized_hw``). The resize runs
    in float32 whatever the input dtype (bicubic has no bf16 kernel on CPU, and fp32 is more exact); the
    result has the input's dtype.
    """
    f32 = {"dtype": torch.float32, "device": pixels.device}
    mean = torch.tensor(SAM_MEAN, **f32).view(3, 1, 1)
    std = torch.tensor(SAM_STD, **f32).view(3, 1, 1)
    cmean = torch.tensor(CLIP_MEAN, **f32).view(3, 1, 1)
    cstd = torch.tensor(CLIP_STD, **f32).view(3, 1, 1)
    out = []
    for img, (h, w) in zip(pixels.float(), resized_hw, strict=True):
        rgb = (img[:, :h, :w] * std + mean) / 255.0  # [3,h,w] in [0,1]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        rgb = F.interpolate(rgb[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        rgb = rgb[:, top : top + size, left : left + size].clamp(0, 1)
        out.append((rgb - cmean) / cstd)
    return torch.stack(out).to(pixels.dtype)
