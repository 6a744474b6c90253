"""The LISA/GSVA model at tiny sizes: configs, the one-before rule, forward, KV-cached generate, save/load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lisa_tiny_helpers import (
    SCRIPTED_ANSWER,
    prompt_ids,
    random_pixels,
    single_thread,
    tiny_model,
    train_to_answer,
)
from reasonseg.data.conversation import Turn, encode_conversation
from reasonseg.model import LisaConfig, LisaModel
from reasonseg.model.config import PRESETS, ProjectorConfig
from reasonseg.model.delta import DeltaError, apply_delta, compute_delta
from reasonseg.model.lisa import fork_cache, static_decoders
from reasonseg.model.mllm import positions_from_mask


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def trained() -> tuple[LisaModel, object]:
    """A tiny GSVA model overfitted to answer 'Sure, a:[SEG], b:[REJ], c:[SEG].' on two images."""
    with single_thread():
        model = tiny_model("gsva-7b")
        feats = model.encode_images(random_pixels(model, n=2, seed=1), original_hw=[(40, 56), (37, 29)])
        train_to_answer(model, feats.select([0]))
        return model, feats


# ------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_tiny_and_round_trips_its_config(name: str, tmp_path: Path) -> None:
    model = LisaModel.from_preset(name, tiny=True)
    cfg = model.config
    assert cfg.tiny and cfg.name == name
    assert cfg.lm.hf_config["vocab_size"] == model.mllm.lm.get_input_embeddings().num_embeddings
    cfg.save(tmp_path / "c.json")
    assert LisaConfig.load(tmp_path / "c.json") == cfg
    big = LisaConfig.from_preset(name)
    assert big.projector.out_dim == big.lm.hidden_size
    assert big.num_image_tokens == (256 if big.vision.kind == "clip" else 64)


def test_official_layouts_match_the_papers() -> None:
    c7 = LisaConfig.from_preset("lisa-7b-v1")
    assert (c7.lm.hidden_size, c7.vision.clip["hidden_size"], c7.vision.select_layer) == (4096, 1024, -2)
    assert (c7.projector.kind, c7.sam.name, c7.head.out_dim, c7.use_rej) == ("linear", "vit_h", 256, False)
    assert LisaConfig.from_preset("lisa-13b-llama2-v1").lm.hidden_size == 5120
    assert LisaConfig.from_preset("gsva-7b").use_rej
    mobile = LisaConfig.from_preset("lisa-mobile")
    assert (mobile.vision.kind, mobile.sam.name, mobile.lm.pretrained, mobile.template) == (
        "sam",
        "vit_t",
        "smollm2",
        "chatml",
    )


def test_config_validation_names_the_field() -> None:
    cfg = LisaConfig.from_preset("lisa-mobile", tiny=True).to_dict()
    cfg["projector"] = {"kind": "mlp2x_gelu", "in_dim": 7, "out_dim": 64}
    with pytest.raises(ValueError, match=r"projector\.in_dim"):
        LisaConfig.from_dict(cfg)
    with pytest.raises(ValueError, match=r"projector\.kind"):
        ProjectorConfig("conv", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown fields"):
        LisaConfig.from_dict({"nope": 1})
    with pytest.raises(KeyError, match="unknown preset"):
        LisaConfig.from_preset("lisa-70b")


# ------------------------------------------------------------------------------------ forward / rules


def test_placeholder_count_mismatch_is_a_clear_error() -> None:
    model = tiny_model("lisa-mobile")
    ids = prompt_ids(model, "hi")[None]
    feats = model.encode_images(random_pixels(model))
    with pytest.raises(ValueError, match="placeholder count mismatch"):
        model(
            input_ids=ids[:, 3:-3].clone().index_fill_(1, torch.tensor([0]), model.image_token_id),
            images=feats,
        )
    short = ids[ids != model.image_token_id][None]
    with pytest.raises(ValueError, match="no image features"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="placeholder count mismatch"):
        model(input_ids=short, images=feats)


def _scripted_conversation(model: LisaModel):  # type: ignore[no-untyped-def]
    """The trained answer as a teacher-forced conversation (three slots: seg, rej, seg)."""
    return encode_conversation(
        model.tokenizer,
        model.config.template,
        [Turn("user", "Find them."), Turn("assistant", SCRIPTED_ANSWER)],
        model.num_image_tokens,
    )


def test_mask_embedding_is_taken_one_position_before_each_slot(trained) -> None:
    model, feats = trained
    enc = _scripted_conversation(model)
    out = model(input_ids=enc.input_ids[None], images=feats.select([0]))
    pos = out.slot_positions[0]
    assert [model.tokenizer.convert_ids_to_tokens(int(enc.input_ids[p])) for p in pos] == [
        "[SEG]",
        "[REJ]",
        "[SEG]",
    ]
    assert out.kinds[0] == ["seg", "rej", "seg"]
    expected = model.text_hidden_fcs(out.hidden_states[0, pos - 1])
    torch.testing.assert_close(out.seg_embeddings[0], expected)
    # The hidden state AT the slot would be a different vector: the rule matters.
    assert not torch.allclose(model.text_hidden_fcs(out.hidden_states[0, pos]), expected)
    assert out.masks is not None and out.masks[0].logits.shape == (3, 40, 56)
    # The overfitted model predicts [REJ] exactly at the middle slot (GSVA's teacher-forced decision).
    assert out.predicted_rej[0].tolist() == [False, True, False]
    # The mask of a slot is SAM's decoding of that embedding with the no-mask dense prompt.
    direct = model.decode_masks(
        out.hidden_states[0, pos - 1], feats.sam_embeddings[:1], feats.resized_hw[0], (40, 56), out.kinds[0]
    )
    torch.testing.assert_close(direct.logits, out.masks[0].logits)


def test_batched_mask_decoding_equals_one_call_per_sample(trained) -> None:
    """decode_masks_batch (one mask-decoder call for every slot of every image) gives each sample what
    decode_masks gives it alone, also with a sample without slots and images of different sizes."""
    model, feats = trained
    was_training = model.training
    model.eval()  # no dropout in the head: both paths must see the same prompts
    torch.manual_seed(0)
    hidden = [torch.randn(3, model.mllm.hidden_size), torch.randn(0, model.mllm.hidden_size)]
    hidden.append(torch.randn(1, model.mllm.hidden_size))
    images = feats.select([0, 1, 0])
    kinds = [["seg", "rej", "seg"], [], ["seg"]]
    batched = model.decode_masks_batch(hidden, images, kinds)
    for i, got in enumerate(batched):
        alone = model.decode_masks(
            hidden[i], images.sam_embeddings[i : i + 1], images.resized_hw[i], images.original_hw[i], kinds[i]
        )
        assert got.kinds == alone.kinds and got.logits.shape == alone.logits.shape
        for a, b in ((got.logits, alone.logits), (got.low_res_logits, alone.low_res_logits)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.iou_pred, alone.iou_pred, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.embeddings, alone.embeddings)
    assert batched[1].logits.shape == (0, 37, 29)
    model.train(was_training)


def test_logits_at_selected_positions_match_the_full_head(trained) -> None:
    model, feats = trained
    enc = _scripted_conversation(model)
    ids = enc.input_ids[None]
    full = model(input_ids=ids, images=feats.select([0]))
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[0, -9:-2] = True
    part = model(input_ids=ids, images=feats.select([0]), logits_at=at)
    assert part.logits.shape == (7, full.logits.shape[-1]) and part.logits_at is at
    torch.testing.assert_close(part.logits, full.logits[at], atol=1e-5, rtol=1e-5)
    # No head at all: the slots' [REJ] decisions and masks are unchanged.
    none = model(input_ids=ids, images=feats.select([0]), logits_at=torch.zeros_like(at))
    assert none.logits.shape == (0, full.logits.shape[-1])
    assert none.predicted_rej[0].tolist() == full.predicted_rej[0].tolist() == [False, True, False]
    assert none.masks is not None and full.masks is not None
    torch.testing.assert_close(none.masks[0].logits, full.masks[0].logits)


def test_left_and_right_padding_give_the_same_forward(trained) -> None:
    model, feats = trained
    a = prompt_ids(model, "Segment the cat.")
    b = prompt_ids(model, "x")
    t = len(a)
    right = torch.full((2, t), model.pad_token_id)
    left = torch.full((2, t), model.pad_token_id)
    right[0], left[0] = a, a
    right[1, : len(b)], left[1, t - len(b) :] = b, b
    mr = (torch.arange(t) < len(b)).long()
    ml = torch.flip(mr, [0])
    mask_r = torch.stack([torch.ones(t, dtype=torch.long), mr])
    mask_l = torch.stack([torch.ones(t, dtype=torch.long), ml])
    assert positions_from_mask(mask_l)[1, -1] == len(b) - 1
    out_r = model(input_ids=right, attention_mask=mask_r, images=feats, decode_masks=False)
    out_l = model(input_ids=left, attention_mask=mask_l, images=feats, decode_masks=False)
    torch.testing.assert_close(out_r.logits[1, : len(b)], out_l.logits[1, t - len(b) :], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ generate


def _assert_same_generation(x, y, atol: float = 1e-4) -> None:
    assert [s.tolist() for s in x.sequences] == [s.tolist() for s in y.sequences]
    assert x.texts == y.texts and x.kinds == y.kinds
    for mx, my in zip(x.masks, y.masks, strict=True):
        torch.testing.assert_close(mx.logits, my.logits, atol=atol, rtol=1e-4)
        assert torch.equal(mx.logits > 0, my.logits > 0) or (mx.logits - my.logits).abs().max() < atol


@pytest.mark.parametrize("sample", [False, True])
def test_kv_cached_generate_equals_the_uncached_reference_loop(trained, sample: bool) -> None:
    model, feats = trained
    kw = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 3} if sample else {}
    prompts = [prompt_ids(model, "Segment the cat."), prompt_ids(model, "Where is the dog, if any?")]
    cached = model.generate(prompts, feats, max_new_tokens=24, **kw)
    uncached = model.generate(prompts, feats, max_new_tokens=24, use_cache=False, **kw)
    _assert_same_generation(cached, uncached)
    assert cached.kinds[0] == ["seg", "rej", "seg"]  # the trained answer, with its three slots
    assert cached.masks[0].logits.shape == (3, 40, 56) and cached.masks[1].logits.shape[1:] == (37, 29)


@pytest.mark.parametrize("sample", [False, True])
def test_static_cache_generate_equals_the_dynamic_cache(trained, sample: bool) -> None:
    """The preallocated cache (the CUDA-graph path, run eagerly on a CPU) decodes the same answers as
    the ordinary DynamicCache, left padding included, and reuses one decoder per (batch, length)."""
    model, feats = trained
    kw = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 3} if sample else {}
    prompts = [prompt_ids(model, "Segment the cat."), prompt_ids(model, "Where is the dog, if any?")]
    assert len(prompts[0]) != len(prompts[1])  # row 0 is left-padded
    static_decoders(model).clear()
    dynamic = model.generate(prompts, feats, max_new_tokens=24, static_cache=False, **kw)
    static = model.generate(prompts, feats, max_new_tokens=24, static_cache=True, **kw)
    _assert_same_generation(static, dynamic)
    assert static.kinds[0] == ["seg", "rej", "seg"]
    again = model.generate(prompts[::-1], feats.select([1, 0]), max_new_tokens=24, static_cache=True, **kw)
    assert [s.tolist() for s in again.sequences] == [s.tolist() for s in static.sequences[::-1]]
    assert len(static_decoders(model)) == 1  # same batch and length bucket: one decoder
    import copy

    assert static_decoders(copy.deepcopy(model)) == {}  # a copy neither carries nor trips over them


def test_static_cache_with_drafts_checks_the_lead_guess_in_the_prefill(trained) -> None:
    """The guess appended to the prompt is verified in the static prefill; a wrong guess is rolled
    back (its cache positions forgotten) and decoding goes on one token at a time."""
    model, feats = trained
    prompts = [prompt_ids(model, "Segment the cat."), prompt_ids(model, "Where is the dog, if any?")]
    plain = model.generate(prompts, feats, max_new_tokens=24, static_cache=False)
    right = [plain.sequences[0].tolist()]  # the exact answer of row 0: accepted whole for row 0
    wrong = [[int(plain.sequences[0][0])] + [model.pad_token_id] * 6]  # one right token, then junk
    from reasonseg.model.graph_decode import StaticDecoder

    steps = []
    real_step = StaticDecoder.step

    def counting(self, tokens, positions):
        steps.append(1)
        return real_step(self, tokens, positions)

    n_steps = {}
    for name, drafts in (("right", right), ("wrong", wrong), ("templates", model.answer_drafts())):
        steps.clear()
        StaticDecoder.step = counting
        try:
            static = model.generate(prompts, feats, max_new_tokens=24, static_cache=True, drafts=drafts)
        finally:
            StaticDecoder.step = real_step
        _assert_same_generation(static, plain)
        n_steps[name] = len(steps)
    # Row 1's answer differs from row 0's, so the batch stops accepting where the two part: the right
    # guess still saves the steps of the answers' common start, the wrong one only its first token.
    assert n_steps["right"] < n_steps["wrong"] <= max(len(q) for q in plain.sequences), n_steps


def test_static_cache_returns_the_same_conversation_cache(trained) -> None:
    model, feats = trained
    p = prompt_ids(model, "Segment the cat.")
    dynamic = model.generate([p], feats.select([0]), max_new_tokens=12, static_cache=False)
    static = model.generate([p], feats.select([0]), max_new_tokens=12, static_cache=True)
    (cd, ids_d), (cs, ids_s) = dynamic.cache, static.cache
    assert ids_d.tolist() == ids_s.tolist()
    assert cd.get_seq_length() == cs.get_seq_length() == len(ids_d)
    for ld, ls in zip(cd.layers, cs.layers, strict=True):
        torch.testing.assert_close(ls.keys, ld.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ls.values, ld.values, atol=1e-5, rtol=1e-5)


def test_static_cache_refuses_what_it_cannot_do(trained) -> None:
    model, feats = trained
    p = prompt_ids(model, "Segment the cat.")
    with pytest.raises(ValueError, match="static_cache=True cannot be used with use_cache=False"):
        model.generate([p], feats.select([0]), max_new_tokens=2, use_cache=False, static_cache=True)
    assert model._static_path(None, True) is False  # auto: CUDA only
    config = model.mllm.lm.config
    had, old = hasattr(config, "layer_types"), getattr(config, "layer_types", None)
    config.layer_types = ["sliding_attention"] + ["full_attention"] * (config.num_hidden_layers - 1)
    try:
        with pytest.raises(ValueError, match="cannot be used with an LM with sliding-window layers"):
            model.generate([p], feats.select([0]), max_new_tokens=2, static_cache=True)
    finally:
        if had:
            config.layer_types = old
        else:
            del config.layer_types


def test_static_cache_starts_from_a_prefix_cache(trained) -> None:
    """A prompt prefix's keys/values (one row shared by the batch, or one row per prompt) are copied
    into the static cache; the answers equal the DynamicCache path's, and the prefix is left as it is."""
    from reasonseg.model.lisa import stack_caches

    model, feats = trained
    questions = ["Segment the cat.", "Where is the dog, if any?"]
    prompts = [prompt_ids(model, q) for q in questions]
    plen = int((prompts[0] == model.image_token_id).nonzero().max()) + 1  # up to the image tokens
    one = feats.select([0])
    shared = model.prefix_cache(prompts[0][:plen], one)
    before = shared[0].layers[0].keys.clone()
    for prefix, images in (
        (shared, one.select([0, 0])),
        (
            (
                stack_caches([model.prefix_cache(prompts[0][:plen], feats.select([i]))[0] for i in (0, 1)]),
                plen,
            ),
            feats,
        ),
    ):
        kw = dict(max_new_tokens=16, prefix_cache=prefix, drafts=model.answer_drafts())
        dynamic = model.generate(prompts, images, static_cache=False, **kw)
        static = model.generate(prompts, images, static_cache=True, **kw)
        _assert_same_generation(static, dynamic)
    assert torch.equal(shared[0].layers[0].keys, before)


def test_batch_of_four_different_lengths_equals_one_at_a_time(trained) -> None:
    model, feats = trained
    questions = [
        "Segment the cat.",
        "?",
        "Where is the dog in this picture, if there is one at all?",
        "What is here?",
    ]
    prompts = [prompt_ids(model, q) for q in questions]
    assert len({len(p) for p in prompts}) == 4
    images = feats.select([0, 1, 1, 0])
    batch = model.generate(prompts, images, max_new_tokens=20)
    for i, p in enumerate(prompts):
        single = model.generate([p], images.select([i]), max_new_tokens=20)
        assert single.sequences[0].tolist() == batch.sequences[i].tolist(), questions[i]
        assert single.kinds[0] == batch.kinds[i]
        torch.testing.assert_close(single.masks[0].logits, batch.masks[i].logits, atol=1e-4, rtol=1e-4)
    assert any(len(k) > 0 for k in batch.kinds)


def test_sampling_is_reproducible_with_a_seed(trained) -> None:
    model, feats = trained
    p = [prompt_ids(model, "What?")]
    kw = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 12}
    a = model.generate(p, feats.select([0]), seed=7, **kw)
    b = model.generate(p, feats.select([0]), seed=7, **kw)
    assert a.sequences[0].tolist() == b.sequences[0].tolist()


def test_prefix_cache_gives_the_same_answer(trained) -> None:
    model, feats = trained
    ids = prompt_ids(model, "Segment the cat.")
    first_image = int((ids == model.image_token_id).nonzero()[0])
    plen = first_image + model.num_image_tokens + 1
    cache = model.prefix_cache(ids[:plen], feats.select([0]))
    with_prefix = model.generate([ids], feats.select([0]), prefix_cache=cache)
    plain = model.generate([ids], feats.select([0]))
    _assert_same_generation(with_prefix, plain)
    again = model.generate([ids], feats.select([0]), prefix_cache=cache)  # the cache was not consumed
    _assert_same_generation(again, plain)
    # Built in two parts: the text before the image once, then each image's tokens on a copy of it.
    head = model.prefix_cache(ids[:first_image], None)
    two_part = model.prefix_cache(ids[:plen], feats.select([0]), start=head)
    for a, b in zip(two_part[0].layers, cache[0].layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    _assert_same_generation(model.generate([ids], feats.select([0]), prefix_cache=two_part), plain)
    assert head[0].get_seq_length() == first_image  # the start was copied, not extended
    with pytest.raises(ValueError, match="start covers"):
        model.prefix_cache(ids[:first_image], None, start=head)


def _count_lm_passes(model: LisaModel) -> list[int]:
    """Every call of the LM body, as the number of tokens it was fed."""
    calls: list[int] = []
    orig = model.mllm.run_decoder

    def counting(embeds, *args, **kwargs):
        calls.append(int(embeds.shape[1]))
        return orig(embeds, *args, **kwargs)

    model.mllm.run_decoder = counting  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize(
    "draft_texts",
    [
        ["Sure, a:[SEG], b:[REJ], c:[SEG]."],  # the answer itself: one LM pass
        ["Sure, a:[SEG], b:[SEG], c:[SEG]."],  # wrong from the middle
        ["It is [SEG].", "b:[REJ], c:[REJ]. More text that never comes"],  # wrong start, partial matches
        ["Completely unrelated words"],
    ],
)
def test_drafted_greedy_generate_equals_plain_greedy(trained, draft_texts: list[str]) -> None:
    model, feats = trained
    prompts = [prompt_ids(model, "Segment the cat."), prompt_ids(model, "Where is the dog, if any?")]
    drafts = model.answer_drafts(draft_texts)
    plain = model.generate(prompts, feats, max_new_tokens=24)
    try:
        calls = _count_lm_passes(model)
        drafted = model.generate(prompts, feats, max_new_tokens=24, drafts=drafts)
    finally:
        del model.mllm.run_decoder
    _assert_same_generation(drafted, plain)
    plain_passes = max(len(s) for s in plain.sequences)  # the prompt, then one per token but the last
    assert len(calls) <= plain_passes
    if draft_texts[0] == SCRIPTED_ANSWER:
        try:
            calls = _count_lm_passes(model)
            alone = model.generate(prompts[:1], feats.select([0]), drafts=drafts, max_draft=64)
        finally:
            del model.mllm.run_decoder
        assert alone.texts[0] == SCRIPTED_ANSWER
        assert len(calls) == 1  # the prompt and the whole guessed answer, checked in one pass
    for one in range(2):  # each prompt alone, and with a short token budget
        single = model.generate([prompts[one]], feats.select([one]), max_new_tokens=5, drafts=drafts)
        ref = model.generate([prompts[one]], feats.select([one]), max_new_tokens=5)
        _assert_same_generation(single, ref)


def test_fork_cache_leaves_the_prefix_as_it_was() -> None:
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(3):
        cache.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), layer)
    before = [(lay.keys.clone(), lay.values.clone()) for lay in cache.layers]
    fork = fork_cache(cache)
    assert all(f.keys is c.keys for f, c in zip(fork.layers, cache.layers, strict=True))  # shared, not copied
    for layer in range(3):
        fork.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), layer)
    fork.crop(-1)
    fork.batch_repeat_interleave(2)
    assert fork.get_seq_length() == 7 and fork.layers[0].keys.shape[0] == 2
    assert cache.get_seq_length() == 5
    for lay, (k, v) in zip(cache.layers, before, strict=True):
        assert lay.keys.shape[0] == 1 and torch.equal(lay.keys, k) and torch.equal(lay.values, v)
    head = fork_cache(cache, keep=2)  # only the first positions, the original untouched
    assert head.get_seq_length() == 2 and torch.equal(head.layers[0].keys, before[0][0][..., :2, :])
    assert cache.get_seq_length() == 5
    # Other cache types are deep-copied.
    other = {"k": torch.zeros(2)}
    copied = fork_cache(other)
    assert copied is not other and copied["k"] is not other["k"]


def test_drafts_work_with_a_prefix_cache_and_are_ignored_when_sampling(trained) -> None:
    model, feats = trained
    ids = prompt_ids(model, "Segment the cat.")
    first_image = int((ids == model.image_token_id).nonzero()[0])
    plen = first_image + model.num_image_tokens + 1
    cache = model.prefix_cache(ids[:plen], feats.select([0]))
    drafts = model.answer_drafts([SCRIPTED_ANSWER])
    said = model.generate([ids], feats.select([0])).sequences[0].tolist()
    assert drafts[0] == said  # the template's tokens are the ones the model produces
    plain = model.generate([ids, ids], feats.select([0, 0]))
    drafted = model.generate([ids, ids], feats.select([0, 0]), prefix_cache=cache, drafts=drafts)
    _assert_same_generation(drafted, plain)
    kw = {"do_sample": True, "temperature": 1.3, "seed": 5, "max_new_tokens": 10}
    a = model.generate([ids], feats.select([0]), **kw)
    b = model.generate([ids], feats.select([0]), drafts=drafts, **kw)
    assert a.sequences[0].tolist() == b.sequences[0].tolist()


def test_clip_tower_uses_the_selected_layer_without_cls() -> None:
    model = tiny_model("lisa-7b-v1")
    tower = model.mllm.vision_tower
    x = torch.randn(2, 3, tower.image_size, tower.image_size)
    feats = tower(x)
    ref = tower.clip(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(feats, ref)
    assert feats.shape[1] == model.num_image_tokens


# ----------------------------------------------------------------------------------------- save/load


def test_full_save_and_load_round_trip(trained, tmp_path: Path) -> None:
    model, feats = trained
    model.save_pretrained(tmp_path / "m")
    loaded = LisaModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    p = [prompt_ids(model, "Segment the cat.")]
    _assert_same_generation(
        model.generate(p, feats.select([0])), loaded.generate(p, feats.select([0])), atol=1e-6
    )


def test_delta_encoding_stores_rows_and_low_rank_updates_exactly() -> None:
    base = tiny_model("lisa-mobile")
    model = tiny_model("lisa-mobile")
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        emb = model.mllm.lm.get_input_embeddings().weight
        emb[-3:] += 1.0  # new token rows
        q = model.mllm.lm.model.layers[0].self_attn.q_proj.weight
        q += torch.randn(q.shape[0], 4) @ torch.randn(4, q.shape[1]) * 0.01  # a merged rank-4 LoRA
        model.text_hidden_fcs[0].weight.mul_(2)
    delta = compute_delta(model, base, base_prefixes=["mllm.lm.", "sam."])
    kinds = {k.split("/")[0] for k in delta}
    assert any(k.startswith("rows/mllm.lm.model.embed_tokens.weight") for k in delta)
    assert any(k.startswith("lowrank/mllm.lm.model.layers.0.self_attn.q_proj.weight") for k in delta)
    assert not any(k.startswith("full/sam.") for k in delta)  # unchanged base weights are not stored
    assert kinds == {"rows", "lowrank", "full"}
    restored = tiny_model("lisa-mobile")
    restored.load_state_dict(base.state_dict())
    counts = apply_delta(restored, delta)
    assert counts["rows"] >= 1 and counts["lowrank"] == 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
    with pytest.raises(DeltaError, match="not a tensor of the model"):
        apply_delta(restored, {"full/nope.weight": torch.zeros(1)})


@pytest.mark.parametrize("magnitude", [1e-2, 1e-5])
def test_a_merged_lora_is_stored_as_its_rank_even_when_small(magnitude: float) -> None:
    from reasonseg.model.delta import _lowrank

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(96, 160, generator=g) * 0.05
    w = w0 + 2.0 * (torch.randn(96, 8, generator=g) * magnitude) @ torch.randn(
        8, 160, generator=g
    )  # float32 merge
    factors = _lowrank(w - w0, w, max_rank=32)
    assert factors is not None and factors[0].shape == (96, 8)
    assert float((w0 + factors[0] @ factors[1] - w).abs().max()) < 1e-6
    assert _lowrank(torch.randn(96, 160, generator=g), w, max_rank=32) is None  # a dense change stays dense


def test_compile_image_encoder_keeps_names_and_outputs(trained) -> None:
    model, _ = trained
    import copy

    m = copy.deepcopy(model)
    x = torch.randn(1, 3, m.sam.image_size, m.sam.image_size)
    with torch.no_grad():
        before = m.sam.image_encoder(x)
        keys = list(m.state_dict())
        assert m.compile_image_encoder(backend="eager") is m  # "eager": no C++ toolchain needed here
        after = m.sam.image_encoder(x)
    assert list(m.state_dict()) == keys  # checkpoints are unchanged
    torch.testing.assert_close(after, before)


def test_static_decoder_made_in_inference_mode_serves_no_grad_calls(trained) -> None:
    model, feats = trained
    p = prompt_ids(model, "Segment the cat.")
    static_decoders(model).clear()
    with torch.inference_mode():
        first = model.generate([p], feats.select([0]), max_new_tokens=8, static_cache=True)
    again = model.generate([p], feats.select([0]), max_new_tokens=8, static_cache=True)  # no_grad only
    assert first.sequences[0].tolist() == again.sequences[0].tolist()
    cache, _ = again.cache
    assert not cache.layers[0].keys.is_inference()  # the returned cache is an ordinary tensor
