"""lisa-mobile per stage on this CPU: where a first query and a cached follow-up spend their time.

    .venv/bin/python bench/bench_lisa_stages.py [--model builtin|preset|DIR] [--threads 1] [--repeats 5]
        [--answer-tokens 8] [--dtype auto|fp32|bf16] [--int8] [--no-append]

Every stage is called on its own, all stages in turn inside one loop (``time_interleaved``), so that
the load of other jobs on the shared cores hits them alike; the figures are medians.

Model: the built-in trained model (``models/lisa-mobile-synth``, real SmolLM2-135M-Instruct + MobileSAM
base weights; it answers ``Sure, it is [SEG].``) by default, ``--model preset`` for the untrained preset;
skimage's coffee photo. Stages:

* ``preprocess``: decode + resize + normalise + pad the photo (``load_image`` + ``SamTransform``).
* ``image encoder alone``: MobileSAM's TinyViT on [1,3,1024,1024] (the reference of the first query).
* ``encode``: ``model.encode_images``: the encoder plus the pooled, projected LM image tokens.
* ``LM prefill, image prefix``: system prompt + 64 image tokens into the KV cache (once per image).
* ``LM prefill, query``: the question's own tokens on a copy of the cached prefix (every query).
* ``decode, per token``: one cached LM step + LM head + argmax.
* ``LM prefill, query + N-token draft``: the question and a guessed N-token answer in one pass, and
  the LM head on the guess: what a follow-up costs in the LM when the guess holds (speculative
  decoding from answer drafts, ``LisaModel.generate(drafts=...)``, the predictor's default).
* ``LM prefill, image + query + N-token draft``: a first query's single LM pass: the image tokens,
  the question and the guess after the cached text before the image (the predictor keeps the image
  prefix's keys/values from this pass for the follow-ups).
* ``mask decode``: LISA head + SAM prompt/mask decoder for one ``[SEG]``.
* ``postprocess``: low-res logits -> original-size logits, masks, scores (``ReasonSegPredictor``).
* ``--int8``: the decode step and the follow-up again with ``quantization="cpu-int8"`` (torch dynamic
  int8 LM: an opt-in option that changes the outputs slightly).
* ``4 questions``: four one-turn questions on the cached image, one ``predict`` each vs one
  ``predict_batch`` (answers capped at N tokens).

The "x encoder" column is, per stage, the median over rounds of the stage's time divided by the
encoder's in the same round (rounds are interleaved, so both saw the same machine load).

Composed rows: a first query = preprocess + encode + both prefills + N decode steps + mask decode +
postprocess; a follow-up on the cached image = query prefill + N decode steps + mask decode +
postprocess, for an N-token answer (``--answer-tokens``, 8 by default: ``Sure, it is [SEG].`` plus the
end token is 8 SmolLM2 tokens), decoded token by token; the drafted follow-up replaces the query
prefill and the N decode steps by the drafted pass, and the drafted first query both prefills by the
single first-query pass. End-to-end rows time ``set_image`` + ``predict``
and ``predict`` alone with the model's own greedy answer capped at N tokens, stop tokens kept, with
the predictor's answer drafts (default) and token by token (``draft_answers=False``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_benchmarks, format_table, median, time_interleaved

QUESTION = "Can you segment the cup in this image?"


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default="builtin",
        help="'builtin' (models/lisa-mobile-synth, the preset when absent), 'preset', or a model directory",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the note)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument(
        "--int8", action="store_true", help="also time the LM with quantization='cpu-int8' (opt-in option)"
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="the model's precision (default auto, as the CLI: bf16 on a CPU with AMX/AVX-512 BF16); "
        "when not fp32, fp32 reference rows are timed in the same loop",
    )
    ap.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = _load_average()

    import skimage.data

    from reasonseg.data.conversation import Turn
    from reasonseg.data.transforms import load_image
    from reasonseg.inference.predictor import ReasonSegPredictor
    from reasonseg.model import LisaModel
    from reasonseg.model.lisa import fork_cache
    from reasonseg.model.precision import dtype_name, resolve_dtype
    from reasonseg.serving.loading import BUILTIN_MODEL_DIR

    source = args.model
    if source == "builtin":
        source = str(BUILTIN_MODEL_DIR) if (BUILTIN_MODEL_DIR / "config.json").is_file() else "preset"
    model = LisaModel.from_preset("lisa-mobile") if source == "preset" else LisaModel.from_pretrained(source)
    model.eval()
    run_dtype = resolve_dtype(args.dtype)
    fp32_model = copy.deepcopy(model) if run_dtype != torch.float32 else None
    model.apply_memory_options(dtype=run_dtype)
    dtype = dtype_name(model.dtype)
    image = skimage.data.coffee()
    pred = ReasonSegPredictor(model, max_new_tokens=args.answer_tokens)
    plain = ReasonSegPredictor(model, max_new_tokens=args.answer_tokens, draft_answers=False)
    plain.set_image(image)
    prepared = pred.transform.prepare(load_image(image))
    pixels = prepared.pixels[None].to(model.dtype)
    feats = model.encode_images(pixels, [prepared.resized_hw], [prepared.original_hw])
    _, ids = pred._prompt(QUESTION, None)  # the prompt exactly as predict() builds it
    pred.set_image(image)
    prefix_cache, plen = pred._prefix_for(ids)  # type: ignore[misc]
    prefix_ids = ids[:plen]
    tail = ids[plen:]
    mask_full = torch.ones(1, len(ids), dtype=torch.long)
    tail_pos = torch.arange(plen, len(ids))[None]
    tail_embeds = model.mllm.embed(tail[None], None)
    step_cache = copy.deepcopy(prefix_cache)
    model.mllm.run_decoder(tail_embeds, mask_full, tail_pos, step_cache, True)
    step_len = len(ids)
    tok = torch.tensor([[model.seg_token_id]])
    hidden = torch.randn(1, model.mllm.hidden_size, dtype=model.dtype)
    low_res = model.decode_masks(
        hidden, feats.sam_embeddings, feats.resized_hw[0], feats.original_hw[0], ["seg"]
    )

    def preprocess() -> None:
        pred.transform.prepare(load_image(image))

    def encoder_alone() -> None:
        model.sam.image_encoder(pixels)

    def encode() -> None:
        model.encode_images(pixels, [prepared.resized_hw], [prepared.original_hw])

    def prefill_prefix() -> None:
        model.prefix_cache(prefix_ids, feats)

    def prefill_query() -> None:
        cache = fork_cache(prefix_cache)
        model.mllm.run_decoder(model.mllm.embed(tail[None], None), mask_full, tail_pos, cache, True)

    guess = pred.model.answer_drafts()[2][: args.answer_tokens]  # "Sure, it is [SEG]." + end token
    guess_ids = torch.cat([tail, torch.tensor(guess)])[None]
    guess_mask = torch.ones(1, plen + guess_ids.shape[1], dtype=torch.long)
    guess_pos = torch.arange(plen, plen + guess_ids.shape[1])[None]

    def prefill_query_drafted() -> None:
        cache = fork_cache(prefix_cache)
        h = model.mllm.run_decoder(model.mllm.embed(guess_ids, None), guess_mask, guess_pos, cache, True)
        model.mllm.lm_logits(h[:, -len(guess) - 1 :]).argmax(-1)

    assert pred._text_head is not None
    head_cache, hlen = pred._text_head[1], pred._text_head[2]
    first_ids = torch.cat([ids[hlen:], torch.tensor(guess)])[None]
    first_mask = torch.ones(1, hlen + first_ids.shape[1], dtype=torch.long)
    first_pos = torch.arange(hlen, hlen + first_ids.shape[1])[None]

    def prefill_first_drafted() -> None:
        # A first query's single pass: image tokens, question and guess after the cached system prompt.
        cache = fork_cache(head_cache)
        embeds = model.mllm.embed(first_ids, feats.vision_tokens)
        h = model.mllm.run_decoder(embeds, first_mask, first_pos, cache, True)
        model.mllm.lm_logits(h[:, -len(guess) - 1 :]).argmax(-1)

    def decode_step() -> None:
        # One step on a cache holding the prompt; cropped back so its length stays fixed.
        mask = torch.ones(1, step_len + 1, dtype=torch.long)
        h = model.mllm.run_decoder(
            model.mllm.lm.get_input_embeddings()(tok), mask, torch.tensor([[step_len]]), step_cache, True
        )
        model.mllm.lm_logits(h[:, -1]).argmax(-1)
        step_cache.crop(-1)  # drop the step just added

    def mask_decode() -> None:
        prompt = model.text_hidden_fcs(hidden)
        pe = model.sam.prompt_encoder
        h, w = feats.sam_embeddings.shape[-2:]
        model.sam.mask_decoder(
            image_embeddings=feats.sam_embeddings,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=prompt[:, None],
            dense_prompt_embeddings=pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w),
            multimask_output=False,
        )

    def postprocess() -> None:
        from reasonseg.data.transforms import postprocess_masks

        full = postprocess_masks(
            low_res.low_res_logits[:, None], feats.resized_hw[0], feats.original_hw[0], model.sam.image_size
        )
        masks = copy.copy(low_res)
        masks.logits = full[:, 0]
        pred._prediction("Sure, it is [SEG].", masks, [Turn("user", QUESTION)], False)

    answers: list[str] = []

    def first_query() -> None:
        pred.set_image(image)
        answers.append(pred.predict(QUESTION).text)

    def follow_up() -> None:
        answers.append(pred.predict(QUESTION).text)

    def follow_up_plain() -> None:
        plain.predict(QUESTION)

    batch_qs = [QUESTION, "Where is the spoon?", "Segment the saucer, please.", "What could I drink from?"]

    def singles() -> None:
        for q in batch_qs:
            pred.predict(q)

    def batched() -> None:
        pred.predict_batch(batch_qs)

    stages = {
        "preprocess": preprocess,
        "image encoder alone": encoder_alone,
        "encode": encode,
        "LM prefill, image prefix": prefill_prefix,
        "LM prefill, query": prefill_query,
        "decode, per token": decode_step,
        f"LM prefill, query + {len(guess)}-token draft": prefill_query_drafted,
        f"LM prefill, image + query + {len(guess)}-token draft": prefill_first_drafted,
        "mask decode": mask_decode,
        "postprocess": postprocess,
        "end-to-end first query": first_query,
        "end-to-end follow-up": follow_up,
        "end-to-end follow-up, token by token": follow_up_plain,
        "4 questions, one predict each": singles,
        "4 questions, one predict_batch": batched,
    }
    if fp32_model is not None:
        ref_pred = ReasonSegPredictor(fp32_model, max_new_tokens=args.answer_tokens)
        ref_pred.set_image(image)

        def encoder_alone_fp32() -> None:
            fp32_model.sam.image_encoder(pixels.float())

        def first_query_fp32() -> None:
            ref_pred.set_image(image)
            ref_pred.predict(QUESTION)

        def follow_up_fp32() -> None:
            ref_pred.predict(QUESTION)

        stages["image encoder alone, fp32"] = encoder_alone_fp32
        stages["end-to-end first query, fp32"] = first_query_fp32
        stages["end-to-end follow-up, fp32"] = follow_up_fp32
    if args.int8:
        # The same model, its LM quantised (for the preset: base weights, new token rows, and the
        # random head and projector copied over).
        if source == "preset":
            qmodel = LisaModel.from_preset("lisa-mobile", quantization="cpu-int8")
            qmodel.text_hidden_fcs.load_state_dict(model.text_hidden_fcs.state_dict())
            qmodel.mllm.projector.load_state_dict(model.mllm.projector.state_dict())
        else:
            qmodel = LisaModel.from_pretrained(source, quantization="cpu-int8")
        qpred = ReasonSegPredictor(qmodel, max_new_tokens=args.answer_tokens)
        qpred.set_image(image)
        q_cache, _ = qmodel.prefix_cache(ids, qpred._features)  # the whole prompt, like step_cache

        def decode_step_int8() -> None:
            mask = torch.ones(1, step_len + 1, dtype=torch.long)
            h = qmodel.mllm.run_decoder(
                qmodel.mllm.lm.get_input_embeddings()(tok), mask, torch.tensor([[step_len]]), q_cache, True
            )
            qmodel.mllm.lm_logits(h[:, -1]).argmax(-1)
            q_cache.crop(-1)

        def follow_up_int8() -> None:
            qpred.predict(QUESTION)

        stages["decode, per token, LM cpu-int8"] = decode_step_int8
        stages["end-to-end follow-up, LM cpu-int8"] = follow_up_int8
    with torch.inference_mode():
        times = time_interleaved(stages, repeats=args.repeats, warmup=1)
    med = {k: median(v) * 1000 for k, v in times.items()}
    n = args.answer_tokens
    follow = med["LM prefill, query"] + n * med["decode, per token"] + med["mask decode"] + med["postprocess"]
    first = med["preprocess"] + med["encode"] + med["LM prefill, image prefix"] + follow
    drafted = med[f"LM prefill, query + {len(guess)}-token draft"] + med["mask decode"] + med["postprocess"]
    first_drafted = (
        med["preprocess"]
        + med["encode"]
        + med[f"LM prefill, image + query + {len(guess)}-token draft"]
        + med["mask decode"]
        + med["postprocess"]
    )
    enc = med["image encoder alone"]
    answer_len = len(model.tokenizer(answers[-1]).input_ids) if answers else 0

    # Per stage, the median over rounds of (its time / the encoder's in the same round): on a shared
    # machine whose speed drifts, a ratio of medians taken from different rounds can be far off.
    rounds = {
        k: [t / e for t, e in zip(v, times["image encoder alone"], strict=True)] for k, v in times.items()
    }
    ratio = {k: median(v) for k, v in rounds.items()}
    firsts = sorted(rounds["end-to-end first query"])
    rows = [[name, f"{ms:.1f}", f"{ratio[name]:.3f}"] for name, ms in med.items()]
    rows.append([f"composed first query ({n}-token answer)", f"{first:.1f}", f"{first / enc:.3f}"])
    rows.append([f"composed follow-up ({n}-token answer)", f"{follow:.1f}", f"{follow / enc:.3f}"])
    rows.append(["composed first query, drafted", f"{first_drafted:.1f}", f"{first_drafted / enc:.3f}"])
    rows.append(["composed follow-up, drafted", f"{drafted:.1f}", f"{drafted / enc:.3f}"])
    table = format_table(["stage", "median ms", "x encoder (per round)"], rows)
    load_after = _load_average()
    notes = [
        f"{dtype} model (--dtype {args.dtype}); {args.threads} torch thread(s); median of {args.repeats} interleaved rounds after 1 warm-up; "
        f"load average (1/5/15 min) before {load_before}, after {load_after}",
        f"model {source}; prompt {len(ids)} tokens ({plen} cached with the image, {len(tail)} per query); "
        f"end-to-end answer ({answer_len} tokens, cap {n}): {answers[-1]!r}",
        f"goals: follow-up <= 150 ms -> end-to-end {med['end-to-end follow-up']:.0f} ms (token by token "
        f"{med['end-to-end follow-up, token by token']:.0f} ms; composed {follow:.0f}, drafted {drafted:.0f}); "
        f"first query <= 1.3x encoder -> end-to-end {ratio['end-to-end first query']:.2f}x, median of the "
        f"rounds' ratios (each round: {', '.join(f'{r:.2f}' for r in firsts)}; composed from medians "
        f"{first / enc:.2f}x, drafted {first_drafted / enc:.2f}x)",
        f"predict_batch of 4 vs 4 predicts (cached image prefix shared by the batch): x"
        f"{med['4 questions, one predict each'] / med['4 questions, one predict_batch']:.2f}",
        "training samples/s: `python bench/bench_train.py` (prints only, not appended here)",
    ]
    if fp32_model is not None:
        notes.append(
            f"{dtype} vs fp32 in this run: encoder x{med['image encoder alone, fp32'] / enc:.2f}, first query "
            f"x{med['end-to-end first query, fp32'] / med['end-to-end first query']:.2f}, follow-up "
            f"x{med['end-to-end follow-up, fp32'] / med['end-to-end follow-up']:.2f} faster"
        )
    print(table)
    print("\n".join(notes))
    if not args.no_append:
        append_benchmarks("lisa-mobile per stage (CPU)", table, notes)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
