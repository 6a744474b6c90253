"""ReasonSegPredictor on tiny models: one encoder pass per image, targets and rejections, history."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from lisa_tiny_helpers import single_thread, tiny_model, train_to_answer
from reasonseg.inference.predictor import PromptTooLongError, ReasonSegPredictor, target_labels


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module", params=["gsva-7b", "lisa-mobile"])
def predictor(request) -> ReasonSegPredictor:
    """A tiny model trained to answer 'Sure, a:[SEG], b:[REJ], c:[SEG].' about one photo-sized image."""
    with single_thread():
        model = tiny_model(request.param)
        pred = ReasonSegPredictor(model, max_new_tokens=24)
        pred.set_image(_image())
        train_to_answer(model, pred._features)
        return pred


def _image() -> np.ndarray:
    return (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)


def test_n_instructions_run_the_image_encoder_exactly_once(predictor: ReasonSegPredictor) -> None:
    calls = []
    encoder = predictor.model.sam.image_encoder
    handle = encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        predictor.set_image(_image())
        results = [
            predictor.predict(q)
            for q in ["Segment the cat.", "What is here?", "Anything else?", "Find a, b and c please."]
        ]
        results += predictor.predict_batch(["What is here?", "More?"])
        predictor.predict("And now?", history=results[0].history)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert all(r.masks.shape[1:] == (90, 120) for r in results)


def test_seg_rej_seg_gives_two_masks_and_one_rejection_in_order(predictor: ReasonSegPredictor) -> None:
    pred = predictor.predict("Segment the cat.")
    assert pred.text == "Sure, a:[SEG], b:[REJ], c:[SEG]."
    assert [t.kind for t in pred.targets] == ["seg", "rej", "seg"]
    assert pred.rejected == [False, True, False]
    assert pred.masks.shape == (2, 90, 120) and pred.masks.dtype == bool
    assert pred.scores.shape == (2,) and pred.iou_predictions.shape == (2,)
    assert [t.label for t in pred.targets] == ["a", "b", "c"] and pred.labels == ["a", "c"]
    assert [t.mask_index for t in pred.targets] == [0, None, 1]
    # score = mean sigmoid over the mask's pixels
    logits = predictor.predict("Segment the cat.", return_logits=True).logits
    assert logits is not None
    for k in range(2):
        inside = logits[k][pred.masks[k]]
        expected = float(torch.sigmoid(torch.from_numpy(inside)).mean()) if inside.size else 0.0
        assert pred.scores[k] == pytest.approx(expected, abs=1e-5)


def test_prefix_cache_and_batch_give_the_same_answers_as_plain_predict(predictor: ReasonSegPredictor) -> None:
    questions = ["Segment the cat.", "Where is the dog, if there is one?", "?"]
    cached = [predictor.predict(q) for q in questions]
    assert predictor.draft_answers  # the fixture drafts answers; the reference decodes token by token
    plain = ReasonSegPredictor(predictor.model, max_new_tokens=24, cache_prefix=False, draft_answers=False)
    plain.set_image(_image())
    batch = predictor.predict_batch(questions)
    for q, a, b in zip(questions, cached, batch, strict=True):
        c = plain.predict(q)
        assert a.text == b.text == c.text, q
        assert np.array_equal(a.masks, c.masks) and a.masks.shape == b.masks.shape


def test_history_is_kept_across_turns(predictor: ReasonSegPredictor) -> None:
    first = predictor.predict("Segment the cat.")
    assert [t.role for t in first.history] == ["user", "assistant"]
    second = predictor.predict("And the dog?", history=first.history)
    assert [t.text for t in second.history[:2]] == ["Segment the cat.", first.text]
    assert len(second.history) == 4
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        predictor.predict("x", history=second.history[:-1])


def test_history_as_chat_messages_or_pairs(predictor: ReasonSegPredictor) -> None:
    """History given as chat-API messages ({"role", "content"}) or (role, text) pairs means the same as
    Turns; anything else is refused with the index of the bad element."""
    first = predictor.predict("Segment the cat.")
    want = predictor.predict("And the dog?", history=first.history)
    as_dicts = [{"role": t.role, "content": t.text} for t in first.history]
    as_pairs = [(t.role, t.text) for t in first.history]
    for history in (as_dicts, as_pairs):
        got = predictor.predict("And the dog?", history=history)
        assert got.text == want.text and got.history == want.history
        np.testing.assert_array_equal(got.masks, want.masks)
    with pytest.raises(
        ValueError, match=r"history\[1\]: a message needs 'role' and 'content', missing 'role'"
    ):
        predictor.predict("x", history=[as_dicts[0], {"content": "hi"}])
    with pytest.raises(
        ValueError, match=r"history\[0\]: Turn.role must be 'user' or 'assistant', got 'system'"
    ):
        predictor.predict("x", history=[("system", "be brief"), as_pairs[1]])
    with pytest.raises(TypeError, match=r"history\[0\]: expected a Turn.*got str"):
        predictor.predict("x", history=["Segment the cat."])


def test_a_prompt_over_the_lm_context_is_refused(predictor: ReasonSegPredictor) -> None:
    context = predictor.model.config.lm.hf_config["max_position_embeddings"]
    with pytest.raises(PromptTooLongError, match=f"over the LM's context of {context} tokens"):
        predictor.predict("cat " * context)
    with pytest.raises(PromptTooLongError, match="the answer may take"):
        predictor.predict_batch(["the cat", "dog " * context])
    # a prompt that fits, but not with its answer budget
    ids = predictor._prompt("the cat", None)[1]
    with pytest.raises(PromptTooLongError):
        predictor.predict("the cat", max_new_tokens=context - len(ids) + 1)
    assert predictor.predict("the cat", max_new_tokens=4).text  # the predictor is still usable


def test_a_next_turn_reuses_the_last_conversation_cache(predictor: ReasonSegPredictor) -> None:
    plain = ReasonSegPredictor(predictor.model, max_new_tokens=24, cache_prefix=False, draft_answers=False)
    plain.set_image(_image())
    predictor.set_image(_image())
    fed: list[int] = []
    orig = predictor.model.mllm.run_decoder

    def counting(embeds, *args, **kwargs):
        fed.append(int(embeds.shape[1]))
        return orig(embeds, *args, **kwargs)

    predictor.model.mllm.run_decoder = counting  # type: ignore[method-assign]
    try:
        first = predictor.predict("Segment the cat.")
        ids_first = predictor._conversation[1]  # type: ignore[index]
        fed.clear()
        second = predictor.predict("And the dog?", history=first.history)
    finally:
        del predictor.model.mllm.run_decoder
    # Only the new turn (and the answer) ran through the LM; the earlier turns came from the cache.
    new_turn = len(predictor._prompt("And the dog?", first.history)[1]) - len(ids_first)  # type: ignore[arg-type]
    assert 0 < fed[0] - new_turn <= predictor.max_new_tokens  # the new turn plus a drafted answer
    ref_first = plain.predict("Segment the cat.")
    ref_second = plain.predict("And the dog?", history=ref_first.history)
    assert (first.text, second.text) == (ref_first.text, ref_second.text)
    np.testing.assert_array_equal(second.masks, ref_second.masks)
    predictor.set_image(_image())
    assert predictor._conversation is None  # a new image starts a new conversation


def test_predict_without_an_image_is_an_error() -> None:
    pred = ReasonSegPredictor(tiny_model("lisa-mobile"))
    with pytest.raises(RuntimeError, match="set_image"):
        pred.predict("hi")


def test_target_labels_parse_gsva_answers() -> None:
    slots = ["[SEG]", "[REJ]"]
    assert target_labels("Sure, they are the red car:[SEG], a dog:[REJ] and man:[SEG].", slots) == [
        "the red car",
        "a dog",
        "man",
    ]
    assert target_labels("Sure, it is [SEG].", slots) == [""]


def test_token_budget_below_one_and_extreme_aspect_ratios(predictor: ReasonSegPredictor) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_new_tokens must be >= 1, got {bad}"):
            predictor.predict("x", max_new_tokens=bad)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        ReasonSegPredictor(predictor.model, max_new_tokens=0)
    # 4000x1: the short side used to round to 0 px and crash the resize; masks keep the original size.
    predictor.set_image(np.full((1, 4000, 3), 100, np.uint8))
    out = predictor.predict("the cup", max_new_tokens=4)
    assert out.masks.shape[1:] == (1, 4000)
