"""Adapter from :class:`reasonseg.model.LisaModel` to the evaluation's :class:`Segmenter` interface.

* teacher-forced: the item's whole conversation (its last assistant turn holds the reference answer
  with one ``[SEG]``/``[REJ]`` per target) runs through ``model.forward``; every slot is decoded to
  a mask, and the slot's ``[SEG]``-vs-``[REJ]`` decision is the model's own prediction at the
  position before it (GSVA's protocol; ignored by LISA's rules).
* generative: the conversation without its last assistant turn is a prompt to ``model.generate``
  (greedy, KV cache, left padding for batches); each generated ``[SEG]`` gives a mask, a generated
  ``[REJ]`` gives none (what a user sees).

Images are encoded once per batch; with ``cache_dir`` the frozen encoders' outputs (SAM embeddings and
the vision tower's features, before the trained projector) are stored on disk with
:class:`reasonseg.training.encoder_cache.EncoderCache`, keyed by the preprocessed pixels and the
encoders' weights, so a second evaluation, another mode or checkpoint, several items on one image, or
images a training run with the same cache already saw skip the image encoder.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reasonseg.evaluation.segmenter import EvalItem, EvalMode, SegmentResult

if TYPE_CHECKING:
    from reasonseg.model import LisaModel
    from reasonseg.model.outputs import ImageFeatures

__all__ = ["LisaSegmenter"]


class LisaSegmenter:
    """Evaluate a :class:`LisaModel` (see the module docstring).

    Args:
        model: the model (eval mode is set here).
        name: identifies the model in the run manifest (default: the config's name).
        cache_dir: image-encoder disk cache directory, or None for no cache.
        max_new_tokens: generation budget per answer (generative mode).
        max_length: truncate conversations to this many tokens; default None: no truncation, as in
            LISA's and GSVA's evaluation (the training ``max_length`` would cut GSVA's many-expression
            prompts and lose slots).
    """

    def __init__(
        self,
        model: LisaModel,
        *,
        name: str | None = None,
        cache_dir: str | Path | None = None,
        max_new_tokens: int = 64,
        max_length: int | None = None,
    ) -> None:
        from reasonseg.data.transforms import SamTransform

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model.eval()
        self.name = name or model.config.name
        self.transform = SamTransform(int(model.sam.image_size))
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.cache: Any = None
        if cache_dir is not None:
            from reasonseg.training.encoder_cache import frozen_encoder_cache

            # The frozen encoders' outputs, before the projector: the training cache's layout, so
            # every checkpoint of a base model (and its training run) shares one cache.
            self.cache = frozen_encoder_cache(model, cache_dir)
        self.encoder_calls = 0  # images actually run through the encoder (cache misses)
        self.encoder_seconds = 0.0  # wall time spent in the image encoder

    # -- images ----------------------------------------------------------------------------------
    def encode(self, images: Sequence[np.ndarray]) -> ImageFeatures:
        """HxWx3 uint8 images -> :class:`ImageFeatures` (row i for image i), through the cache if any."""
        from reasonseg.training.encoder_cache import FrozenImageFeatures, encode_frozen, image_features

        prepared = [self.transform.prepare(im) for im in images]
        pixels = torch.stack([p.pixels for p in prepared])  # [B,3,L,L]
        resized = [p.resized_hw for p in prepared]
        original = [p.original_hw for p in prepared]

        def run(idx: list[int]) -> FrozenImageFeatures:
            t0 = time.perf_counter()
            out = encode_frozen(self.model, pixels[idx], [resized[i] for i in idx])
            self.encoder_calls += len(idx)
            self.encoder_seconds += time.perf_counter() - t0
            return out

        with torch.no_grad():
            if self.cache is None:
                frozen = run(list(range(len(images))))
            else:
                frozen = self.cache.encode_indexed(pixels, run)
            return image_features(self.model, frozen, resized, original)

    # -- the interface ---------------------------------------------------------------------------
    @torch.no_grad()
    def segment(self, items: Sequence[EvalItem], mode: EvalMode) -> list[SegmentResult]:
        from reasonseg.data.conversation import encode_conversation

        samples = [it.load() for it in items]
        feats = self.encode([s.load_image() for s in samples])
        model = self.model
        n_img = model.num_image_tokens
        if mode == "teacher-forced":
            encoded = [
                encode_conversation(
                    model.tokenizer, model.template, s.turns, n_img, self.max_length
                ).input_ids
                for s in samples
            ]
            t = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), t), model.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(encoded), t), dtype=torch.long)
            for i, e in enumerate(encoded):  # right padding: slots keep their positions
                ids[i, : len(e)] = e
                mask[i, : len(e)] = 1
            out = model.forward(input_ids=ids, attention_mask=mask, images=feats)
            assert out.masks is not None
            results = []
            for i, it in enumerate(items):
                k = samples[i].masks.shape[0]
                if len(out.kinds[i]) != k:
                    raise ValueError(
                        f"item {it.key}: the tokenised reference answer holds {len(out.kinds[i])} [SEG]/[REJ] "
                        f"slots for {k} target masks"
                        + (f" (truncated at max_length={self.max_length}?)" if self.max_length else "")
                    )
                results.append(
                    SegmentResult(
                        masks=(out.masks[i].logits > 0).cpu().numpy(),
                        rejected=[bool(x) for x in out.predicted_rej[i].tolist()],
                    )
                )
            return results
        if mode != "generative":
            raise ValueError(f"unknown mode {mode!r}")
        prompts = []
        for it, s in zip(items, samples, strict=True):
            if s.turns[-1].role != "assistant" or len(s.turns) < 2:
                raise ValueError(f"item {it.key}: the conversation must end with the reference answer")
            prompts.append(
                encode_conversation(
                    model.tokenizer,
                    model.template,
                    s.turns[:-1],
                    n_img,
                    self.max_length,
                    add_generation_prompt=True,
                ).input_ids
            )
        # Greedy answers checked against the answer templates in one pass (same answers, fewer passes).
        gen = model.generate(prompts, feats, max_new_tokens=self.max_new_tokens, drafts=model.answer_drafts())
        assert gen.masks is not None
        results = []
        for i in range(len(items)):
            masks = (gen.masks[i].logits > 0).cpu().numpy()
            rejected = [k == "rej" for k in gen.kinds[i]]
            masks[np.asarray(rejected, dtype=bool)] = False  # [REJ]: no mask for the user
            results.append(SegmentResult(masks=masks, rejected=rejected, answer=gen.texts[i]))
        return results
