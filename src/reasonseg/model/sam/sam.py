"""The Sam module, its typed configuration with named presets, the builder and strict checkpoint loading.

    >>> from reasonseg.model.sam import build_sam
    >>> sam = build_sam("vit_t", checkpoint=fetch("mobile_sam"))   # doctest: +SKIP
    >>> emb = sam.encode_images(pixels)                          # [B, 256, 64, 64]

Presets: ``vit_b``, ``vit_l``, ``vit_h`` (Meta's SAM), ``vit_t`` (MobileSAM's TinyViT), and two tiny
random-weight sizes for tests, ``tiny_vit`` (ViT encoder) and ``tiny_vit_t`` (TinyViT encoder), at
128x128 input with 32-wide prompt embeddings.

Pre- and post-processing (resize, normalise, pad; upsample, crop, resize) live in
``reasonseg.data.transforms``; the model takes normalised, padded pixels and returns logits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reasonseg.model.sam.image_encoder import ImageEncoderViT
from reasonseg.model.sam.mask_decoder import MaskDecoder
from reasonseg.model.sam.prompt_encoder import PromptEncoder
from reasonseg.model.sam.tiny_vit import TinyViT
from reasonseg.model.sam.transformer import TwoWayTransformer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "LoadReport",
    "Sam",
    "SamConfig",
    "SamMasks",
    "TinyViTConfig",
    "ViTConfig",
    "build_sam",
    "load_sam_state_dict",
]


@dataclass(frozen=True)
class ViTConfig:
    """SAM's ViT image encoder (ViT-B/L/H)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig.embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}"
            )
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(
                f"ViTConfig.global_attn_indexes {self.global_attn_indexes} outside 0..{self.depth - 1}"
            )
        if self.patch_size != 16:
            raise ValueError(
                f"ViTConfig.patch_size must be 16 (SAM's decoder expects L/16 grids), got {self.patch_size}"
            )
        if self.window_size < 0 or self.depth < 1:
            raise ValueError(f"ViTConfig: bad window_size {self.window_size} or depth {self.depth}")


@dataclass(frozen=True)
class TinyViTConfig:
    """MobileSAM's TinyViT image encoder; stage 0 is convolutional."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    num_classes: int = 1000

    def __post_init__(self) -> None:
        n = len(self.embed_dims)
        if n != 4 or not (len(self.depths) == len(self.num_heads) == len(self.window_sizes) == n):
            raise ValueError(
                "TinyViTConfig: embed_dims, depths, num_heads, window_sizes need 4 stages each "
                f"(output grid L/16), got {self.embed_dims}, {self.depths}, {self.num_heads}, {self.window_sizes}"
            )
        for i in range(1, n):
            if self.embed_dims[i] % self.num_heads[i]:
                raise ValueError(f"TinyViTConfig: stage {i} dim {self.embed_dims[i]} not divisible by heads")


@dataclass(frozen=True)
class SamConfig:
    """Complete SAM configuration: image encoder, prompt encoder and mask decoder sizes.

    ``image_size`` is the padded square input side L; embeddings are L/16 on a side and the decoder's
    low-res masks L/4.
    """

    name: str
    encoder: ViTConfig | TinyViTConfig = field(default_factory=ViTConfig)
    image_size: int = 1024
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    def __post_init__(self) -> None:
        if self.image_size % 16 or self.image_size <= 0:
            raise ValueError(f"SamConfig.image_size must be a positive multiple of 16, got {self.image_size}")
        if self.prompt_embed_dim % 8 or (self.prompt_embed_dim // 2) % self.decoder_num_heads:
            raise ValueError(
                f"SamConfig.prompt_embed_dim {self.prompt_embed_dim} must be divisible by 8 and its half by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )
        if self.mask_in_chans % 4:
            raise ValueError(f"SamConfig.mask_in_chans must be divisible by 4, got {self.mask_in_chans}")

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for a 1024 input)."""
        return self.image_size // 16

    @classmethod
    def from_name(cls, name: str) -> SamConfig:
        """A preset by name: vit_b, vit_l, vit_h, vit_t (MobileSAM), tiny_vit, tiny_vit_t."""
        try:
            return PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown SAM preset {name!r}; known: {', '.join(PRESETS)}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``encoder_type`` says which encoder config ``encoder`` holds."""
        d = dataclasses.asdict(self)
        d["encoder_type"] = "tiny_vit" if isinstance(self.encoder, TinyViTConfig) else "vit"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamConfig:
        d = dict(d)
        kind = d.pop("encoder_type", "vit")
        enc_cls = {"vit": ViTConfig, "tiny_vit": TinyViTConfig}.get(kind)
        if enc_cls is None:
            raise ValueError(f"SamConfig: unknown encoder_type {kind!r} (expected 'vit' or 'tiny_vit')")
        enc = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d.pop("encoder", {})).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"SamConfig: unknown fields {sorted(unknown)}")
        return cls(encoder=enc_cls(**enc), **d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SamConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


PRESETS: dict[str, SamConfig] = {
    "vit_b": SamConfig("vit_b", ViTConfig(768, 12, 12, (2, 5, 8, 11))),
    "vit_l": SamConfig("vit_l", ViTConfig(1024, 24, 16, (5, 11, 17, 23))),
    "vit_h": SamConfig("vit_h", ViTConfig(1280, 32, 16, (7, 15, 23, 31))),
    "vit_t": SamConfig("vit_t", TinyViTConfig()),
    # Tiny random-weight sizes for tests: 128x128 input, 8x8 embeddings, 32x32 low-res masks.
    "tiny_vit": SamConfig(
        "tiny_vit",
        ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4),
        image_size=128,
        prompt_embed_dim=32,
        mask_in_chans=8,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    ),
    "tiny_vit_t": SamConfig(
        "tiny_vit_t",
        TinyViTConfig(
            embed_dims=(16, 24, 32, 48),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 2, 3),
            window_sizes=(7, 4, 4, 4),
            num_classes=10,
        ),
        image_size=128,
        prompt_embed_dim=32,
        mask_in_chans=8,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    ),
}


@dataclass
class SamMasks:
    """Decoder output for N prompts on one image.

    low_res_logits: [N, M, L/4, L/4] mask logits in the padded input frame (M = 3 multimask or 1).
    iou_predictions: [N, M] predicted mask quality.
    """

    low_res_logits: torch.Tensor
    iou_predictions: torch.Tensor


class Sam(nn.Module):
    """Segment Anything: ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` (names as in Meta's code).

    The model is stateless: per-image caches (embeddings) live in the predictor.
    """

    mask_threshold: float = 0.0

    def __init__(
        self,
        image_encoder: ImageEncoderViT | TinyViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        config: SamConfig | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config

    @property
    def image_size(self) -> int:
        """Side L of the square, padded model input (1024 for the real models)."""
        return int(self.image_encoder.img_size)

    @property
    def embed_dim(self) -> int:
        """Width of prompt tokens and image embeddings (256 for the real models)."""
        return int(self.prompt_encoder.embed_dim)

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    def encode_images(self, pixels: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Image embeddings for a batch: [B, 3, L, L] normalised pixels -> [B, C, L/16, L/16].

        ``batch_size`` bounds how many images go through the encoder at once (memory); None = all.
        Inputs are moved to the module's device and dtype.
        """
        if (
            pixels.ndim != 4
            or pixels.shape[1] != 3
            or pixels.shape[-2:] != (self.image_size, self.image_size)
        ):
            raise ValueError(
                f"Sam.encode_images: expected pixels [B, 3, {self.image_size}, {self.image_size}], "
                f"got {list(pixels.shape)}"
            )
        param = next(self.image_encoder.parameters())
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        step = batch_size or pixels.shape[0]
        outs = [self.image_encoder(pixels[i : i + step]) for i in range(0, pixels.shape[0], step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def decode(
        self,
        image_embedding: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> SamMasks:
        """Masks for N prompts on ONE image.

        Args:
            image_embedding: [1, C, h, w] (or [C, h, w]).
            points: ([N, P, 2] (x, y) in the input frame, [N, P] labels 1/0) or None.
            boxes: [N, 4] (x0, y0, x1, y1) in the input frame, or None.
            mask_inputs: [N, 1, 4h, 4w] low-res logits from a previous call, or None.
        """
        if image_embedding.ndim == 3:
            image_embedding = image_embedding.unsqueeze(0)
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs)
        low_res, iou = self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(image_embedding.dtype),
            dense_prompt_embeddings=dense.to(image_embedding.dtype),
            multimask_output=multimask_output,
        )
        return SamMasks(low_res_logits=low_res, iou_predictions=iou)


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model; the message lists missing, unexpected and mis-shaped keys."""


@dataclass
class LoadReport:
    """Outcome of loading a state dict: keys the model lacks, keys the file lacks, shape clashes."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        def fmt(keys: list[str]) -> str:
            more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        lines = [f"checkpoint {self.source}:"]
        if self.missing:
            lines.append(
                f"  {len(self.missing)} missing key(s) (in the model, not in the file): {fmt(self.missing)}"
            )
        if self.unexpected:
            lines.append(
                f"  {len(self.unexpected)} unexpected key(s) (in the file, not in the model): {fmt(self.unexpected)}"
            )
        for key, want, got in self.mismatched[:limit]:
            lines.append(f"  shape mismatch for {key}: model {list(want)}, file {list(got)}")
        if self.ok:
            lines.append("  all keys matched")
        return "\n".join(lines)


def load_sam_state_dict(
    model: Sam,
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    *,
    prefix: str = "",
    strict: bool = True,
) -> LoadReport:
    """Load Meta-format SAM weights (official SAM, MobileSAM, or SAM inside a LISA checkpoint).

    Args:
        checkpoint: a ``.pt``/``.pth`` file (a plain state dict, or one under a ``model``/``state_dict``
            key), a ``.safetensors`` file, or a state dict.
        prefix: only keys starting with it are used, with it removed (e.g. ``"model.visual_model."``).
        strict: raise :class:`CheckpointError` unless every key matches in name and shape.
    Returns:
        a :class:`LoadReport` (always clean when ``strict``).
    """
    source = str(checkpoint) if isinstance(checkpoint, str | Path) else "<state dict>"
    state = _read_state_dict(checkpoint) if isinstance(checkpoint, str | Path) else dict(checkpoint)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"checkpoint {source}: no keys start with prefix {prefix!r}")
    own = model.state_dict()
    report = LoadReport(
        source=source,
        missing=sorted(k for k in own if k not in state),
        unexpected=sorted(k for k in state if k not in own),
        mismatched=[
            (k, tuple(own[k].shape), tuple(v.shape))
            for k, v in state.items()
            if k in own and tuple(own[k].shape) != tuple(v.shape)
        ],
    )
    if strict and not report.ok:
        raise CheckpointError(report.describe())
    if report.mismatched:
        bad = {k for k, _, _ in report.mismatched}
        state = {k: v for k, v in state.items() if k not in bad}
    model.load_state_dict(state, strict=False)
    return report


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read as a torch state dict ({exc})") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {path}: expected a state dict of tensors, got {type(obj).__name__}"
        )
    return dict(obj)


def _build_image_encoder(cfg: SamConfig) -> ImageEncoderViT | TinyViT:
    enc = cfg.encoder
    if isinstance(enc, TinyViTConfig):
        return TinyViT(
            img_size=cfg.image_size,
            embed_dims=enc.embed_dims,
            depths=enc.depths,
            num_heads=enc.num_heads,
            window_sizes=enc.window_sizes,
            mlp_ratio=enc.mlp_ratio,
            mbconv_expand_ratio=enc.mbconv_expand_ratio,
            local_conv_size=enc.local_conv_size,
            out_chans=cfg.prompt_embed_dim,
            num_classes=enc.num_classes,
        )
    return ImageEncoderViT(
        img_size=cfg.image_size,
        patch_size=enc.patch_size,
        embed_dim=enc.embed_dim,
        depth=enc.depth,
        num_heads=enc.num_heads,
        mlp_ratio=enc.mlp_ratio,
        out_chans=cfg.prompt_embed_dim,
        qkv_bias=True,
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=enc.window_size,
        global_attn_indexes=enc.global_attn_indexes,
    )


def build_sam(
    config: SamConfig | str, checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None
) -> Sam:
    """Build a SAM from a config or preset name; load ``checkpoint`` strictly if given. Returns it in eval mode."""
    cfg = SamConfig.from_name(config) if isinstance(config, str) else config
    emb = cfg.embedding_size
    sam = Sam(
        image_encoder=_build_image_encoder(cfg),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=cfg.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                num_heads=cfg.decoder_num_heads,
                mlp_dim=cfg.decoder_mlp_dim,
            ),
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        config=cfg,
    )
    if checkpoint is not None:
        load_sam_state_dict(sam, checkpoint)
    return sam.eval()
