"""Conversation templates: rendering, label masking, image-placeholder expansion."""

from __future__ import annotations

import pytest
import torch

from reasonseg.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    Turn,
    encode_conversation,
    get_template,
)
from reasonseg.model.lm import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tiny_tokenizer()
    tok.add_tokens(
        ["[SEG]", "[REJ]", IMAGE_TOKEN, "<im_start>", "<im_end>", "<|im_start|>", "<|im_end|>"],
        special_tokens=True,
    )
    return tok


def test_llava_v1_render_matches_the_vicuna_v1_layout() -> None:
    tpl = get_template("llava_v1")
    text = tpl.render([Turn("user", "<image>\nq1"), Turn("assistant", "a1"), Turn("user", "q2")], True)
    assert text.endswith(" USER: <im_start><image><im_end>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:")
    assert text.startswith("A chat between a curious human")


def test_chatml_render_matches_smollm2_chat_template() -> None:
    text = get_template("chatml").render([Turn("user", "hi")], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("template", ["llava_v1", "chatml"])
def test_labels_cover_exactly_the_answers_and_stop_tokens(tokenizer, template: str) -> None:
    turns = [
        Turn("user", "Segment it."),
        Turn("assistant", "Sure, [SEG]."),
        Turn("user", "More?"),
        Turn("assistant", "No [REJ]."),
    ]
    enc = encode_conversation(tokenizer, template, turns, num_image_tokens=5)
    target_text = tokenizer.decode(enc.input_ids[enc.labels != IGNORE_INDEX])
    stop = get_template(template).stop
    assert target_text.replace(" ", "") == f"Sure,[SEG].{stop}No[REJ].{stop}".replace(" ", "")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((enc.input_ids == image_id).sum()) == 5
    assert bool((enc.labels[enc.input_ids == image_id] == IGNORE_INDEX).all())
    # The five image positions are contiguous: the placeholder expanded in place.
    pos = (enc.input_ids == image_id).nonzero().flatten()
    assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + 5))


def test_placeholder_is_added_to_first_user_turn_when_missing(tokenizer) -> None:
    enc = encode_conversation(
        tokenizer, "chatml", [Turn("user", "q")], num_image_tokens=3, add_generation_prompt=True
    )
    assert "<|im_start|>user\n<image>\nq" in enc.text
    assert enc.num_image_tokens == 3


def test_errors_name_the_problem(tokenizer) -> None:
    with pytest.raises(ValueError, match="one <image> placeholder"):
        encode_conversation(tokenizer, "chatml", [Turn("user", "<image><image>")], 4)
    with pytest.raises(ValueError, match="alternate"):
        encode_conversation(tokenizer, "chatml", [Turn("assistant", "x")], 0)
    with pytest.raises(ValueError, match="cut the 40 image tokens"):
        encode_conversation(tokenizer, "chatml", [Turn("user", "q")], 40, max_length=30)
    with pytest.raises(KeyError, match="unknown conversation template"):
        get_template("vicuna_v9")
    with pytest.raises(ValueError, match="role"):
        Turn("system", "x")  # type: ignore[arg-type]


def test_truncation_keeps_image_and_cuts_the_tail(tokenizer) -> None:
    turns = [Turn("user", "q"), Turn("assistant", "a long answer " * 10)]
    full = encode_conversation(tokenizer, "chatml", turns, 4)
    cut = encode_conversation(tokenizer, "chatml", turns, 4, max_length=len(full) - 7)
    assert len(cut) == len(full) - 7
    assert torch.equal(cut.input_ids, full.input_ids[: len(cut)])
