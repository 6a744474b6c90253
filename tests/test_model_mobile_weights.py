"""lisa-mobile with the real weights (SmolLM2-135M-Instruct + MobileSAM, untrained LISA head) end to end
on a real photograph, on the CPU. The weights come through the registry into $REASONSEG_HOME."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reasonseg.data.conversation import Turn, encode_conversation
from reasonseg.inference.predictor import ReasonSegPredictor
from reasonseg.model import LisaModel

pytestmark = [pytest.mark.weights, pytest.mark.slow]


@pytest.fixture(scope="module")
def mobile() -> LisaModel:
    return LisaModel.from_preset("lisa-mobile")


def _photo() -> np.ndarray:
    import skimage.data

    return skimage.data.coffee()  # 400x600 RGB photograph


def test_base_weights_are_the_real_ones(mobile: LisaModel, mobile_sam_checkpoint: Path) -> None:
    sd = torch.load(mobile_sam_checkpoint, map_location="cpu", weights_only=True)
    key = "mask_decoder.iou_token.weight"
    assert torch.equal(mobile.sam.state_dict()[key], sd[key])
    lm = mobile.mllm.lm
    assert lm.config.hidden_size == 576 and lm.config.num_hidden_layers == 30
    # Tied embeddings stay tied after adding [SEG]/[REJ]/<image>.
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    assert lm.get_input_embeddings().num_embeddings == len(mobile.tokenizer)
    # The instruct LM answers in words (the untrained head only adds tokens, it does not change the LM).
    ids = encode_conversation(
        mobile.tokenizer,
        "chatml",
        [Turn("user", "What is the capital of France?")],
        0,
        add_generation_prompt=True,
    ).input_ids
    out = mobile.generate([ids], None, max_new_tokens=8)
    assert "Paris" in out.texts[0]


def test_predictor_on_a_real_photo_encodes_once(mobile: LisaModel) -> None:
    calls: list[int] = []
    handle = mobile.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        pred = ReasonSegPredictor(mobile, max_new_tokens=8)
        pred.set_image(_photo())
        first = pred.predict("Can you segment the cup in this image?")
        follow = pred.predict("What could I drink from?", history=first.history)
    finally:
        handle.remove()
    assert len(calls) == 1
    for r in (first, follow):
        assert r.text.strip()
        assert r.masks.dtype == bool and r.masks.shape[1:] == (400, 600)
        assert len(r.targets) == r.masks.shape[0] + sum(r.rejected)


def test_teacher_forced_seg_gives_a_mask_and_delta_checkpoint_is_small(
    mobile: LisaModel, tmp_path: Path
) -> None:
    from reasonseg.data.transforms import SamTransform

    prep = SamTransform(1024).prepare(_photo())
    feats = mobile.encode_images(prep.pixels[None], [prep.resized_hw], [prep.original_hw])
    enc = encode_conversation(
        mobile.tokenizer,
        "chatml",
        [Turn("user", "Segment the cup."), Turn("assistant", "Sure, it is [SEG].")],
        mobile.num_image_tokens,
    )
    with torch.no_grad():
        out = mobile(input_ids=enc.input_ids[None], images=feats)
    assert out.kinds == [["seg"]] and out.masks is not None and out.masks[0].logits.shape == (1, 400, 600)

    mobile.save_pretrained(tmp_path / "m", delta=True)
    size = (tmp_path / "m" / "delta.safetensors").stat().st_size
    assert size < 30e6, size  # projector + head + new token rows, not the base weights
    loaded = LisaModel.from_pretrained(tmp_path / "m")
    ours, theirs = mobile.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit-identical weights
    with torch.no_grad():
        again = loaded(input_ids=enc.input_ids[None], images=feats)
    # Same weights, a second instance: only float summation order may differ.
    torch.testing.assert_close(again.logits, out.logits, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(again.masks[0].logits, out.masks[0].logits, atol=1e-3, rtol=1e-4)
