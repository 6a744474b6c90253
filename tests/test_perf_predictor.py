"""Performance paths keep the outputs: the shared image prefix in batched decoding, the decode loop's
step count, and the per-image work done once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from lisa_tiny_helpers import prompt_ids, single_thread, tiny_model
from reasonseg.inference.predictor import ReasonSegPredictor
from reasonseg.model import LisaModel

QUESTIONS = ["Segment the cat.", "?", "Where is the dog in this picture, if there is one at all?"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def model() -> LisaModel:
    with single_thread():
        return tiny_model("lisa-mobile")


def _image() -> np.ndarray:
    return (np.random.default_rng(1).random((70, 100, 3)) * 255).astype(np.uint8)


def _predictor(model: LisaModel, **kw: object) -> ReasonSegPredictor:
    pred = ReasonSegPredictor(model, max_new_tokens=12, **kw)  # type: ignore[arg-type]
    pred.set_image(_image())
    return pred


@dataclass
class _Calls:
    prefixes: int = 0  # LisaModel.prefix_cache calls
    runs: list[tuple[int, int]] = field(default_factory=list)  # (rows, tokens) of each LM pass

    @property
    def lengths(self) -> list[int]:
        return [n for _, n in self.runs]


@contextmanager
def _spy(model: LisaModel) -> Iterator[_Calls]:
    """Counts the model's prefix-cache calls and records the shape of every LM pass meanwhile."""
    calls = _Calls()
    real_prefix, real_run = model.prefix_cache, model.mllm.run_decoder

    def spy_prefix(*a, **k):  # type: ignore[no-untyped-def]
        calls.prefixes += 1
        return real_prefix(*a, **k)

    def spy_run(embeds, *a, **k):  # type: ignore[no-untyped-def]
        calls.runs.append((int(embeds.shape[0]), int(embeds.shape[1])))
        return real_run(embeds, *a, **k)

    model.prefix_cache, model.mllm.run_decoder = spy_prefix, spy_run  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del model.prefix_cache, model.mllm.run_decoder


def test_batched_generate_on_a_shared_prefix_equals_each_prompt_alone(model: LisaModel) -> None:
    pred = _predictor(model)
    prompts = [prompt_ids(model, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3  # the rests differ in length: padding after the prefix
    prefix = pred._prefix_for(prompts[0])
    assert prefix is not None
    feats = pred._features
    assert feats is not None
    batch = model.generate(prompts, feats.select([0, 0, 0]), max_new_tokens=12, prefix_cache=prefix)
    for i, p in enumerate(prompts):
        alone = model.generate([p], feats, max_new_tokens=12, use_cache=False)
        assert batch.sequences[i].tolist() == alone.sequences[0].tolist(), QUESTIONS[i]
        assert batch.kinds[i] == alone.kinds[0]
        assert batch.masks is not None and alone.masks is not None
        torch.testing.assert_close(batch.masks[i].logits, alone.masks[0].logits, atol=1e-4, rtol=1e-4)
    # The cached prefix is left untouched (a copy is extended per call).
    again = model.generate(prompts[:1], feats, max_new_tokens=12, prefix_cache=prefix)
    assert again.sequences[0].tolist() == batch.sequences[0].tolist()


def test_predict_batch_computes_the_image_prefix_once_and_never_re_feeds_it(model: LisaModel) -> None:
    pred = _predictor(model, draft_answers=False)  # token by token: every later LM call is one token
    with _spy(model) as calls:
        batch = pred.predict_batch(QUESTIONS)
        first_lengths = list(calls.lengths)
        pred.predict_batch(QUESTIONS[:2])
    lengths = calls.lengths
    assert calls.prefixes == 2  # the text before the image, then the image tokens on a copy of it
    assert pred._prefix is not None
    plen = pred._prefix[2]
    head = int((prompt_ids(model, QUESTIONS[0]) == model.image_token_id).nonzero()[0])
    # The prefix once (in two parts), then the batch's prefill covers the prompts' rests only.
    assert first_lengths[:2] == [head, plen - head]
    assert first_lengths[2] == max(len(prompt_ids(model, q)) for q in QUESTIONS) - plen
    assert max(first_lengths[3:]) == 1
    # The second batch reuses the prefix: its first LM call is already the prompts' rests.
    assert lengths[len(first_lengths)] == max(len(prompt_ids(model, q)) for q in QUESTIONS[:2]) - plen
    singles = [_predictor(model, cache_prefix=False).predict(q) for q in QUESTIONS]
    for b, s in zip(batch, singles, strict=True):
        assert b.text == s.text and np.array_equal(b.masks, s.masks)


def test_decode_runs_no_lm_step_for_the_token_after_the_last(model: LisaModel) -> None:
    pred = _predictor(model)
    steps: list[int] = []
    real_run = model.mllm.run_decoder

    def spy_run(embeds, *a, **k):  # type: ignore[no-untyped-def]
        steps.append(int(embeds.shape[1]))
        return real_run(embeds, *a, **k)

    stops = model.stop_token_ids
    model.stop_token_ids = []  # no early stop: exactly max_new_tokens tokens
    model.mllm.run_decoder = spy_run  # type: ignore[method-assign]
    try:
        out = model.generate([prompt_ids(model, "What?")], pred._features, max_new_tokens=5)
    finally:
        del model.mllm.run_decoder
        model.stop_token_ids = stops
    assert len(out.sequences[0]) == 5
    assert len(steps) == 5 and steps[1:] == [1, 1, 1, 1]  # one prefill + 4 steps, not 5


def test_a_prefix_cache_that_the_prompts_do_not_share_is_an_error(model: LisaModel) -> None:
    pred = _predictor(model)
    a, b = prompt_ids(model, "What?"), prompt_ids(model, "Why?")
    prefix = pred._prefix_for(a)
    assert prefix is not None
    b = b.clone()
    b[0] = (int(b[0]) + 1) % 100
    with pytest.raises(ValueError, match="do not all start with the same"):
        model.generate([a, b], pred._features.select([0, 0]), prefix_cache=prefix)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="use_cache"):
        model.generate([a], pred._features, prefix_cache=prefix, use_cache=False)


def test_num_threads_is_a_setting(model: LisaModel) -> None:
    before = torch.get_num_threads()
    try:
        ReasonSegPredictor(model, num_threads=1)
        assert torch.get_num_threads() == 1
        ReasonSegPredictor(model)  # None keeps torch's setting
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        ReasonSegPredictor(model, num_threads=0)


def test_predict_runs_in_inference_mode_and_set_image_keeps_trainable_features(model: LisaModel) -> None:
    pred = _predictor(model)
    assert pred._features is not None and not pred._features.sam_embeddings.is_inference()
    pred.predict("What?")
    assert pred._prefix is not None and pred._prefix[0].is_inference()


def test_a_first_predict_runs_the_image_and_the_question_in_one_pass(model: LisaModel) -> None:
    """A first query prefills the image tokens with the question (one LM pass after the text before
    the image), keeps the image prefix cut from that pass, and every answer stays that of a predictor
    without any cache."""
    pred = _predictor(model)
    with _spy(model) as calls:
        first = pred.predict(QUESTIONS[0])
        first_lengths = list(calls.lengths)
        second = pred.predict(QUESTIONS[2])
    lengths = calls.lengths
    ids = prompt_ids(model, QUESTIONS[0])
    head = int((ids == model.image_token_id).nonzero()[0])
    assert calls.prefixes == 1  # only the text before the image, on its own
    assert first_lengths[0] == head and first_lengths[1] >= len(ids) - head  # image + question in one
    assert pred._prefix is not None
    plen = pred._prefix[2]
    assert int(pred._prefix[1].get_seq_length()) == plen < len(ids)
    # The follow-up starts from the kept image prefix: its first pass is the question's own tokens.
    assert lengths[len(first_lengths)] >= len(prompt_ids(model, QUESTIONS[2])) - plen
    assert lengths[len(first_lengths)] < len(prompt_ids(model, QUESTIONS[2])) - head
    for got, q in ((first, QUESTIONS[0]), (second, QUESTIONS[2])):
        ref = _predictor(model, cache_prefix=False).predict(q)
        assert got.text == ref.text and np.array_equal(got.masks, ref.masks), q


def test_predict_many_answers_questions_on_several_images_in_one_batch(model: LisaModel) -> None:
    """Prompts on different images, each from its own cached image prefix (stacked into one batch),
    give every predictor's own one-turn answer and masks."""
    other = (np.random.default_rng(2).random((90, 60, 3)) * 255).astype(np.uint8)
    a = _predictor(model)
    b = ReasonSegPredictor(model, max_new_tokens=12)
    b.set_image(other)
    a.predict(QUESTIONS[1])  # a's image prefix is cached from its first query; b's is computed below
    with _spy(model) as spied:
        got = ReasonSegPredictor.predict_many([a, b, a], [QUESTIONS[0], QUESTIONS[2], QUESTIONS[2]])
    calls = spied.runs
    # b's image prefix on its own (batch 1), then the three prompts as one batch that starts after
    # the image prefixes: no batched call runs the image tokens again.
    plen = a._prefix[2]  # type: ignore[index]
    batched = [n for rows, n in calls if rows == 3]
    longest_rest = max(len(prompt_ids(model, q)) for q in QUESTIONS) - plen
    assert batched and max(batched) <= longest_rest + 16  # the rests and at most a 16-token draft
    assert all(rows == 1 for rows, _ in calls[: len(calls) - len(batched)])
    assert b._prefix is not None and b._prefix[2] == plen
    asked = [QUESTIONS[0], QUESTIONS[2], QUESTIONS[2]]
    for image, q, g in zip((_image(), other, _image()), asked, got, strict=True):
        ref = ReasonSegPredictor(model, max_new_tokens=12, cache_prefix=False)
        ref.set_image(image)
        r = ref.predict(q)
        assert g.text == r.text and np.array_equal(g.masks, r.masks), q
        assert g.masks.shape[1:] == image.shape[:2]
    with pytest.raises(ValueError, match="2 predictors for 1 instructions"):
        ReasonSegPredictor.predict_many([a, b], ["?"])


def test_stack_caches_and_per_prompt_prefixes_are_checked(model: LisaModel) -> None:
    from transformers import DynamicCache

    from reasonseg.model.lisa import stack_caches

    one, two = DynamicCache(), DynamicCache()
    one.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    two.update(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 4, 4), 0)
    with pytest.raises(ValueError, match="differ in layer count or length"):
        stack_caches([one, two])
    with pytest.raises(TypeError, match="only DynamicCache"):
        stack_caches([one, {"k": 1}])
    stacked = stack_caches([one, one])
    assert stacked.layers[0].keys.shape == (2, 2, 3, 4) and one.layers[0].keys.shape[0] == 1
    with pytest.raises(ValueError, match="must have batch 1, got 2"):
        stack_caches([stacked, stacked])
    pred = _predictor(model)
    ids = prompt_ids(model, "What?")
    cache, plen = pred._prefix_for(ids)  # type: ignore[misc]
    three = stack_caches([cache, cache, cache])
    with pytest.raises(ValueError, match="3 rows for 2 prompts"):
        model.generate([ids, ids], pred._features.select([0, 0]), prefix_cache=(three, plen))  # type: ignore[union-attr]
