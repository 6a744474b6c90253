"""Typed, composed configs for the LISA/GSVA model and the named presets.

``LisaConfig`` composes one small config per box of the architecture (vision tower, projector,
language model, SAM, LISA head) plus the token/template settings; every config checks itself on
construction and round-trips through JSON (``to_dict``/``from_dict``), which is how it is saved next
to the weights.

    >>> cfg = LisaConfig.from_preset("lisa-mobile", tiny=True)
    >>> cfg.vision.kind, cfg.projector.out_dim == cfg.lm.hidden_size
    ('sam', True)
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from reasonseg.data.conversation import IMAGE_TOKEN, REJ_TOKEN, SEG_TOKEN, TEMPLATES

__all__ = [
    "PRESETS",
    "HeadConfig",
    "LMConfig",
    "LisaConfig",
    "ProjectorConfig",
    "SamPartConfig",
    "VisionTowerConfig",
]


def _fail(section: str, field_name: str, reason: str) -> None:
    raise ValueError(f"{section}.{field_name}: {reason}")


@dataclass
class VisionTowerConfig:
    """Where the LM's image tokens come from.

    ``kind="clip"``: a Hugging Face CLIP vision model (``clip`` holds its ``CLIPVisionConfig`` fields;
    ``clip_pretrained`` a hub id or local path with its weights, or None); the features of hidden layer
    ``select_layer`` (``-2``: second to last, as LLaVA/LISA) with the CLS token dropped.
    ``kind="sam"``: the SAM image encoder's output [B,256,h,w], average-pooled to ``pool_grid`` x
    ``pool_grid`` tokens, so one encoder pass serves both the LM and the mask decoder.
    """

    kind: Literal["clip", "sam"] = "clip"
    clip: dict[str, Any] | None = None
    clip_pretrained: str | None = None
    select_layer: int = -2
    pool_grid: int = 16
    sam_dim: int = 256

    def __post_init__(self) -> None:
        if self.kind not in ("clip", "sam"):
            _fail("vision", "kind", f"must be 'clip' or 'sam', got {self.kind!r}")
        if self.kind == "clip":
            if not self.clip or not {"hidden_size", "image_size", "patch_size"} <= set(self.clip):
                _fail(
                    "vision",
                    "clip",
                    "a CLIP tower needs a config dict with hidden_size, image_size, patch_size",
                )
            if self.clip["image_size"] % self.clip["patch_size"]:
                _fail("vision", "clip", "image_size must be a multiple of patch_size")
            n_layers = int(self.clip.get("num_hidden_layers", 12))
            if not -n_layers <= self.select_layer <= n_layers:
                _fail("vision", "select_layer", f"{self.select_layer} is outside the {n_layers}-layer tower")
        if self.pool_grid < 1:
            _fail("vision", "pool_grid", f"must be >= 1, got {self.pool_grid}")

    @property
    def out_dim(self) -> int:
        """Channels of each image token before the projector."""
        return int(self.clip["hidden_size"]) if self.kind == "clip" else self.sam_dim  # type: ignore[index]

    @property
    def num_tokens(self) -> int:
        """Image tokens per image (CLIP: patches, CLS dropped; SAM: pool_grid squared)."""
        if self.kind == "clip":
            side = int(self.clip["image_size"]) // int(self.clip["patch_size"])  # type: ignore[index]
            return side * side
        return self.pool_grid * self.pool_grid


@dataclass
class ProjectorConfig:
    """Vision-to-LM projector: ``linear`` (LISA v1) or ``mlp2x_gelu`` (Linear-GELU-Linear, LLaVA-1.5)."""

    kind: Literal["linear", "mlp2x_gelu"] = "linear"
    in_dim: int = 1024
    out_dim: int = 4096

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp2x_gelu"):
            _fail("projector", "kind", f"must be 'linear' or 'mlp2x_gelu', got {self.kind!r}")
        if self.in_dim < 1 or self.out_dim < 1:
            _fail("projector", "in_dim/out_dim", "must be positive")


@dataclass
class LMConfig:
    """The causal LM: ``hf_config`` holds the Hugging Face config fields (with ``model_type``);
    ``pretrained`` names where its weights come from: ``"smollm2"`` (registry, see
    :func:`reasonseg.model.lm.load_smollm2`), a hub id or local directory, or None (random init).
    ``vocab_resolved`` is False in presets (the vocabulary is sized to the tokenizer, with the added
    tokens, when the model is built) and True once ``hf_config["vocab_size"]`` is the real one."""

    hf_config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    attn_implementation: str = "sdpa"
    vocab_resolved: bool = False

    def __post_init__(self) -> None:
        for key in ("model_type", "hidden_size", "vocab_size"):
            if key not in self.hf_config:
                _fail("lm", "hf_config", f"missing {key!r}")

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config["hidden_size"])


@dataclass
class SamPartConfig:
    """SAM: ``name`` for ``SamConfig.from_name`` (``vit_h``, ``vit_t``, ``tiny_vit`` ...), ``checkpoint``
    a weights-registry artifact name (``mobile_sam``, ``sam_vit_h``) or a path, or None."""

    name: str = "vit_h"
    checkpoint: str | None = None


@dataclass
class HeadConfig:
    """The LISA head ``text_hidden_fcs``: Linear(H,H)-ReLU-Linear(H,out_dim)-Dropout(dropout)."""

    out_dim: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.out_dim < 1:
            _fail("head", "out_dim", "must be positive")
        if not 0.0 <= self.dropout < 1.0:
            _fail("head", "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class LisaConfig:
    """The whole model. ``tokenizer`` names the base tokenizer: ``"tiny"`` (built in memory for tests),
    ``"smollm2"`` (registry), or a hub id / local directory. ``use_rej`` adds GSVA's ``[REJ]`` token.
    ``base`` records where the base weights of a delta checkpoint come from (see
    ``LisaModel.save_pretrained``)."""

    name: str = "custom"
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    sam: SamPartConfig = field(default_factory=SamPartConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    template: str = "llava_v1"
    tokenizer: str = "tiny"
    seg_token: str = SEG_TOKEN
    rej_token: str = REJ_TOKEN
    image_token: str = IMAGE_TOKEN
    use_rej: bool = True
    max_length: int = 512
    tiny: bool = False

    def __post_init__(self) -> None:
        for key, typ in (
            ("vision", VisionTowerConfig),
            ("projector", ProjectorConfig),
            ("lm", LMConfig),
            ("sam", SamPartConfig),
            ("head", HeadConfig),
        ):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, typ(**value))
            elif not isinstance(value, typ):
                _fail("config", key, f"expected {typ.__name__} or dict, got {type(value).__name__}")
        if self.template not in TEMPLATES:
            _fail("config", "template", f"unknown template {self.template!r}; known: {sorted(TEMPLATES)}")
        if self.projector.in_dim != self.vision.out_dim:
            _fail(
                "projector", "in_dim", f"{self.projector.in_dim} != vision tower output {self.vision.out_dim}"
            )
        if self.projector.out_dim != self.lm.hidden_size:
            _fail("projector", "out_dim", f"{self.projector.out_dim} != LM hidden size {self.lm.hidden_size}")
        sam_dim = _sam_dim(self.sam.name)
        if self.head.out_dim != sam_dim:
            _fail("head", "out_dim", f"{self.head.out_dim} != SAM {self.sam.name!r} prompt width {sam_dim}")
        if self.vision.kind == "sam" and self.vision.sam_dim != sam_dim:
            _fail(
                "vision",
                "sam_dim",
                f"{self.vision.sam_dim} != SAM {self.sam.name!r} embedding width {sam_dim}",
            )
        if self.max_length <= self.vision.num_tokens:
            _fail(
                "config",
                "max_length",
                f"{self.max_length} leaves no room after {self.vision.num_tokens} image tokens",
            )

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LisaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"LisaConfig: unknown fields {sorted(unknown)}")
        return cls(**copy.deepcopy(data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LisaConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        data.pop("format", None)
        data.pop("base", None)
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str, tiny: bool = False) -> LisaConfig:
        """A named preset (see :data:`PRESETS`); ``tiny=True`` keeps the layout at tiny random sizes."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name](tiny)


def _sam_dim(name: str) -> int:
    from reasonseg.model.sam import SamConfig

    try:
        return int(SamConfig.from_name(name).prompt_embed_dim)
    except KeyError as exc:
        raise ValueError(f"sam.name: {exc}") from None


# ---------------------------------------------------------------------------------------------- presets

_CLIP_L14_224 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_TINY_SAM_DIM = 32  # prompt width of the "tiny_vit"/"tiny_vit_t" SAM test sizes
_CLIP_TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 28,
    "patch_size": 7,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def _tiny_llama(vocab_size: int = 512, **over: Any) -> dict[str, Any]:
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    cfg.update(over)
    return cfg


def _llama(hidden: int, inter: int, layers: int, heads: int, max_pos: int, eps: float) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": 32000,  # set to the tokenizer's length (with the added tokens) when the model is built
        "max_position_embeddings": max_pos,
        "rms_norm_eps": eps,
        "tie_word_embeddings": False,
    }


def _lisa_official(name: str, lm: dict[str, Any], lm_hub: str, tiny: bool, use_rej: bool) -> LisaConfig:
    if tiny:
        vision = VisionTowerConfig(kind="clip", clip=dict(_CLIP_TINY), select_layer=-2)
        lm_cfg = LMConfig(hf_config=_tiny_llama())
        sam = SamPartConfig(name="tiny_vit")
        return LisaConfig(
            name=name,
            vision=vision,
            projector=ProjectorConfig("linear", vision.out_dim, 64),
            lm=lm_cfg,
            sam=sam,
            head=HeadConfig(out_dim=_TINY_SAM_DIM),
            template="llava_v1",
            tokenizer="tiny",
            use_rej=use_rej,
            tiny=True,
        )
    vision = VisionTowerConfig(
        kind="clip",
        clip=dict(_CLIP_L14_224),
        clip_pretrained="openai/clip-vit-large-patch14",
        select_layer=-2,
    )
    return LisaConfig(
        name=name,
        vision=vision,
        projector=ProjectorConfig("linear", vision.out_dim, lm["hidden_size"]),
        lm=LMConfig(hf_config=lm, pretrained=lm_hub),
        sam=SamPartConfig(name="vit_h", checkpoint="sam_vit_h"),
        template="llava_v1",
        tokenizer=lm_hub,
        use_rej=use_rej,
    )


def _preset_lisa_7b(tiny: bool) -> LisaConfig:
    # LISA-7B-v1: LLaVA-Lightning-7B-v1-1 (LLaMA-7B), CLIP ViT-L/14-224, linear projector, SAM ViT-H.
    lm = _llama(4096, 11008, 32, 32, 2048, 1e-6)
    return _lisa_official("lisa-7b-v1", lm, "xinlai/LISA-7B-v1", tiny, use_rej=False)


def _preset_lisa_13b_llama2(tiny: bool) -> LisaConfig:
    # LISA-13B-llama2-v1: LLaVA-Llama-2-13B-chat-lightning base (Llama-2-13B), linear projector.
    lm = _llama(5120, 13824, 40, 40, 4096, 1e-5)
    return _lisa_official("lisa-13b-llama2-v1", lm, "xinlai/LISA-13B-llama2-v1", tiny, use_rej=False)


def _preset_gsva_7b(tiny: bool) -> LisaConfig:
    # GSVA-7B: the LISA-7B layout plus [REJ] (one [SEG]/[REJ] per target).
    lm = _llama(4096, 11008, 32, 32, 2048, 1e-6)
    return _lisa_official("gsva-7b", lm, "xinlai/LISA-7B-v1", tiny, use_rej=True)


_SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def _preset_lisa_mobile(tiny: bool) -> LisaConfig:
    # SmolLM2-135M-Instruct + MobileSAM; SAM's encoder output pooled to 8x8 tokens is the vision tower.
    if tiny:
        vision = VisionTowerConfig(kind="sam", pool_grid=4, sam_dim=_TINY_SAM_DIM)
        lm_cfg = LMConfig(hf_config=_tiny_llama(tie_word_embeddings=True))
        return LisaConfig(
            name="lisa-mobile",
            vision=vision,
            projector=ProjectorConfig("mlp2x_gelu", vision.out_dim, 64),
            lm=lm_cfg,
            sam=SamPartConfig(name="tiny_vit_t"),
            head=HeadConfig(out_dim=_TINY_SAM_DIM),
            template="chatml",
            tokenizer="tiny",
            use_rej=True,
            tiny=True,
        )
    vision = VisionTowerConfig(kind="sam", pool_grid=8)
    return LisaConfig(
        name="lisa-mobile",
        vision=vision,
        projector=ProjectorConfig("mlp2x_gelu", vision.out_dim, _SMOLLM2_135M["hidden_size"]),
        lm=LMConfig(hf_config=dict(_SMOLLM2_135M), pretrained="smollm2"),
        sam=SamPartConfig(name="vit_t", checkpoint="mobile_sam"),
        template="chatml",
        tokenizer="smollm2",
        use_rej=True,
        max_length=512,
    )


PRESETS = {
    "lisa-7b-v1": _preset_lisa_7b,
    "lisa-13b-llama2-v1": _preset_lisa_13b_llama2,
    "gsva-7b": _preset_gsva_7b,
    "lisa-mobile": _preset_lisa_mobile,
}
