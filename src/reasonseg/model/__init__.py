"""The LISA/GSVA model: vision tower + projector + causal LM (``mllm``), the LISA head, SAM (``sam/``).

>>> from reasonseg.model import LisaModel
>>> model = LisaModel.from_preset("lisa-mobile", tiny=True)  # doctest: +SKIP
"""

from reasonseg.model.config import (
    PRESETS,
    HeadConfig,
    LisaConfig,
    LMConfig,
    ProjectorConfig,
    SamPartConfig,
    VisionTowerConfig,
)
from reasonseg.model.lisa import LisaModel, add_lisa_tokens, load_tokenizer
from reasonseg.model.outputs import GenerateOutput, ImageFeatures, LisaOutput, MaskPrediction, TargetKind

__all__ = [
    "PRESETS",
    "GenerateOutput",
    "HeadConfig",
    "ImageFeatures",
    "LMConfig",
    "LisaConfig",
    "LisaModel",
    "LisaOutput",
    "MaskPrediction",
    "ProjectorConfig",
    "SamPartConfig",
    "TargetKind",
    "VisionTowerConfig",
    "add_lisa_tokens",
    "load_tokenizer",
]
