"""Importers of official LISA/GSVA checkpoints, on state dicts with exactly the official key names at
tiny sizes: the LM under LLaMA's names, SAM under Meta's (built with Meta's own ``segment_anything``
modules), ``model.mm_projector``, ``model.text_hidden_fcs.0.{0,2}``, CLIP under HF's names."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from lisa_tiny_helpers import prompt_ids, single_thread
from oracles import import_segment_anything
from reasonseg.convert.lisa import (
    CheckpointImportError,
    import_gsva_checkpoint,
    import_lisa_checkpoint,
    merge_lora,
    read_state_dict,
)
from reasonseg.model import LisaConfig, LisaModel, add_lisa_tokens, load_tokenizer


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _official_parts(preset: str, seed: int = 0):
    """The official model's parts, built independently of reasonseg, with random weights; the
    tokenizer is the tiny test one with LISA's tokens."""
    sa = import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    cfg = LisaConfig.from_preset(preset, tiny=True)
    tok = load_tokenizer("tiny")
    # The official tokenizer already holds LISA's tokens; only <image> is new here, so it comes last.
    official = ["[SEG]", *(["[REJ]"] if cfg.use_rej else []), "<im_start>", "<im_end>"]
    tok.add_tokens(official, special_tokens=True)
    assert add_lisa_tokens(tok, cfg) == ["<image>"]
    vocab = len(tok) - 1  # like the official checkpoints: no embedding row for <image> (it is the last token)
    assert tok.convert_tokens_to_ids("<image>") == vocab
    h = cfg.lm.hidden_size
    llama = LlamaForCausalLM(
        LlamaConfig(
            **{k: v for k, v in cfg.lm.hf_config.items() if k != "model_type"} | {"vocab_size": vocab}
        )
    )
    clip = CLIPVisionModel(CLIPVisionConfig(**cfg.vision.clip))
    projector = nn.Linear(cfg.vision.out_dim, h)
    text_hidden_fcs = nn.ModuleList(
        [nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 32), nn.Dropout(0.0))]
    )
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=128,
            embed_dim=32,
            depth=2,
            num_heads=2,
            out_chans=32,
            window_size=4,
            global_attn_indexes=(1,),
            use_rel_pos=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=32,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, num_heads=2, mlp_dim=64),
            iou_head_hidden_dim=32,
        ),
    )
    for i, m in enumerate((llama, clip, projector, text_hidden_fcs, sam)):
        _randomise(m, seed + i)
    del sa
    return cfg, tok, llama, clip, projector, text_hidden_fcs, sam


def _official_state_dict(llama, projector, text_hidden_fcs, sam) -> dict[str, torch.Tensor]:
    """Keys exactly as in xinlai/LISA-7B-v1: LLaMA's own names, then LISA's additions."""
    sd = dict(
        llama.state_dict()
    )  # model.embed_tokens.weight, model.layers.N..., model.norm.weight, lm_head.weight
    sd["model.mm_projector.weight"] = projector.weight
    sd["model.mm_projector.bias"] = projector.bias
    sd.update({f"model.text_hidden_fcs.{k}": v for k, v in text_hidden_fcs.state_dict().items()})
    sd.update({f"model.visual_model.{k}": v for k, v in sam.state_dict().items()})
    return {k: v.clone() for k, v in sd.items()}


def _direct_model(cfg, tok, llama, clip, projector, text_hidden_fcs, sam) -> LisaModel:
    """The same weights set module by module, without the importer."""
    cfg = LisaConfig.from_dict(cfg.to_dict())
    cfg.lm.hf_config = {**cfg.lm.hf_config, "vocab_size": llama.config.vocab_size}
    cfg.lm.vocab_resolved = True
    model = LisaModel.from_config(cfg, tokenizer=tok)
    model.mllm.lm.load_state_dict(llama.state_dict(), strict=True)
    model.mllm.vision_tower.clip.load_state_dict(clip.state_dict(), strict=True)
    model.mllm.projector.layers[0].load_state_dict(projector.state_dict(), strict=True)
    model.text_hidden_fcs.load_state_dict(text_hidden_fcs[0].state_dict(), strict=True)
    model.sam.load_state_dict(sam.state_dict(), strict=True)
    return model.eval()


@pytest.mark.parametrize("preset", ["lisa-7b-v1", "gsva-7b"])
def test_official_lisa_keys_import_strictly_and_match_direct_loading(preset: str) -> None:
    cfg, tok, llama, clip, projector, thf, sam = _official_parts(preset)
    sd = _official_state_dict(llama, projector, thf, sam)
    assert (
        "model.text_hidden_fcs.0.0.weight" in sd and "model.visual_model.mask_decoder.iou_token.weight" in sd
    )
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # saved by old transformers
    imported, report = import_lisa_checkpoint(sd, cfg, tokenizer=tok, clip_state_dict=clip.state_dict())
    assert report.ok and report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.dropped == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert report.loaded == len(imported.state_dict())
    direct = _direct_model(cfg, tok, llama, clip, projector, thf, sam)
    for k, v in direct.state_dict().items():
        assert torch.equal(imported.state_dict()[k], v), k

    pixels = torch.randn(2, 3, 128, 128)
    feats_a = imported.encode_images(pixels, original_hw=[(50, 60), (64, 40)])
    feats_b = direct.encode_images(pixels, original_hw=[(50, 60), (64, 40)])
    ids = prompt_ids(imported, "Segment the cat.")
    answer = torch.tensor(tok.convert_tokens_to_ids(["[SEG]", "[SEG]"]))
    full = torch.cat([ids, answer])[None].repeat(2, 1)
    out_a = imported(input_ids=full, images=feats_a)
    out_b = direct(input_ids=full, images=feats_b)
    assert torch.equal(out_a.logits, out_b.logits)
    for ma, mb in zip(out_a.masks, out_b.masks, strict=True):
        assert torch.equal(ma.logits, mb.logits)
    gen_a = imported.generate([ids, ids[2:]], feats_a, max_new_tokens=8)
    gen_b = direct.generate([ids, ids[2:]], feats_b, max_new_tokens=8)
    assert [s.tolist() for s in gen_a.sequences] == [s.tolist() for s in gen_b.sequences]


def test_leftovers_missing_and_shape_clashes_are_reported() -> None:
    cfg, tok, llama, clip, projector, thf, sam = _official_parts("lisa-7b-v1")
    sd = _official_state_dict(llama, projector, thf, sam)
    sd["model.some_new_head.weight"] = torch.zeros(3)
    del sd["model.visual_model.mask_decoder.iou_token.weight"]
    sd["model.mm_projector.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointImportError) as err:
        import_lisa_checkpoint(sd, cfg, tokenizer=tok, clip_state_dict=clip.state_dict())
    msg = str(err.value)
    assert "model.some_new_head.weight" in msg and "sam.mask_decoder.iou_token.weight" in msg
    assert "model.mm_projector.bias" in msg
    _, report = import_lisa_checkpoint(
        sd, cfg, tokenizer=tok, clip_state_dict=clip.state_dict(), strict=False
    )
    assert report.unexpected == ["model.some_new_head.weight"]
    assert report.missing == ["sam.mask_decoder.iou_token.weight"]
    assert report.mismatched == [("model.mm_projector.bias", (5,), (64,))]
    # Without CLIP weights, every CLIP key is missing: strict loading refuses.
    sd = _official_state_dict(llama, projector, thf, sam)
    with pytest.raises(CheckpointImportError, match=r"mllm\.vision_tower\.clip"):
        import_lisa_checkpoint(sd, cfg, tokenizer=tok)


def test_gsva_lora_checkpoint_is_merged_at_import() -> None:
    cfg, tok, llama, clip, projector, thf, sam = _official_parts("gsva-7b", seed=10)
    merged_sd = _official_state_dict(llama, projector, thf, sam)
    # The same model saved by peft: prefix, base_layer, LoRA factors (r=8, alpha=16) on q_proj/v_proj.
    g = torch.Generator().manual_seed(5)
    peft_sd: dict[str, torch.Tensor] = {}
    for k, v in merged_sd.items():
        m = k.startswith("model.layers.") and k.endswith(("q_proj.weight", "v_proj.weight"))
        if not m:
            peft_sd["base_model.model." + k] = v
            continue
        stem = k[: -len(".weight")]
        a = torch.randn(8, v.shape[1], generator=g) * 0.1
        b = torch.randn(v.shape[0], 8, generator=g) * 0.1
        peft_sd[f"base_model.model.{stem}.base_layer.weight"] = v - 2.0 * (b @ a)
        peft_sd[f"base_model.model.{stem}.lora_A.default.weight"] = a
        peft_sd[f"base_model.model.{stem}.lora_B.default.weight"] = b
    merged, names, _ = merge_lora(peft_sd, alpha=16.0)
    assert len(names) == 2 * cfg.lm.hf_config["num_hidden_layers"]
    for k in names:
        torch.testing.assert_close(merged[k], merged_sd[k], atol=1e-6, rtol=0)
    model, report = import_gsva_checkpoint(peft_sd, cfg, tokenizer=tok, clip_state_dict=clip.state_dict())
    assert report.ok and len(report.merged_lora) == len(names)
    direct = _direct_model(cfg, tok, llama, clip, projector, thf, sam)
    ids = prompt_ids(model, "a")[None]
    feats = model.encode_images(torch.randn(1, 3, 128, 128))
    torch.testing.assert_close(
        model(input_ids=ids, images=feats).logits,
        direct(input_ids=ids, images=feats).logits,
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="use_rej=False"):
        import_gsva_checkpoint(peft_sd, "lisa-7b-v1")


def test_tokenizer_tokens_without_embedding_rows_are_refused() -> None:
    cfg, tok, llama, clip, projector, thf, sam = _official_parts("lisa-7b-v1")
    sd = _official_state_dict(llama, projector, thf, sam)
    seg = tok.convert_tokens_to_ids("[SEG]")
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:seg]
    sd["lm_head.weight"] = sd["lm_head.weight"][:seg]
    with pytest.raises(CheckpointImportError, match="seg token id"):
        import_lisa_checkpoint(sd, cfg, tokenizer=tok, clip_state_dict=clip.state_dict())


def test_a_file_that_is_no_checkpoint_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("photo.jpg", "model.safetensors", "weights.bin"):
        path = tmp_path / name
        path.write_bytes(b"\xff\xd8 not a checkpoint")
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + ": not a"):
            read_state_dict(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(read_state_dict(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_a_broken_safetensors_checkpoint_is_named(tmp_path: Path) -> None:
    from reasonseg.convert.lisa import read_state_dict

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        read_state_dict(bad)
