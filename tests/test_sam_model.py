"""SAM model: configs and presets, strict loading, batched encoding, fused vs plain paths."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reasonseg.model.sam import (
    PRESETS,
    CheckpointError,
    Sam,
    SamConfig,
    TinyViTConfig,
    ViTConfig,
    build_sam,
    load_sam_state_dict,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "reasonseg"


@pytest.fixture(scope="module", params=["tiny_vit", "tiny_vit_t"])
def tiny_sam(request: pytest.FixtureRequest) -> Sam:
    return build_sam(request.param)


def test_presets_and_contract_shapes(tiny_sam: Sam) -> None:
    assert tiny_sam.image_size == 128 and tiny_sam.embed_dim == 32
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        emb = tiny_sam.encode_images(pixels)
        assert emb.shape == (2, 32, 8, 8)
        sparse, dense = tiny_sam.prompt_encoder(None, torch.tensor([[1.0, 2.0, 50.0, 60.0]] * 3), None)
        assert sparse.shape == (3, 2, 32) and dense.shape == (3, 32, 8, 8)
        assert tiny_sam.prompt_encoder.get_dense_pe().shape == (1, 32, 8, 8)
        masks, iou = tiny_sam.mask_decoder(
            emb[:1], tiny_sam.prompt_encoder.get_dense_pe(), sparse, dense, True
        )
        assert masks.shape == (3, 3, 32, 32) and iou.shape == (3, 3)
        # [N, ...] embeddings (one per prompt) give the same result as a shared [1, ...] one.
        masks_n, _ = tiny_sam.mask_decoder(
            emb[:1].expand(3, -1, -1, -1), tiny_sam.prompt_encoder.get_dense_pe(), sparse, dense, True
        )
        torch.testing.assert_close(masks_n, masks)
        with pytest.raises(ValueError, match="image_embeddings has batch 2"):
            tiny_sam.mask_decoder(emb, tiny_sam.prompt_encoder.get_dense_pe(), sparse, dense, True)


def test_real_presets_have_sam_geometry() -> None:
    for name in ("vit_b", "vit_l", "vit_h", "vit_t"):
        cfg = SamConfig.from_name(name)
        assert cfg.image_size == 1024 and cfg.prompt_embed_dim == 256 and cfg.embedding_size == 64
    assert isinstance(PRESETS["vit_t"].encoder, TinyViTConfig)
    assert PRESETS["vit_h"].encoder == ViTConfig(1280, 32, 16, (7, 15, 23, 31))
    with torch.device("meta"):
        sam = build_sam("vit_b")
    assert sum(p.numel() for p in sam.image_encoder.parameters()) == 89_670_912  # Meta's ViT-B encoder


def test_batched_encoding_equals_one_by_one(tiny_sam: Sam) -> None:
    pixels = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        together = tiny_sam.encode_images(pixels)
        chunked = tiny_sam.encode_images(pixels, batch_size=2)
        single = torch.cat([tiny_sam.encode_images(p[None]) for p in pixels])
    torch.testing.assert_close(together, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, single, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected pixels \[B, 3, 128, 128\]"):
        tiny_sam.encode_images(torch.randn(1, 3, 64, 64))


def test_config_validation_and_round_trip(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown SAM preset 'vit_x'"):
        SamConfig.from_name("vit_x")
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 16"):
        SamConfig("bad", image_size=100)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="global_attn_indexes"):
        ViTConfig(depth=2, global_attn_indexes=(5,))
    with pytest.raises(ValueError, match="need 4 stages"):
        TinyViTConfig(embed_dims=(8, 16))
    for name in PRESETS:
        cfg = SamConfig.from_name(name)
        cfg.save(tmp_path / f"{name}.json")
        assert SamConfig.load(tmp_path / f"{name}.json") == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        SamConfig.from_dict({**PRESETS["tiny_vit"].to_dict(), "colour": "red"})


def test_strict_loading_reports_incompatible_keys() -> None:
    sam = build_sam("tiny_vit_t")
    state = dict(sam.state_dict())
    state.pop("mask_decoder.iou_token.weight")
    state["image_encoder.extra.weight"] = torch.zeros(1)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 7)
    with pytest.raises(CheckpointError) as err:
        load_sam_state_dict(build_sam("tiny_vit_t"), state)
    msg = str(err.value)
    assert "1 missing key(s)" in msg and "mask_decoder.iou_token.weight" in msg
    assert "1 unexpected key(s)" in msg and "image_encoder.extra.weight" in msg
    assert "shape mismatch for prompt_encoder.no_mask_embed.weight: model [1, 32], file [1, 7]" in msg
    report = load_sam_state_dict(build_sam("tiny_vit_t"), state, strict=False)
    assert not report.ok and report.missing == ["mask_decoder.iou_token.weight"]


def test_prefixed_checkpoint_file_loads(tmp_path: Path) -> None:
    """SAM inside a bigger checkpoint (as in LISA's ``model.visual_model.*``) loads with a prefix."""
    src = build_sam("tiny_vit")
    path = tmp_path / "lisa.pt"
    torch.save({"model": {f"model.visual_model.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = build_sam("tiny_vit")
    report = load_sam_state_dict(dst, path, prefix="model.visual_model.")
    assert report.ok, report.describe()
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="no keys start with prefix"):
        load_sam_state_dict(dst, path, prefix="nope.")
    with pytest.raises(FileNotFoundError, match="SAM checkpoint not found"):
        build_sam("tiny_vit", checkpoint=tmp_path / "missing.pt")


@pytest.mark.weights
def test_mobile_sam_checkpoint_loads_strictly(mobile_sam_checkpoint: Path) -> None:
    sam = build_sam("vit_t")
    report = load_sam_state_dict(sam, mobile_sam_checkpoint)
    assert report.ok and not report.missing and not report.unexpected
    assert sum(p.numel() for p in sam.parameters()) == 10_130_092


def test_tiny_vit_fused_path_equals_plain_path() -> None:
    """Inference (fused oneDNN kernels, cached biases) matches the autograd path (plain ops)."""
    sam = build_sam("tiny_vit_t")
    with torch.no_grad():
        for name, t in sam.image_encoder.named_buffers():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                t.normal_()
        for p in sam.image_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        fused = sam.image_encoder(x)
    plain = sam.image_encoder(x)  # grad enabled: plain ops
    assert plain.requires_grad
    torch.testing.assert_close(fused, plain.detach(), atol=1e-5, rtol=1e-5)
    # The cached attention bias follows in-place parameter updates.
    blk = sam.image_encoder.layers[1].blocks[0]
    with torch.no_grad():
        blk.attn.attention_biases.add_(1.0)
        after = sam.image_encoder(x)
    assert not torch.allclose(after, fused)
    torch.testing.assert_close(after, sam.image_encoder(x).detach(), atol=1e-5, rtol=1e-5)


def test_dense_pe_is_computed_once_and_follows_its_buffer(tiny_sam: Sam) -> None:
    pe = tiny_sam.prompt_encoder
    with torch.no_grad():
        first = pe.get_dense_pe()
        assert pe.get_dense_pe() is first  # memoised
        fresh = pe.pe_layer(pe.image_embedding_size).unsqueeze(0)
        torch.testing.assert_close(first, fresh, rtol=0, atol=0)
        state = {k: v * 2 for k, v in pe.state_dict().items()}
        pe.load_state_dict(state)  # copies into the buffer in place: its version changes
        changed = pe.get_dense_pe()
        assert changed is not first
        torch.testing.assert_close(changed, pe.pe_layer(pe.image_embedding_size).unsqueeze(0))
        pe.load_state_dict({k: v / 2 for k, v in state.items()})
    assert pe.get_dense_pe() is not pe.get_dense_pe()  # with autograd on: never shared
    # The memos (prompt encoder, mask decoder) keep the modules picklable and copyable.
    with torch.no_grad():
        emb = torch.randn(1, tiny_sam.embed_dim, *pe.image_embedding_size)
        prompt = torch.randn(1, 1, tiny_sam.embed_dim)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *pe.image_embedding_size)
        before = tiny_sam.mask_decoder(emb, pe.get_dense_pe(), prompt, dense, False)[0]
        clone = pickle.loads(pickle.dumps(tiny_sam))
        again = clone.mask_decoder(emb, clone.prompt_encoder.get_dense_pe(), prompt, dense, False)[0]
        torch.testing.assert_close(again, before)
        copy.deepcopy(tiny_sam)


def test_mask_decoder_memoises_the_image_layout_and_follows_in_place_changes(tiny_sam: Sam) -> None:
    pe = tiny_sam.prompt_encoder
    dec = tiny_sam.mask_decoder
    with torch.no_grad():
        batch = torch.randn(2, tiny_sam.embed_dim, *pe.image_embedding_size)
        emb = batch[:1]
        prompt = torch.randn(2, 1, tiny_sam.embed_dim)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(2, -1, *pe.image_embedding_size)
        first = dec(emb, pe.get_dense_pe(), prompt, dense, False)[0]
        memo = dec.__dict__["_image_memo"][2]
        # The same image, sliced anew as the model does per query: laid out once.
        assert dec(batch[:1], pe.get_dense_pe(), prompt, dense, False)[0].equal(first)
        assert dec.__dict__["_image_memo"][2] is memo
        dec(batch[1:], pe.get_dense_pe(), prompt, dense, False)  # another image: a new layout
        assert dec.__dict__["_image_memo"][2] is not memo
        dec(emb, pe.get_dense_pe(), prompt, dense, False)
        batch.mul_(-1)  # in place, through the base: the memo must not serve the old layout
        flipped = dec(emb, pe.get_dense_pe(), prompt, dense, False)[0]
        fresh = copy.deepcopy(dec)
        fresh.__dict__.pop("_image_memo")
        torch.testing.assert_close(flipped, fresh(emb, pe.get_dense_pe(), prompt, dense, False)[0])
        assert not torch.allclose(flipped, first)


def test_training_mode_backpropagates() -> None:
    sam = build_sam("tiny_vit_t").train()
    out = sam.image_encoder(torch.randn(2, 3, 128, 128))
    out.square().mean().backward()
    grads = [p.grad for p in sam.image_encoder.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sam.image_encoder.layers[0].blocks[0].conv1.bn.num_batches_tracked.item() == 1


def test_attention_goes_through_sdpa(monkeypatch: pytest.MonkeyPatch, tiny_sam: Sam) -> None:
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    from reasonseg.model.sam import common

    few_keys = []
    real_few = common._attention_few_keys

    def counting_few(*args: object) -> torch.Tensor:
        few_keys.append(1)
        return real_few(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    monkeypatch.setattr(common, "_attention_few_keys", counting_few)
    with torch.no_grad():
        emb = tiny_sam.encode_images(torch.randn(1, 3, 128, 128))
        n_encoder = len(calls)
        assert not few_keys
        tiny_sam.decode(emb, boxes=torch.tensor([[1.0, 2.0, 30.0, 40.0]]))
    assert n_encoder >= 2  # every encoder attention block
    # two-way transformer: 2 blocks x 3 attentions + final; on a CPU the image-to-token attention of
    # each block (64 image positions, 7 prompt tokens) takes the few-keys form, the rest SDPA
    assert len(calls) - n_encoder == 5 and len(few_keys) == 2


def test_few_keys_attention_matches_sdpa() -> None:
    from reasonseg.model.sam.common import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, n, 16, generator=g) for n in (300, 7, 7))
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        attention(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3)
    )
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.05
    q.requires_grad_(True)
    attention(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_folded_cross_attention_matches_the_plain_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAM's cross attentions between a few prompt tokens and many image tokens fold the image-side
    projections into the tokens' side on a CPU in float32 without autograd: equal to the plain form
    (projections, SDPA, output projection), both directions, with and without a residual, batch 1 and
    3; autograd, bf16 and small maps keep the plain form."""
    from reasonseg.model.sam.transformer import Attention

    torch.manual_seed(0)
    attn = Attention(256, 8, downsample_rate=2)  # the mask decoder's cross attentions
    taken = []
    for name in ("_few_keys", "_few_queries"):
        real = getattr(Attention, name)
        monkeypatch.setattr(
            Attention, name, lambda self, *a, _r=real, _n=name: taken.append(_n) or _r(self, *a)
        )
    for batch in (1, 3):
        image = torch.randn(batch, 300, 256)
        tokens = torch.randn(batch, 6, 256)
        for q, kv in ((image, tokens), (tokens, image)):
            for residual in (None, torch.randn(q.shape)):
                taken.clear()
                want = attn(q, kv, kv + 1, residual=residual).detach()  # autograd: the plain form
                assert not taken
                with torch.no_grad():
                    got = attn(q, kv, kv + 1, residual=residual)
                assert taken == ["_few_keys" if q is image else "_few_queries"]
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    taken.clear()
    with torch.no_grad():
        attn(torch.randn(1, 64, 256), torch.randn(1, 6, 256), torch.randn(1, 6, 256))  # an 8x8 map
        half = copy.deepcopy(attn).bfloat16()
        half(torch.randn(1, 300, 256).bfloat16(), *[torch.randn(1, 6, 256).bfloat16()] * 2)
    assert not taken


def test_no_hard_coded_cuda_calls() -> None:
    files = [
        *(SRC / "model" / "sam").glob("*.py"),
        SRC / "data" / "transforms.py",
        SRC / "inference" / "sam_predictor.py",
    ]
    for f in files:
        assert not re.search(r"\.cuda\(", f.read_text()), f
