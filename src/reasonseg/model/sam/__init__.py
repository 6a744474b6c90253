"""Segment Anything (SAM) and MobileSAM: one file per box of SAM's diagram.

- ``image_encoder``: ViT-B/L/H (``ImageEncoderViT``); ``tiny_vit``: MobileSAM's TinyViT.
- ``prompt_encoder``: points, boxes and masks -> tokens; ``transformer``: the two-way transformer;
  ``mask_decoder``: tokens + image embedding -> mask logits and IoU scores.
- ``sam``: the ``Sam`` module, ``SamConfig`` presets, ``build_sam`` and strict checkpoint loading.
"""

from reasonseg.model.sam.image_encoder import ImageEncoderViT
from reasonseg.model.sam.mask_decoder import MaskDecoder
from reasonseg.model.sam.prompt_encoder import PromptEncoder
from reasonseg.model.sam.sam import (
    PRESETS,
    CheckpointError,
    LoadReport,
    Sam,
    SamConfig,
    SamMasks,
    TinyViTConfig,
    ViTConfig,
    build_sam,
    load_sam_state_dict,
)
from reasonseg.model.sam.tiny_vit import TinyViT
from reasonseg.model.sam.transformer import TwoWayTransformer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ImageEncoderViT",
    "LoadReport",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "SamConfig",
    "SamMasks",
    "TinyViT",
    "TinyViTConfig",
    "TwoWayTransformer",
    "ViTConfig",
    "build_sam",
    "load_sam_state_dict",
]
