"""Why the built-in model returns one mask per image whatever is asked, and never rejects: the
experiments of its model card.

    .venv/bin/python bench/ablation_query_blindness.py spread --model models/lisa-mobile-synth
    .venv/bin/python bench/ablation_query_blindness.py overfit --steps 60
    .venv/bin/python bench/ablation_query_blindness.py frozen-head --steps 120
    .venv/bin/python bench/ablation_query_blindness.py long-head --world runs/synth20 \
        --recipe recipes/experiments/synth20-stage1.yaml --train-samples 3000 --steps 900 --eval-every 150
    .venv/bin/python bench/ablation_query_blindness.py long-head --oracle --world runs/synth20 \
        --recipe recipes/experiments/synth20-stage1.yaml --train-samples 3000 --steps 600 --eval-every 100
    .venv/bin/python bench/ablation_query_blindness.py long-head --distil --world runs/synth20 \
        --recipe recipes/experiments/synth20-stage1.yaml --train-samples 3000 --oracle-steps 600 \
        --steps 450 --eval-every 150 --out runs/distil20/model
    .venv/bin/python bench/ablation_query_blindness.py rej-margin --model models/lisa-mobile-synth \
        --world runs/synth
    .venv/bin/python bench/ablation_query_blindness.py presence --world runs/synth20 \
        --cache-dir runs/encoder-cache-mobile
    .venv/bin/python bench/ablation_query_blindness.py selection --world runs/synth \
        --eval runs/eval2/test-gen runs/eval10/gpu750-test-gen

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
* ``long-head``: stage 1 (frozen LM; head and mask decoder trained) for more samples than the trainer's step
  gives on this CPU in the same time. The frozen LM's slot states and the SAM embeddings are computed once;
  each step then runs only the head and the mask decoder, and the loss (the recipe's BCE and Dice weights,
  the trainer's loss functions) is taken on the decoder's 256x256 output instead of the full-size masks.
  Every ``--eval-every`` steps it prints, on the world's test split (first 200 refs), the mean IoU of the
  target masks at 256x256 and the mean IoU between the masks of two queries with different targets on one
  image (near 1: query-blind). Does query dependence appear with more steps? ``--oracle`` replaces the
  LM's slot state by a learned prompt per object kind (a slot: one kind on one image): can the decoder
  learn the kinds from SAM features and find them on held-out scenes when the question is understood?
  ``--distil`` is a curriculum on the LM's slots (:func:`long_head`): a linear probe of the target's kind
  from the frozen LM state, the oracle's prompts, the head fitted to them, then head and decoder together.
  Does a head that starts in the decoder's language break the plateau of the model card's item 7, and how
  much of the oracle's IoU does the LM's reading of the question keep?
* ``rej-margin``: could a calibrated threshold recover rejections? For the first ``--limit`` queries
  of each split (the protocol of ``bench/eval_synth_queries.py``), the LM's logit margin
  ``[REJ] - [SEG]`` at the answer's slot (after the trained answer's "It is"), for target and
  no-target queries. Printed per split: the mean margins, the AUC of the margin as a no-target
  detector (0.5: no signal), and the N-acc / T-acc on the test split of the bias on the margin that
  maximises (N-acc + T-acc) / 2 on the training split.
* ``presence``: is the information a rejection needs in the image tokens the LM reads? For every image
  of the world's train and test splits, which object kinds it shows (the annotations), and MobileSAM's
  embedding average-pooled to g x g tokens, as the ``sam`` vision tower does (g = 8 for the LM's 64
  tokens). Per grid, a multiple-instance probe scores each kind by the log-sum-exp over the tokens of a
  per-token score (linear, or a one-hidden-layer MLP), trained on the training images (binary
  cross-entropy, full-batch Adam, 400 steps) and tested on the held-out test images. Printed: the
  macro-averaged AUC over kinds (0.5: no signal) and the balanced accuracy at probability 0.5 on both
  splits, and the same for a probe of the mean over the tokens. A no-target query is one whose kind is
  absent, so a probe that cannot tell presence from these tokens bounds what the LM can learn.
* ``selection``: is a wrong mask a badly drawn target or a well drawn wrong object? For the target
  queries of ``bench/eval_synth_queries.py`` runs (their ``per_sample.jsonl``), the IoU of the predicted
  mask with every annotated object of the image. Printed per run: how often the mask lies on one object
  (best IoU >= 0.5), how often that object is one of the query's targets, the chance that an object
  drawn at random is a target, and the mean IoU with the target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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


def _fresh_run(output_dir: str) -> None:
    """These ablations reproduce a figure from scratch: the previous run of the same ablation (its
    checkpoints, which ``Trainer.fit`` would refuse to overwrite) is replaced."""
    import shutil

    ckpts = Path(output_dir) / "checkpoints"
    if ckpts.is_dir():
        print(f"replacing the previous run of this ablation in {output_dir}")
        shutil.rmtree(ckpts)


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
    _fresh_run("runs/ablation-overfit")
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
    _fresh_run("runs/ablation-frozen-head")
    trainer = Trainer(recipe)
    result = trainer.fit()
    print("loss every 20 steps:", [round(h.loss, 3) for h in result.history[::20]])
    # The frozen head's standardised weights are not in the checkpoint (it holds trained tensors
    # only), so the model is saved whole; there is no LoRA to merge in this stage.
    print(trainer.model.eval().save_pretrained(out))


def _low_res_target(
    mask: torch.Tensor, resized_hw: tuple[int, int], stride: int, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-size mask [H,W] in the decoder's output frame [side,side] (``stride`` input pixels per
    output pixel): (target, valid pixels)."""
    import torch.nn.functional as F

    h, w = resized_hw[0] // stride, resized_hw[1] // stride
    small = F.interpolate(mask[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    target = torch.zeros(side, side)
    valid = torch.zeros(side, side, dtype=torch.bool)
    target[:h, :w] = (small > 0.5).float()
    valid[:h, :w] = True
    return target, valid


def _slots(
    trainer, samples: list, embeddings: dict, kind_of: dict[int, int], oracle: bool
) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The training or test slots of ``samples``: frozen-LM states at the [SEG] slots [n,H] (``oracle``:
    kind ids [n,1], one slot per (image, kind)), their image keys, targets and valid pixels
    [n,side,side] in the decoder's output frame, each slot's object kind [n] (-1 when the target spans
    several kinds or the sample names no annotations) and each slot's query family (the synthetic
    world's ``family``, "" when the sample has none). The images' SAM embeddings go into ``embeddings``
    (bf16, by image key)."""
    from reasonseg.training.encoder_cache import frozen_features, image_features

    m = trainer.model
    side = 4 * m.sam.prompt_encoder.image_embedding_size[0]  # the mask decoder's output is 4x the embedding
    stride = m.sam.image_size // side
    states, keys, targets, valid, labels, families = [], [], [], [], [], []
    seen: set[tuple[str, int]] = set()  # oracle: one slot per (image, kind)
    for start in range(0, len(samples), 16):
        chunk = samples[start : start + 16]
        batch = trainer.collate(chunk)
        frozen = trainer._frozen_features(batch)  # through train.encoder_cache, if the recipe sets one
        if frozen is None:
            frozen = frozen_features(m, batch.pixels, batch.resized_hw)
        if oracle:
            for i, sample in enumerate(chunk):
                key = batch.image_keys[i]
                embeddings.setdefault(key, frozen.sam_embeddings[i].to(torch.bfloat16))
                anns = [int(a) for a in (sample.meta or {}).get("ann_ids") or []]
                by_kind: dict[int, torch.Tensor] = {}
                for j, kind in enumerate(sample.target_kinds):
                    if kind == "seg" and j < len(anns) and anns[j] in kind_of:
                        mask = torch.as_tensor(batch.masks[i][j]).bool()
                        k = kind_of[anns[j]]
                        by_kind[k] = by_kind[k] | mask if k in by_kind else mask
                for k, mask in by_kind.items():
                    if (key, k) in seen:
                        continue
                    seen.add((key, k))
                    t, v = _low_res_target(mask.to(torch.uint8), batch.resized_hw[i], stride, side)
                    states.append(torch.tensor([float(k)]))
                    keys.append(key)
                    targets.append(t)
                    valid.append(v)
                    labels.append(k)
                    families.append("")
            continue
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            images = image_features(m, frozen, batch.resized_hw, batch.original_hw)
            off = torch.zeros_like(batch.input_ids, dtype=torch.bool)
            out = m(batch, images=images, decode_masks=False, logits_at=off)
        for i, positions in enumerate(out.slot_positions):
            key = batch.image_keys[i]
            embeddings.setdefault(key, frozen.sam_embeddings[i].to(torch.bfloat16))
            # one [SEG] per ref here (the union of its annotations), so the label is the ref's kind
            ref_kinds = {kind_of.get(int(a), -1) for a in (chunk[i].meta or {}).get("ann_ids") or []}
            for j, pos in enumerate(positions.tolist()):
                if out.kinds[i][j] != "seg":
                    continue
                mask = torch.as_tensor(batch.masks[i][j])
                t, v = _low_res_target(mask, batch.resized_hw[i], stride, side)
                states.append(out.hidden_states[i, pos - 1].float())
                keys.append(key)
                targets.append(t)
                valid.append(v)
                labels.append(ref_kinds.pop() if len(ref_kinds) == 1 else -1)
                families.append(str((chunk[i].meta or {}).get("family", "")))
    stacked = torch.stack(states), keys, torch.stack(targets), torch.stack(valid), torch.tensor(labels)
    return (*stacked, families)


def long_head(
    recipe_path: str,
    world: str,
    train_samples: int,
    steps: int,
    batch_size: int,
    lr: float,
    threads: int,
    eval_every: int,
    mode: str = "lm",
    oracle_steps: int = 600,
    out: str | None = None,
) -> None:
    """The ``long-head`` experiment (module docstring): ``train_samples`` draws of ``recipe_path``'s
    mixture give the training slots (frozen-LM state [H], SAM embedding [256,h,w], target and valid
    pixels [4h,4w] each); ``steps`` AdamW steps of ``batch_size`` slots at ``lr`` (20 warm-up steps,
    linear decay to 5% of it); every ``eval_every`` steps one printed line with the training BCE/Dice
    means and the test split's mean IoU and pair IoU.

    ``mode``:

    * ``lm``: the LISA head (standardised first) and the mask decoder trained on the LM's slot states.
    * ``oracle``: no LM. A slot is (image, object kind), its target the union of the sample's instances
      of that kind, and its SAM prompt a learned vector per kind (trained with the decoder): the text is
      understood perfectly, so what is left is whether the decoder learns each kind's appearance from
      SAM features in this budget and carries it to held-out scenes.
    * ``distil``: a curriculum on the LM's slots, each labelled with its ref's object kind where it has
      one. (1) A linear probe: can the kind be read off the frozen LM's state, on training and on
      held-out test slots? (2) ``oracle_steps`` steps train a prompt per kind with the decoder on the
      labelled slots, as ``oracle`` does. (3) The LISA head is fitted (MSE, decoder untouched) to map each
      labelled state to its kind's prompt, so that it speaks the decoder's language from the start.
      (4) ``steps`` steps train the head and the decoder together on every slot, as ``lm`` does.
      ``out``: the model with this head and decoder, saved whole for ``bench/eval_synth_queries.py``.
      ``oracle_steps`` 0 stops after the probe."""
    import random

    from reasonseg.data.readers import build_reader
    from reasonseg.training.losses import mask_losses
    from reasonseg.training.recipe import load_recipe
    from reasonseg.training.trainer import SampleStream, Trainer, _get_sample

    if mode not in ("lm", "oracle", "distil"):
        raise SystemExit(f"long-head: unknown mode {mode!r} (lm, oracle or distil)")
    oracle = mode == "oracle"
    torch.set_num_threads(threads)
    random.seed(0)
    trainer = Trainer(load_recipe(recipe_path, ["train.progress_bar=false"]))
    m = trainer.model
    if not oracle:
        trainer.standardise_head_input(trainer.recipe.train.head_init_samples)
    kind_of: dict[int, int] = {}  # annotation id -> object kind (category id)
    if mode != "lm":
        instances = json.loads((Path(world) / "refer_seg" / "grefcoco" / "instances.json").read_text())
        kind_of = {int(a["id"]): int(a["category_id"]) for a in instances["annotations"]}
    embeddings: dict[str, torch.Tensor] = {}
    grid = m.sam.prompt_encoder.image_embedding_size  # (h, w) of the SAM embedding

    stream = SampleStream(len(trainer.dataset), trainer.recipe.train.seed, 1)
    draws = [_get_sample(trainer.dataset, *stream.batch(k)[0]) for k in range(train_samples)]
    train = _slots(trainer, draws, embeddings, kind_of, oracle)
    reader = build_reader("synth", world, mode="eval", split="test", fixed_answer=True)
    tests = [s for s in (reader.get(k) for k in range(min(len(reader), 200))) if s is not None]
    test = _slots(trainer, tests, embeddings, kind_of, oracle)
    print(f"slots: {len(train[0])} train on {len(embeddings)} images, {len(test[0])} test", flush=True)
    if len(train[1]) < batch_size:
        raise SystemExit(
            f"long-head: --train-samples {train_samples} gave {len(train[1])} [SEG] slots, fewer than "
            f"--batch-size {batch_size}; ask for more samples or a smaller batch"
        )

    decoder, head, pe = m.sam.mask_decoder, m.text_hidden_fcs, m.sam.prompt_encoder
    weights = trainer.loss_weights  # the recipe's BCE and Dice weights
    table = torch.nn.Embedding(max(kind_of.values(), default=0) + 1, decoder.transformer_dim)
    torch.nn.init.normal_(table.weight, std=1.0)

    def by_kind(ids: torch.Tensor) -> torch.Tensor:
        return table(ids.reshape(-1).long())

    def masks(prompt, states: torch.Tensor, keys: list[str]) -> torch.Tensor:
        n = len(keys)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *grid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = decoder(
                image_embeddings=torch.stack([embeddings[k] for k in keys]).float(),
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=prompt(states)[:, None],
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        return low[:, 0].float()  # [n,side,side]

    def evaluate(prompt, slots) -> str:
        states, keys, targets, valid = slots[:4]
        with torch.no_grad():
            pred = torch.cat(
                [masks(prompt, states[s : s + 32], keys[s : s + 32]) for s in range(0, len(keys), 32)]
            )
        pred = (pred > 0) & valid
        gt = targets.bool()
        iou = ((pred & gt).sum((1, 2)) / (pred | gt).sum((1, 2)).clamp_min(1)).mean()
        pairs = [
            float((pred[a] & pred[b]).sum() / (pred[a] | pred[b]).sum().clamp_min(1))
            for a in range(len(keys))
            for b in range(a + 1, len(keys))
            if keys[a] == keys[b] and not torch.equal(gt[a], gt[b])
        ]
        return f"test mean IoU {float(iou):.3f}, pair IoU {sum(pairs) / max(len(pairs), 1):.3f} ({len(pairs)} pairs)"

    def fit(prompt, modules: list, slots, n_steps: int, check, label: str) -> None:
        """``n_steps`` AdamW steps of the mask losses on ``slots``, training ``modules`` and the decoder;
        ``check`` (a thunk) is printed every ``eval_every`` steps."""
        params = [q for mod in [*modules, decoder] for q in mod.parameters()]
        for q in params:
            q.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / n_steps)
        )
        states, keys, targets, valid = slots[:4]
        print(f"{label} step 0: {check()}", flush=True)
        history: list[tuple[float, float]] = []
        start = time.perf_counter()
        for step in range(1, n_steps + 1):
            idx = random.sample(range(len(keys)), batch_size)
            logits = masks(prompt, states[idx], [keys[i] for i in idx])
            # One entry per slot: each has its own valid region (its image's size).
            bce_sum, dice_sum, count = mask_losses(
                list(logits.split(1)),
                [targets[i : i + 1] for i in idx],
                [~valid[i] for i in idx],
                weights=weights,
            )
            bce, dice = bce_sum / count, dice_sum / count
            loss = weights.bce * bce + weights.dice * dice
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            history.append((float(bce.detach()), float(dice.detach())))
            if step % eval_every == 0 or step == n_steps:
                recent = history[-eval_every:]
                print(
                    f"{label} step {step}: BCE {sum(h[0] for h in recent) / len(recent):.3f} "
                    f"Dice {sum(h[1] for h in recent) / len(recent):.3f} "
                    f"({(time.perf_counter() - start) / step:.2f} s/step); {check()}",
                    flush=True,
                )

    if mode != "distil":
        prompt = by_kind if oracle else head
        fit(prompt, [table if oracle else head], train, steps, lambda: evaluate(prompt, test), "long-head")
        return

    def labelled(slots):
        rows = (slots[4] >= 0).nonzero().flatten()
        keys, families = [slots[1][i] for i in rows.tolist()], [slots[5][i] for i in rows.tolist()]
        return slots[0][rows], keys, slots[2][rows], slots[3][rows], slots[4][rows], families

    train_l, test_l = labelled(train), labelled(test)
    print(f"labelled slots: {len(train_l[1])} train, {len(test_l[1])} test", flush=True)
    if len(train_l[1]) < batch_size or not test_l[1]:
        raise SystemExit(
            f"long-head --distil: {len(train_l[1])} training and {len(test_l[1])} test slots have a target "
            f"of one object kind; it needs at least --batch-size {batch_size} and 1: ask for more samples"
        )
    _probe(train_l[0], train_l[4], test_l[0], test_l[4], test_l[5])
    if oracle_steps == 0:
        return  # the probe alone
    fit(
        by_kind,
        [table],
        (train_l[4], *train_l[1:4]),
        oracle_steps,
        lambda: "oracle prompts: " + evaluate(by_kind, (test_l[4], *test_l[1:4])),
        "distil (2) oracle",
    )
    # (3) the head learns to name each labelled state's kind prompt; the decoder is left as it is
    target = table.weight.detach()[train_l[4]]
    for q in head.parameters():
        q.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(400):
        loss = torch.nn.functional.mse_loss(head(train_l[0]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        test_mse = float(torch.nn.functional.mse_loss(head(test_l[0]), table.weight[test_l[4]]))
    print(
        f"distil (3) head fitted: MSE {float(loss.detach()):.3f} train, {test_mse:.3f} test (labelled slots)"
    )
    print(f"distil (3) labelled test slots through the head: {evaluate(head, test_l)}")
    fit(head, [head], train, steps, lambda: "all test slots: " + evaluate(head, test), "distil (4) joint")
    if out:
        for q in m.parameters():
            q.requires_grad_(False)
        print(m.eval().save_pretrained(out))


def _probe(
    x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, families: list[str]
) -> None:
    """Prints the accuracy of a linear classifier of ``y`` from standardised ``x`` (full-batch Adam,
    weight decay 1e-3) on its training slots and on held-out ones, the majority-class baseline, and the
    held-out accuracy per query family group (``families``: the test slots' synthetic-world families,
    grouped by their prefix, e.g. ``sem`` for the ones that name the kind, and by whether the family
    is one of the 8 never used in training)."""
    from reasonseg.data.synth.queries import TEST_FAMILIES

    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
    classes = int(max(y.max(), y_test.max())) + 1
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    z, z_test = (x - mu) / sigma, (x_test - mu) / sigma
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(lin(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((lin(z).argmax(1) == y).float().mean())
        right = lin(z_test).argmax(1) == y_test
    majority = float((y_test == torch.bincount(y).argmax()).float().mean())
    print(
        f"distil (1) linear probe of the kind from the frozen LM state: {acc:.3f} train, "
        f"{float(right.float().mean()):.3f} test (majority class {majority:.3f})",
        flush=True,
    )
    groups: dict[str, list[bool]] = {}
    for fam, ok in zip(families, right.tolist(), strict=True):
        name = fam.split(".")[0] + (" (held-out wording)" if fam in TEST_FAMILIES else "")
        groups.setdefault(name, []).append(ok)
    for name, oks in sorted(groups.items()):
        print(f"    test slots of family {name}: {sum(oks) / len(oks):.3f} of {len(oks)}", flush=True)


def rej_margin(model_dir: str, world: str, limits: tuple[int, int], threads: int) -> None:
    import numpy as np

    from eval_synth_queries import build_items
    from reasonseg.inference.predictor import ReasonSegPredictor
    from reasonseg.model import LisaModel

    torch.set_num_threads(threads)
    m = LisaModel.from_pretrained(model_dir).eval()
    seg, rej = m.seg_token_id, m.tokenizer.convert_tokens_to_ids(m.config.rej_token)
    answer = m.answer_drafts()[0]  # the trained single-target answer, "It is [SEG]." + end token
    lead = torch.tensor(answer[: answer.index(seg)])
    pred = ReasonSegPredictor(m)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, limit in zip(("train", "test"), limits, strict=True):
        margins, negative = [], []
        last = None
        for item in build_items(Path(world), split, first_sentence_only=True, limit=limit):
            sample = item.sample()
            if last is None or not np.array_equal(sample.image, last):
                pred.set_image(sample.image)
                last = sample.image
            _, ids = pred._prompt(sample.turns[0].text.split("\n", 1)[1], None)
            full = torch.cat([ids, lead])[None]
            with torch.inference_mode():
                embeds = m.mllm.embed(full, pred._features.vision_tokens)  # type: ignore[union-attr]
                mask = torch.ones_like(full)
                h = m.mllm.run_decoder(embeds, mask, torch.arange(full.shape[1])[None])
                logits = m.mllm.lm_logits(h[:, -1]).float()[0]
            margins.append(float(logits[rej] - logits[seg]))
            negative.append(all(k == "rej" for k in sample.target_kinds))
        found[split] = (np.array(margins), np.array(negative, dtype=bool))
    for split, (mg, neg) in found.items():
        pos_m, neg_m = mg[~neg], mg[neg]
        auc = _auc(torch.from_numpy(mg), torch.from_numpy(neg))  # the margin as a no-target detector
        print(
            f"{split}: {len(mg)} queries ({int(neg.sum())} no-target); margin [REJ]-[SEG] mean "
            f"{neg_m.mean() if len(neg_m) else float('nan'):.3f} no-target, {pos_m.mean():.3f} target; "
            f"AUC {auc:.3f}"
        )

    def accuracies(mg: np.ndarray, neg: np.ndarray, bias: float) -> tuple[float, float]:
        rejected = mg + bias > 0
        n_acc = float(rejected[neg].mean()) if neg.any() else float("nan")
        return n_acc, float((~rejected[~neg]).mean())

    train_mg, train_neg = found["train"]
    candidates = np.concatenate([[-np.inf], -np.sort(train_mg) + 1e-6])
    bias = max(candidates, key=lambda c: float(np.nanmean(accuracies(train_mg, train_neg, c))))
    n_acc, t_acc = accuracies(*found["test"], bias)
    print(
        f"bias chosen on train: {bias:.3f} -> test N-acc {100 * n_acc:.1f}, T-acc {100 * t_acc:.1f} "
        f"(no bias: N-acc {100 * accuracies(*found['test'], 0.0)[0]:.1f})"
    )


def _auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` [n] for the bool ``label`` [n] (ties count half); nan if one
    class is absent."""
    pos, neg = score[label], score[~label]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    return float(greater.mean())


def presence(
    world: str, cache_dir: str | None, grids: Sequence[int], steps: int, threads: int, tiny: bool = False
) -> None:
    """The ``presence`` experiment (module docstring); ``tiny``: the tiny random lisa-mobile (tests)."""
    import numpy as np
    import torch.nn.functional as F

    from reasonseg.data.transforms import SamTransform, load_image
    from reasonseg.model import LisaModel
    from reasonseg.training.encoder_cache import frozen_encoder_cache, frozen_features

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    root = Path(world) / "refer_seg"
    instances = json.loads((root / "grefcoco" / "instances.json").read_text())
    kinds = sorted({int(a["category_id"]) for a in instances["annotations"]})
    column = {k: i for i, k in enumerate(kinds)}
    shown: dict[int, set[int]] = {}
    for a in instances["annotations"]:
        shown.setdefault(int(a["image_id"]), set()).add(column[int(a["category_id"])])
    m = LisaModel.from_preset("lisa-mobile", tiny=tiny).eval()  # MobileSAM, as the encoder cache
    cache = frozen_encoder_cache(m, cache_dir) if cache_dir else None
    transform = SamTransform(m.sam.image_size)
    data: dict[str, tuple[dict[int, list[torch.Tensor]], torch.Tensor]] = {}
    start = time.perf_counter()
    for split in ("train", "test"):
        images = [im for im in instances["images"] if im.get("synth", {}).get("split") == split]
        pooled: dict[int, list[torch.Tensor]] = {g: [] for g in grids}
        labels = torch.zeros(len(images), len(kinds), dtype=torch.bool)
        for i0 in range(0, len(images), 8):
            chunk = images[i0 : i0 + 8]
            prepared = [
                transform.prepare(load_image(root / "images" / "synth" / im["file_name"])) for im in chunk
            ]
            pixels = torch.stack([p.pixels for p in prepared])
            with torch.no_grad():
                emb = frozen_features(
                    m, pixels, [p.resized_hw for p in prepared], cache
                ).sam_embeddings.float()
            for g in grids:
                pooled[g].append(F.adaptive_avg_pool2d(emb, g).flatten(2).transpose(1, 2))  # [b, g*g, C]
            for j, im in enumerate(chunk):
                labels[i0 + j, sorted(shown.get(int(im["id"]), set()))] = True
        data[split] = ({g: torch.cat(v) for g, v in pooled.items()}, labels)  # type: ignore[assignment]
    n_train, n_test = len(data["train"][1]), len(data["test"][1])
    print(
        f"{n_train} train and {n_test} test images, {len(kinds)} kinds, {float(data['train'][1].float().sum(1).mean()):.2f} "
        f"kinds per image; features in {time.perf_counter() - start:.0f} s",
        flush=True,
    )

    def scores(net: torch.nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
        if pool == "mean":
            return net(x.mean(1))
        return torch.logsumexp(net(x), dim=1) - float(np.log(x.shape[1]))  # soft max over the tokens

    print("| grid | tokens | probe | train AUC | test AUC | train bal. acc | test bal. acc |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for g in grids:
        x, y = data["train"][0][g], data["train"][1]
        xt, yt = data["test"][0][g], data["test"][1]
        mu, sigma = x.mean((0, 1)), x.std((0, 1)).clamp_min(1e-6)
        x, xt = (x - mu) / sigma, (xt - mu) / sigma
        for name, pool, hidden in (
            ("mean, linear", "mean", 0),
            ("tokens, linear", "mil", 0),
            ("tokens, MLP", "mil", 256),
        ):
            if hidden and g > 16:
                continue  # [802, 1024, 256] through an MLP for 400 steps is too slow on this CPU
            torch.manual_seed(0)
            c = x.shape[-1]
            net = (
                torch.nn.Sequential(
                    torch.nn.Linear(c, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, len(kinds))
                )
                if hidden
                else torch.nn.Linear(c, len(kinds))
            )
            opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
            for _ in range(steps):
                loss = F.binary_cross_entropy_with_logits(scores(net, x, pool), y.float())
                opt.zero_grad()
                loss.backward()
                opt.step()
            row = [f"{g}x{g}", str(g * g), name]
            cells = []
            for feats, lab in ((x, y), (xt, yt)):
                with torch.no_grad():
                    s = scores(net, feats, pool)
                aucs = [_auc(s[:, k], lab[:, k]) for k in range(len(kinds))]
                pred = s > 0
                bal = [
                    0.5
                    * (
                        float(pred[lab[:, k], k].float().mean())
                        + float((~pred[~lab[:, k], k]).float().mean())
                    )
                    for k in range(len(kinds))
                    if lab[:, k].any() and (~lab[:, k]).any()
                ]
                cells.append((float(np.nanmean(aucs)), float(np.mean(bal))))
            row += [f"{cells[0][0]:.3f}", f"{cells[1][0]:.3f}", f"{cells[0][1]:.3f}", f"{cells[1][1]:.3f}"]
            print("| " + " | ".join(row) + " |", flush=True)


def selection(eval_dirs: Sequence[str], world: str) -> None:
    """Which object the mask is, for the target queries of ``bench/eval_synth_queries.py`` runs."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from reasonseg.data.readers.coco import CocoInstances

    root = Path(world) / "refer_seg" / "grefcoco"
    refs = {r["ref_id"]: r for r in json.loads((root / "grefs(unc).json").read_text())}
    coco = CocoInstances(root / "instances.json")
    objects: dict[int, list[int]] = {}
    for ann_id, ann in coco.anns.items():
        objects.setdefault(int(ann["image_id"]), []).append(ann_id)

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        union = np.logical_or(a, b).sum()
        return float(np.logical_and(a, b).sum() / union) if union else 0.0

    print(
        "| eval run | target queries | mask on one object (IoU >= 0.5) | that object a target | "
        "chance of a target | mean IoU with the target |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for d in eval_dirs:
        n = on_object = on_target = 0
        chance, target_iou = [], []
        for line in (Path(d) / "per_sample.jsonl").read_text().splitlines():
            rec = json.loads(line)
            ref = refs[int(rec["key"].split("-")[0])]
            if ref.get("no_target"):
                continue
            im = coco.image(ref["image_id"])
            pred = np.zeros((im["height"], im["width"]), dtype=bool)
            for t in rec["targets"]:
                if t.get("pred_rle"):
                    rle = dict(t["pred_rle"], counts=t["pred_rle"]["counts"].encode())
                    pred |= mask_utils.decode(rle).astype(bool)
            ids = objects[ref["image_id"]]
            masks = {i: coco.ann_mask(i).astype(bool) for i in ids}
            ious = {i: iou(pred, m) for i, m in masks.items()}
            best = max(ious, key=ious.__getitem__)
            targets = set(ref["ann_id"])
            truth = np.zeros_like(pred)
            for i in targets & masks.keys():
                truth |= masks[i]
            n += 1
            on_object += ious[best] >= 0.5
            on_target += ious[best] >= 0.5 and best in targets
            chance.append(len(targets & masks.keys()) / len(ids))
            target_iou.append(iou(pred, truth))
        print(
            f"| {d} | {n} | {100 * on_object / n:.1f}% | {100 * on_target / n:.1f}% | "
            f"{100 * float(np.mean(chance)):.1f}% | {float(np.mean(target_iou)):.3f} |"
        )


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
    h = sub.add_parser("long-head")
    h.add_argument("--recipe", default="recipes/experiments/synth20-stage1.yaml")
    h.add_argument("--world", default="runs/synth20")
    h.add_argument("--train-samples", type=int, default=3000)
    h.add_argument("--steps", type=int, default=900)
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--lr", type=float, default=1e-3)
    h.add_argument("--threads", type=int, default=2)
    h.add_argument("--eval-every", type=int, default=150)
    modes = h.add_mutually_exclusive_group()
    modes.add_argument(
        "--oracle", action="store_true", help="a learned prompt per object kind instead of the LM (no LM)"
    )
    modes.add_argument(
        "--distil",
        action="store_true",
        help="probe, then oracle prompts, then the head fitted to them, then head + decoder (see above)",
    )
    h.add_argument(
        "--oracle-steps",
        type=int,
        default=600,
        help="--distil: steps of its oracle phase (0: stop after the probe)",
    )
    h.add_argument("--out", default=None, help="--distil: save the trained model here")
    r = sub.add_parser("rej-margin")
    r.add_argument("--model", default="models/lisa-mobile-synth")
    r.add_argument("--world", default="runs/synth")
    r.add_argument("--limit-train", type=int, default=48)
    r.add_argument("--limit-test", type=int, default=100)
    r.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("presence")
    q.add_argument("--world", default="runs/synth20")
    q.add_argument("--cache-dir", default=None, help="the trainer's encoder cache (train.encoder_cache)")
    q.add_argument("--grids", default="8,16,32", help="token grids to pool the SAM embedding to")
    q.add_argument("--steps", type=int, default=400)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--tiny", action="store_true", help="the tiny random lisa-mobile (tests)")
    c = sub.add_parser("selection")
    c.add_argument("--eval", nargs="+", required=True, help="output folders of bench/eval_synth_queries.py")
    c.add_argument("--world", default="runs/synth")
    args = p.parse_args(argv)
    if args.cmd == "spread":
        spread(args.model, args.answer)
    elif args.cmd == "overfit":
        overfit(args.steps, args.threads)
    elif args.cmd == "frozen-head":
        frozen_head(args.steps, args.threads, args.out)
    elif args.cmd == "rej-margin":
        rej_margin(args.model, args.world, (args.limit_train, args.limit_test), args.threads)
    elif args.cmd == "selection":
        selection(args.eval, args.world)
    elif args.cmd == "presence":
        grids = [int(g) for g in args.grids.split(",") if g]
        presence(args.world, args.cache_dir, grids, args.steps, args.threads, args.tiny)
    else:
        long_head(
            args.recipe,
            args.world,
            args.train_samples,
            args.steps,
            args.batch_size,
            args.lr,
            args.threads,
            args.eval_every,
            "oracle" if args.oracle else "distil" if args.distil else "lm",
            args.oracle_steps,
            args.out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
