"""LisaCollator -> LisaBatch with the tiny tokenizer, real templates and SAM transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reasonseg.data.collate import LisaBatch, LisaCollator
from reasonseg.data.conversation import IGNORE_INDEX
from reasonseg.data.samples import Sample, Turn
from reasonseg.data.templates import seg_turns
from reasonseg.data.transforms import SamTransform


@pytest.fixture(scope="module")
def tokenizer():
    from reasonseg.model.lm import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "[SEG]", "[REJ]"]})
    return tok


def samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 30, 40), np.uint8)
    masks[0, :5] = 1
    masks[2, 10:] = 1
    return [
        Sample(
            rng.integers(0, 255, (30, 40, 3), dtype=np.uint8),
            "a",
            seg_turns("all the fruit", ["seg", "rej", "seg"], is_sentence=False),
            masks,
            "gres",
            "synth",
        ),
        Sample(
            rng.integers(0, 255, (20, 20, 3), dtype=np.uint8),
            "b",
            [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A square.")],
            np.zeros((0, 20, 20), np.uint8),
            "vqa",
            "llava",
        ),
    ]


@pytest.mark.parametrize("template", ["chatml", "llava_v1"])
def test_batch_fields_and_shapes(tokenizer, template: str) -> None:
    col = LisaCollator(tokenizer, template, SamTransform(64), num_image_tokens=4)
    batch = col(samples())
    assert isinstance(batch, LisaBatch) and len(batch) == 2
    assert batch.pixels.shape == (2, 3, 64, 64)
    assert batch.resized_hw == [(48, 64), (64, 64)] and batch.original_hw == [(30, 40), (20, 20)]
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ((batch.input_ids == image_id).sum(1) == 4).all()
    seg, rej = tokenizer.convert_tokens_to_ids(["[SEG]", "[REJ]"])
    row = batch.input_ids[0][batch.attention_mask[0].bool()]
    assert [int(t) for t in row if int(t) in (seg, rej)] == [seg, rej, seg]  # slot order = mask order
    assert (batch.labels[0] == seg).sum() == 2 and (batch.labels[0] == rej).sum() == 1  # answers are targets
    n1 = int(batch.attention_mask[1].sum())
    assert (batch.input_ids[1, n1:] == col.pad_token_id).all() and (
        batch.labels[1, n1:] == IGNORE_INDEX
    ).all()
    assert batch.masks[0].shape == (3, 30, 40) and batch.masks[1].shape == (0, 20, 20)
    assert batch.target_kinds == [["seg", "rej", "seg"], []] and batch.image_keys == ["a", "b"]
    assert batch.kinds == ["gres", "vqa"]


def test_truncated_answer_is_refused(tokenizer) -> None:
    full = LisaCollator(tokenizer, "chatml", SamTransform(32), num_image_tokens=2)(samples()[:1])
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    last_slot = int((full.input_ids[0] == seg).nonzero().max())
    col = LisaCollator(tokenizer, "chatml", SamTransform(32), num_image_tokens=2, max_length=last_slot)
    with pytest.raises(ValueError, match=r"a \(synth\): 2 \[SEG\]/\[REJ\] tokens .* 3 target masks") as err:
        col(samples()[:1])
    assert (
        f"the answer was cut by max_length={last_slot} (the conversation has {full.input_ids.shape[1]} tokens)"
        in str(err.value)
    )


@pytest.mark.parametrize("max_length", [None, 512])
def test_slot_mask_mismatch_without_truncation_blames_the_sample(tokenizer, max_length) -> None:
    """Nothing was cut: the message says the conversation and the masks disagree, not max_length."""
    s = samples()[0]
    two = Sample(s.image, "a", s.turns, s.masks[:2], s.kind, s.source)
    col = LisaCollator(tokenizer, "chatml", SamTransform(32), num_image_tokens=2, max_length=max_length)
    with pytest.raises(ValueError) as err:
        col([two])
    message = str(err.value)
    assert message.startswith(
        "a (synth): 3 [SEG]/[REJ] tokens in the encoded conversation but 2 target masks: "
    )
    assert "the sample's conversation and its masks disagree" in message
    assert "max_length" not in message


def test_works_in_dataloader_workers(tokenizer) -> None:
    col = LisaCollator(tokenizer, "chatml", SamTransform(32), num_image_tokens=2)
    data = samples() * 2
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=col)
    batches = list(loader)
    assert len(batches) == 2 and torch.equal(batches[0].input_ids, col(data[:2]).input_ids)


def test_lisa_vocabulary_without_rej_collates_seg_only_data() -> None:
    """LISA's vocabulary has [SEG] but no [REJ]: [SEG]-only data collates, [REJ] data is refused by name."""
    from reasonseg.model.lm import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "[SEG]"]})
    col = LisaCollator(tok, "llava_v1", SamTransform(32), num_image_tokens=2)
    mask = np.zeros((1, 20, 20), np.uint8)
    mask[0, 5:10] = 1
    seg_only = Sample(
        np.zeros((20, 20, 3), np.uint8),
        "c",
        seg_turns("the square", ["seg"], is_sentence=False),
        mask,
        "referring",
        "x",
    )
    batch = col([seg_only])
    assert int((batch.input_ids == tok.convert_tokens_to_ids("[SEG]")).sum()) == 1
    with pytest.raises(
        ValueError, match=r"a \(synth\): the conversation holds \[REJ\] but the tokenizer has no"
    ):
        col(samples()[:1])
