"""Helpers for the model/predictor/convert tests: tiny models, and one trained to say a fixed answer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from reasonseg.data.conversation import Turn, encode_conversation
from reasonseg.model import ImageFeatures, LisaModel

SCRIPTED_ANSWER = "Sure, a:[SEG], b:[REJ], c:[SEG]."


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models run ~10x faster on one thread when other jobs share the cores (no spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_model(preset: str = "gsva-7b", dtype: torch.dtype = torch.float32) -> LisaModel:
    """A tiny random model."""
    torch.manual_seed(0)
    return LisaModel.from_preset(preset, tiny=True).to(dtype)


def random_pixels(model: LisaModel, n: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = model.sam.image_size
    return torch.randn(n, 3, side, side, generator=g, dtype=model.dtype)


def prompt_ids(model: LisaModel, instruction: str) -> torch.Tensor:
    """[T] ids of a one-turn prompt ending with the assistant prefix."""
    enc = encode_conversation(
        model.tokenizer,
        model.config.template,
        [Turn("user", instruction)],
        model.num_image_tokens,
        add_generation_prompt=True,
    )
    return enc.input_ids


def train_to_answer(
    model: LisaModel, images: ImageFeatures, answer: str = SCRIPTED_ANSWER, max_steps: int = 400
) -> None:
    """Overfit the LM (teacher forcing, plain cross-entropy) until every answer token is the argmax
    with a clear margin (loss < 0.02), so that the training prompts on these images are answered with
    ``answer``: a real model whose generation holds [SEG]/[REJ] slots."""
    instructions = ["Segment the cat.", "What is here?", "Find a, b and c please."]
    encs = [
        encode_conversation(
            model.tokenizer,
            model.config.template,
            [Turn("user", q), Turn("assistant", answer)],
            model.num_image_tokens,
        )
        for q in instructions
    ]
    t = max(len(e) for e in encs)
    ids = torch.full((len(encs), t), model.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encs), t), -100, dtype=torch.long)
    mask = torch.zeros((len(encs), t), dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = e.input_ids
        labels[i, : len(e)] = e.labels
        mask[i, : len(e)] = 1
    feats = images.select([0] * len(encs))
    feats = ImageFeatures(
        feats.sam_embeddings.detach(), feats.vision_tokens.detach(), feats.resized_hw, feats.original_hw
    )
    params = [p for p in model.mllm.lm.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(max_steps):
        out = model(input_ids=ids, attention_mask=mask, images=feats, decode_masks=False)
        loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        if loss.item() < 0.02:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise AssertionError(f"the tiny model did not learn the answer (loss {loss.item():.3f})")
    model.eval()
