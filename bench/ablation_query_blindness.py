"""Why the built-in model returns one mask per image whatever is asked: two measurements.

    .venv/bin/python bench/ablation_query_blindness.py spread --model models/lisa-mobile-synth
    .venv/bin/python bench/ablation_query_blindness.py overfit --steps 60
    .venv/bin/python bench/ablation_query_blindness.py frozen-head --steps 120

* ``spread``: for 8 different questions (no image: zero image tokens), the LM hidden state at the
  position that predicts ``[SEG]`` and the SAM prompt the LISA head makes of it. Printed: the pairwise
  cosine similarities and the spread (mean distance to the centroid / centroid norm) of both. Nearly
  parallel prompts mean the mask decoder is told nearly the same thing for every question.
* ``overfit``: a capacity check. ``recipes/lisa-mobile-synth-stage1.yaml`` (frozen LM; head and mask
  decoder trained) on 6 training samples, 2 questions about each of 3 images with different targets,
  for ``--steps`` steps; printed: per-sample mask IoU after training. High IoUs that differ per question
  show the head + decoder path can learn question-dependent masks (no wiring bug): the built-in model's
  query blindness is a matter of training data and steps, not of the pipeline.
* ``frozen-head``: stage 1 for ``--steps`` steps with the LISA head frozen at its standardised
  initialisation (``freeze.train_head: false``), saved whole to ``--out`` for
  ``bench/eval_synth_queries.py``: does a decoder that cannot be given one prompt for every question
  learn to read the question?
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

QUESTIONS = (
    "Find all the dishes in this image.",
    "Which object is orange?",
    "Find the thing that is often eaten with maple syrup.",
    "the pancakes in the picture",
    "Find the potato.",
    "Show me what runs on electricity.",
    "the rightmost object",
    "onion",
)


def _spread(x: torch.Tensor) -> float:
    centre = x.mean(0)
    return float((x - centre).norm(dim=-1).mean() / centre.norm())


def spread(model_dir: str, answer: str) -> None:
    from reasonseg.data.conversation import Turn, encode_conversation
    from reasonseg.data.templates import question
    from reasonseg.model import LisaModel
    from reasonseg.model.mllm import positions_from_mask

    m = LisaModel.from_pretrained(model_dir).eval()
    tokens = torch.zeros(1, m.num_image_tokens, m.mllm.hidden_size)
    states = []
    for q in QUESTIONS:
        text = question(q, is_sentence=q.endswith((".", "?", "!")))
        enc = encode_conversation(
            m.tokenizer,
            m.config.template,
            [Turn("user", f"<image>\n{text}"), Turn("assistant", answer)],
            m.num_image_tokens,
        )
        ids = enc.input_ids[None]
        with torch.no_grad():
            mask = torch.ones_like(ids)
            h = m.mllm.run_decoder(m.mllm.embed(ids, tokens), mask, positions_from_mask(mask))
        pos = int((ids[0] == m.seg_token_id).nonzero()[0])
        states.append(h[0, pos - 1])
    hidden = torch.stack(states)
    with torch.no_grad():
        prompts = m.text_hidden_fcs(hidden)
    for name, x in (("LM hidden state", hidden), ("SAM prompt (head output)", prompts)):
        n = torch.nn.functional.normalize(x, dim=-1)
        cos = (n @ n.T)[~torch.eye(len(x), dtype=torch.bool)]
        print(
            f"{name}: pairwise cosine min {cos.min():.3f} mean {cos.mean():.3f} max {cos.max():.3f}; "
            f"spread {_spread(x):.3f}"
        )


def overfit(steps: int, threads: int) -> None:
    from reasonseg.data.readers import build_reader
    from reasonseg.training.encoder_cache import image_features
    from reasonseg.training.recipe import load_recipe
    from reasonseg.training.trainer import Trainer

    torch.set_num_threads(threads)
    recipe = load_recipe(
        "recipes/lisa-mobile-synth-stage1.yaml",
        [
            "train.output_dir=runs/ablation-overfit",
            f"optim.total_steps={steps}",
            "optim.warmup_steps=0",
            "train.micro_batch_size=6",
            "train.head_init_samples=6",
            "train.progress_bar=false",
            f"train.checkpoint_every={steps}",
            f"train.num_threads={threads}",
        ],
    )
    reader = build_reader("synth", "runs/synth", mode="eval", split="train", fixed_answer=True)
    by_image: dict[str, dict[bytes, object]] = {}
    chosen: list = []
    for k in range(len(reader)):
        s = reader.get(k)
        if s is None or s.target_kinds != ["seg"] or not s.masks.any():
            continue
        targets = by_image.setdefault(s.image_id, {})
        if len(targets) >= 2 or s.masks.tobytes() in targets:
            continue  # two questions with different targets per image
        targets[s.masks.tobytes()] = s
        if len(targets) == 2:
            chosen += list(targets.values())
        if len(chosen) >= 6:
            break
    trainer = Trainer(recipe, dataset=chosen)
    result = trainer.fit()
    print("loss every 10 steps:", [round(h.loss, 3) for h in result.history[::10]])
    m = trainer.model.eval()
    with torch.no_grad():
        batch = trainer.collate(chosen)
        frozen = trainer._frozen_features(batch)
        out = m(batch, images=image_features(m, frozen, batch.resized_hw, batch.original_hw))
    assert out.masks is not None
    for i, s in enumerate(chosen):
        pred = (out.masks[i].logits[0] > 0).numpy()
        gt = s.masks[0].astype(bool)
        iou = float((pred & gt).sum() / max((pred | gt).sum(), 1))
        q = s.turns[0].text.split("\n", 1)[-1]
        print(f"{s.image_id:14s} IoU {iou:.3f}  {q[:70]}")


def frozen_head(steps: int, threads: int, out: str) -> None:
    """Stage 1 with the LISA head frozen at its standardised initialisation: the prompts keep the
    hidden states' spread, so the decoder cannot be handed one prompt for every question."""
    from reasonseg.training.recipe import load_recipe
    from reasonseg.training.trainer import Trainer

    torch.set_num_threads(threads)
    recipe = load_recipe(
        "recipes/lisa-mobile-synth-stage1.yaml",
        [
            "train.output_dir=runs/ablation-frozen-head",
            "freeze.train_head=false",
            f"optim.total_steps={steps}",
            f"train.checkpoint_every={steps}",
            f"train.num_threads={threads}",
        ],
    )
    trainer = Trainer(recipe)
    result = trainer.fit()
    print("loss every 20 steps:", [round(h.loss, 3) for h in result.history[::20]])
    # The frozen head's standardised weights are not in the checkpoint (it holds trained tensors
    # only), so the model is saved whole; there is no LoRA to merge in this stage.
    print(trainer.model.eval().save_pretrained(out))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("spread")
    s.add_argument("--model", required=True)
    s.add_argument("--answer", default="It is [SEG].")
    o = sub.add_parser("overfit")
    o.add_argument("--steps", type=int, default=60)
    o.add_argument("--threads", type=int, default=1)
    f = sub.add_parser("frozen-head")
    f.add_argument("--steps", type=int, default=120)
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--out", default="runs/ablation-frozen-head/model")
    args = p.parse_args(argv)
    if args.cmd == "spread":
        spread(args.model, args.answer)
    elif args.cmd == "overfit":
        overfit(args.steps, args.threads)
    else:
        frozen_head(args.steps, args.threads, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
