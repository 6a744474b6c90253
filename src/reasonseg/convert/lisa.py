"""Importers for the official LISA (merged) and GSVA (LoRA) checkpoints.

The official models keep the LLaVA/LISA module tree (``LISAForCausalLM``); ours composes the same
boxes under other names. :func:`lisa_key_map` lists, for a given config, every official key and the
name it gets here, one explicit rule per box:

=========================================================  ===========================================
official (``xinlai/LISA-7B-v1``, GSVA after LoRA merge)      reasonseg ``LisaModel``
=========================================================  ===========================================
``model.embed_tokens.weight``                               ``mllm.lm.model.embed_tokens.weight``
``model.layers.N.{self_attn,mlp,*_layernorm}.*``            ``mllm.lm.model.layers.N.*``
``model.norm.weight``                                       ``mllm.lm.model.norm.weight``
``lm_head.weight``                                          ``mllm.lm.lm_head.weight``
``model.mm_projector.{weight,bias}`` (linear)               ``mllm.projector.layers.0.*``
``model.mm_projector.{0,2}.*`` (mlp2x_gelu)                 ``mllm.projector.layers.{0,2}.*``
``model.text_hidden_fcs.0.{0,2}.*``                         ``text_hidden_fcs.{0,2}.*``
``model.visual_model.{image_encoder,prompt_encoder,...}.*`` ``sam.*`` (Meta's names)
``model.vision_tower.vision_tower.vision_model.*``          ``mllm.vision_tower.clip.vision_model.*``
=========================================================  ===========================================

CLIP is usually not in the LISA checkpoint (it is loaded from ``openai/clip-vit-large-patch14``):
pass its ``CLIPVisionModel`` state dict as ``clip_state_dict``. GSVA checkpoints saved with peft
carry the ``base_model.model.`` prefix and LoRA factors (``q_proj.lora_A.default.weight``, ...): they
are merged at import (``W += alpha / r * B @ A``). Loading is strict: a key the map does not know, a
model weight the checkpoint lacks, or a shape clash is an error (``strict=False`` returns them in the
report instead). Rotary ``inv_freq`` buffers that old transformers saved are dropped and reported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reasonseg.model.config import LisaConfig

__all__ = [
    "CheckpointImportError",
    "ImportReport",
    "import_gsva_checkpoint",
    "import_lisa_checkpoint",
    "lisa_key_map",
    "merge_lora",
    "read_state_dict",
]


class CheckpointImportError(RuntimeError):
    """A checkpoint does not fit the model; the message lists what is missing, unexpected or mis-shaped."""


@dataclass
class ImportReport:
    """What an import did.

    Attributes:
        loaded: number of model tensors set from the checkpoint.
        missing: model keys the checkpoint did not provide.
        unexpected: checkpoint keys no rule maps (leftovers).
        mismatched: (official key, checkpoint shape, model shape).
        dropped: keys deliberately ignored (rotary ``inv_freq`` buffers, peft ``original_module`` copies).
        merged_lora: weights into which a LoRA update was merged.
    """

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    merged_lora: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 12) -> str:
        def fmt(items: list[Any]) -> str:
            more = f" ... (+{len(items) - limit})" if len(items) > limit else ""
            return ", ".join(map(str, items[:limit])) + more

        lines = [f"loaded {self.loaded} tensors"]
        for name in ("missing", "unexpected", "mismatched", "dropped", "merged_lora"):
            items = getattr(self, name)
            if items:
                lines.append(f"{name} ({len(items)}): {fmt(items)}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: one ``.safetensors``/``.bin``/``.pt`` file, or a Hugging Face model
    directory (sharded with an index json, or single file)."""
    p = Path(path)
    if p.is_dir():
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = p / index_name
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                out: dict[str, torch.Tensor] = {}
                for shard in shards:
                    out.update(read_state_dict(p / shard))
                return out
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (p / single).is_file():
                return read_state_dict(p / single)
        raise FileNotFoundError(f"{p}: no model.safetensors, pytorch_model.bin or shard index")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        from reasonseg.model.lisa import readable_safetensors

        with readable_safetensors(p):
            return load_file(str(p))
    import zipfile

    if not zipfile.is_zipfile(p):  # torch.save's format since torch 1.6 (what mmap loading needs)
        raise ValueError(f"{p}: not a checkpoint (neither a .safetensors file nor a torch.save zip archive)")
    obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p}: expected a state dict, got {type(obj).__name__}")
    return dict(obj)


# -------------------------------------------------------------------------------------------- key map


def lisa_key_map(model_state_keys: list[str], config: LisaConfig) -> dict[str, str]:
    """Official key -> reasonseg key, for every weight of a model built from ``config``.

    Built rule by rule (see the module docstring), from the model's own key list, so the map is
    total over the model: a key of ours without an official name is an error here.
    """
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for ours in model_state_keys:
        official = _official_name(ours, config)
        if official is None:
            unmapped.append(ours)
        else:
            mapping[official] = ours
    if unmapped:
        raise CheckpointImportError(f"no official name for model keys: {unmapped[:10]}")
    return mapping


def _official_name(ours: str, config: LisaConfig) -> str | None:
    rules: list[tuple[str, str]] = [
        ("mllm.lm.model.", "model."),
        ("mllm.lm.lm_head.", "lm_head."),
        ("text_hidden_fcs.", "model.text_hidden_fcs.0."),
        ("sam.", "model.visual_model."),
        ("mllm.vision_tower.clip.", "model.vision_tower.vision_tower."),
    ]
    if ours.startswith("mllm.projector.layers."):
        rest = ours[len("mllm.projector.layers.") :]
        if config.projector.kind == "linear":
            return "model.mm_projector." + rest.removeprefix("0.")
        return "model.mm_projector." + rest
    for ours_prefix, official_prefix in rules:
        if ours.startswith(ours_prefix):
            return official_prefix + ours[len(ours_prefix) :]
    return None


_DROP = (re.compile(r"\.rotary_emb\.inv_freq$"), re.compile(r"\.original_module\."))
_PEFT_PREFIX = "base_model.model."


def merge_lora(
    state: Mapping[str, torch.Tensor], *, alpha: float = 16.0
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Merge peft LoRA factors into their base weights.

    Handles ``base_model.model.`` prefixes, ``X.base_layer.weight`` (peft >= 0.7) or ``X.weight``
    bases, ``X.lora_A[.default].weight`` [r,in] and ``X.lora_B[.default].weight`` [out,r], and
    ``X.modules_to_save.default.*`` copies (which replace the originals). ``alpha`` is LoRA's
    ``lora_alpha`` (16 in LISA and GSVA; the rank r is read from the factors).

    Returns the merged state, the merged weight names, and the dropped keys.
    """
    plain: dict[str, torch.Tensor] = {}
    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    saved_copies: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        k = key.removeprefix(_PEFT_PREFIX)
        if ".original_module." in k:
            dropped.append(key)
            continue
        m = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", k)
        if m:
            (lora_a if m.group(2) == "A" else lora_b)[m.group(1)] = value
            continue
        if ".modules_to_save." in k:
            base, _, rest = k.partition(".modules_to_save.")
            saved_copies[base + "." + rest.split(".", 1)[1]] = value
            continue
        plain[k.replace(".base_layer.", ".")] = value
    plain.update(saved_copies)
    if set(lora_a) != set(lora_b):
        raise CheckpointImportError(
            f"LoRA factors without a partner: {sorted(set(lora_a) ^ set(lora_b))[:10]}"
        )
    merged = []
    for module, a in lora_a.items():
        wkey = module + ".weight"
        if wkey not in plain:
            raise CheckpointImportError(f"LoRA factors for {module} but no base weight {wkey}")
        b = lora_b[module]
        r = a.shape[0]
        w = plain[wkey]
        plain[wkey] = (w.double() + (alpha / r) * (b.double() @ a.double())).to(w.dtype)
        merged.append(wkey)
    return plain, sorted(merged), dropped


# ------------------------------------------------------------------------------------------- importing


def _resolve_config(config: LisaConfig | str) -> LisaConfig:
    return LisaConfig.from_preset(config) if isinstance(config, str) else config


def import_lisa_checkpoint(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    config: LisaConfig | str,
    *,
    tokenizer: Any | None = None,
    clip_state_dict: Mapping[str, torch.Tensor] | None = None,
    strict: bool = True,
    lora_alpha: float = 16.0,
) -> tuple[Any, ImportReport]:
    """Build a :class:`~reasonseg.model.LisaModel` from an official LISA/GSVA checkpoint.

    Args:
        checkpoint: a state dict, a file, or a Hugging Face model directory (e.g. a download of
            ``xinlai/LISA-7B-v1``).
        config: a :class:`LisaConfig` or preset name (``lisa-7b-v1``, ``lisa-13b-llama2-v1``, ``gsva-7b``);
            the vocabulary size is taken from the checkpoint's embedding.
        tokenizer: the checkpoint's tokenizer (it must hold ``[SEG]`` (and ``[REJ]``) with rows in the
            embedding); default: the one in ``checkpoint`` when it is a directory, else ``config.tokenizer``.
        clip_state_dict: ``CLIPVisionModel`` weights (``vision_model.*``) when the checkpoint has none;
            default: loaded from ``config.vision.clip_pretrained`` (``openai/clip-vit-large-patch14``).
        strict: raise on any leftover, missing or mis-shaped key (else report them).
        lora_alpha: LoRA alpha used if the checkpoint holds unmerged LoRA factors.

    Returns:
        (model in eval mode, :class:`ImportReport`).
    """
    from reasonseg.model.lisa import LisaModel, load_tokenizer

    cfg = _resolve_config(config)
    raw = dict(checkpoint) if isinstance(checkpoint, Mapping) else read_state_dict(checkpoint)
    state, merged, dropped = merge_lora(raw, alpha=lora_alpha)
    for key in list(state):
        if any(p.search(key) for p in _DROP):
            dropped.append(key)
            del state[key]
    has_clip = any(k.startswith("model.vision_tower.") for k in state)
    wants_hub_clip = cfg.vision.kind == "clip" and cfg.vision.clip_pretrained and not cfg.tiny
    if clip_state_dict is None and not has_clip and wants_hub_clip:
        # As the official code does: CLIP comes from its own hub repository.
        from transformers import CLIPVisionModel

        clip_state_dict = CLIPVisionModel.from_pretrained(cfg.vision.clip_pretrained).state_dict()
    if clip_state_dict is not None:
        for k, v in clip_state_dict.items():
            state["model.vision_tower.vision_tower." + k] = v
    embed = state.get("model.embed_tokens.weight")
    if embed is None:
        raise CheckpointImportError(
            "checkpoint has no model.embed_tokens.weight: not a LISA/GSVA checkpoint?"
        )
    cfg.lm.hf_config = {**cfg.lm.hf_config, "vocab_size": int(embed.shape[0])}
    cfg.lm.vocab_resolved = True
    if tokenizer is None:
        src = Path(checkpoint) if isinstance(checkpoint, str | Path) else None
        tokenizer = load_tokenizer(str(src) if src is not None and src.is_dir() else cfg.tokenizer)
    model = LisaModel.from_config(cfg, load_base=False, tokenizer=tokenizer)
    rows = int(embed.shape[0])
    for name, tid in (("seg", model.seg_token_id), ("rej", model.rej_token_id)):
        if tid is not None and tid >= rows:
            raise CheckpointImportError(
                f"the tokenizer's {name} token id {tid} has no row in the checkpoint's {rows}-row embedding"
            )

    ours = model.state_dict()
    needs_clip = cfg.vision.kind == "clip"
    mapping = lisa_key_map([k for k in ours if needs_clip or not k.startswith("mllm.vision_tower.")], cfg)
    report = ImportReport(dropped=sorted(dropped), merged_lora=merged)
    new_state: dict[str, torch.Tensor] = {}
    for official, value in state.items():
        target = mapping.get(official)
        if target is None:
            report.unexpected.append(official)
            continue
        if tuple(value.shape) != tuple(ours[target].shape):
            report.mismatched.append((official, tuple(value.shape), tuple(ours[target].shape)))
            continue
        new_state[target] = value
    clashed = {mapping[k] for k, _, _ in report.mismatched}
    report.missing = sorted(set(mapping.values()) - set(new_state) - clashed)
    # Tied LMs (lm_head shares embed_tokens) have one tensor under two names: either name loads it.
    tied = _tied_aliases(model)
    report.missing = [k for k in report.missing if not (k in tied and tied[k] in new_state)]
    report.unexpected.sort()
    if strict and not report.ok:
        raise CheckpointImportError("checkpoint does not fit the model:\n" + report.describe())
    result = model.load_state_dict(new_state, strict=False)
    report.loaded = len(new_state)
    leftover = [
        k
        for k in result.missing_keys
        if k not in report.missing and k not in clashed and not (k in tied and tied[k] in new_state)
    ]
    if leftover:  # cannot happen when the map is total; guard against silent partial loads
        raise CheckpointImportError(f"model keys left unset after import: {leftover[:10]}")
    return model.eval(), report


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    by_ptr: dict[int, list[str]] = {}
    for k, v in model.state_dict().items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    out = {}
    for names in by_ptr.values():
        for a in names:
            for b in names:
                if a != b:
                    out[a] = b
    return out


def import_gsva_checkpoint(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    config: LisaConfig | str = "gsva-7b",
    **kwargs: Any,
) -> tuple[Any, ImportReport]:
    """GSVA checkpoints: the LISA layout plus ``[REJ]``, often saved with peft LoRA factors, which
    are merged at import. Same arguments as :func:`import_lisa_checkpoint`."""
    cfg = _resolve_config(config)
    if not cfg.use_rej:
        raise ValueError(f"config {cfg.name!r} has use_rej=False; GSVA needs the [REJ] token")
    return import_lisa_checkpoint(checkpoint, cfg, **kwargs)
