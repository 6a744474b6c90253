"""``ReasonSegPredictor``: set an image once, then ask as many questions as you like.

The per-image state lives here, not in the model: ``set_image`` runs the image encoder once and keeps
the SAM embedding and the LM image tokens; the keys/values of the prompt prefix that ends with the
image tokens are cached too, so a follow-up question only runs the LM over its own new tokens, and so
are those of the last conversation, so a next turn (``history=previous.history``) only runs its own.

    >>> predictor = ReasonSegPredictor(LisaModel.from_preset("lisa-mobile"))      # doctest: +SKIP
    >>> predictor.set_image("kitchen.jpg")                                         # doctest: +SKIP
    >>> p = predictor.predict("What could I use to cut bread?")                    # doctest: +SKIP
    >>> p.text, p.masks.shape, p.scores, p.rejected                                # doctest: +SKIP
    ('Sure, it is [SEG].', (1, 480, 640), array([0.83], dtype=float32), [False])

Scores: each mask's score is the mean sigmoid probability over the pixels it covers (its mean
confidence; 0 for an empty mask). The mask decoder's own IoU prediction is also returned
(``iou_predictions``); LISA never trained that head, so it is not the default score.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reasonseg.data.conversation import Turn, encode_conversation
from reasonseg.inference.errors import PromptTooLongError
from reasonseg.model.lisa import LisaModel, fork_cache, stack_caches
from reasonseg.model.outputs import ImageFeatures, MaskPrediction, TargetKind

__all__ = ["Prediction", "PromptTooLongError", "ReasonSegPredictor", "Target", "target_labels"]


@dataclass
class Target:
    """One [SEG]/[REJ] slot of an answer, in answer order.

    Attributes:
        kind: ``"seg"`` (a mask was produced) or ``"rej"`` (the target is absent: no mask).
        label: the name written before ``:[SEG]`` in the answer (``"a"`` in ``"a:[SEG]"``), or ``""``.
        mask_index: index into ``Prediction.masks`` for a ``seg`` slot, None for ``rej``.
    """

    kind: TargetKind
    label: str
    mask_index: int | None


@dataclass
class Prediction:
    """The answer to one instruction.

    Attributes:
        text: the generated answer (``[SEG]``/``[REJ]`` kept in place).
        masks: bool [K,H,W] at the original image size, one per ``[SEG]`` slot (``[REJ]`` slots have none).
        scores: float32 [K], mean sigmoid probability inside each mask.
        iou_predictions: float32 [K], the mask decoder's IoU head output.
        targets: every slot in answer order (``kind``, ``label``, ``mask_index``).
        history: the conversation including this exchange (pass it back as ``history=`` to continue).
        logits: float32 [K,H,W] mask logits (None unless ``return_logits``).
    """

    text: str
    masks: np.ndarray
    scores: np.ndarray
    iou_predictions: np.ndarray
    targets: list[Target]
    history: list[Turn] = field(default_factory=list)
    logits: np.ndarray | None = None

    @property
    def rejected(self) -> list[bool]:
        """Per slot, True where the model answered ``[REJ]`` (target absent)."""
        return [t.kind == "rej" for t in self.targets]

    @property
    def labels(self) -> list[str]:
        """The label of each mask (``""`` where the answer names none)."""
        return [t.label for t in self.targets if t.kind == "seg"]


_LEADING = re.compile(
    r"^(?:sure|yes|ok|okay)?[\s,]*(?:they are|it is|these are|this is|and)?\s*", re.IGNORECASE
)


def target_labels(text: str, slot_tokens: Sequence[str]) -> list[str]:
    """The name before each slot token: ``"Sure, they are a:[SEG], b c:[REJ] and [SEG]."`` gives
    ``["a", "b c", ""]`` for slot tokens ``("[SEG]", "[REJ]")``."""
    pattern = "|".join(re.escape(t) for t in slot_tokens)
    labels = []
    start = 0
    for m in re.finditer(pattern, text):
        chunk = text[start : m.start()]
        start = m.end()
        if not chunk.rstrip().endswith(":"):
            labels.append("")
            continue
        name = re.split(r"[,;.!?\n]", chunk.rstrip()[:-1])[-1]
        name = re.sub(r"^\s*and\s+", "", name)
        labels.append(_LEADING.sub("", name).strip() if name.strip() else "")
    return labels


class ReasonSegPredictor:
    """Reasoning segmentation on one image at a time, with a per-image cache.

    Args:
        model: a :class:`LisaModel` (switched to eval mode).
        max_new_tokens: default answer length limit.
        cache_prefix: keep the keys/values of the prompt prefix that ends with the image tokens.
        num_threads: if given, ``torch.set_num_threads(num_threads)`` (process-wide). On a small CPU
            shared with other work, fewer threads than cores is often faster: torch's threads
            spin-wait for each other, so one busy core slows every operation down (on the 2-core
            machine of ``BENCHMARKS.md``, under load, 1 thread beat 2). None keeps torch's setting.
        draft_answers: greedy answers are decoded speculatively from drafts (the predictor's recent
            answers, then the model's answer templates; ``LisaModel.generate(drafts=...)``): the same
            answer, usually in one LM pass instead of one per token. False decodes token by token.
    """

    def __init__(
        self,
        model: LisaModel,
        *,
        max_new_tokens: int = 64,
        cache_prefix: bool = True,
        num_threads: int | None = None,
        draft_answers: bool = True,
    ) -> None:
        from reasonseg.data.transforms import SamTransform

        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)

        self.model = model.eval()
        self.transform = SamTransform(model.sam.image_size)
        self.max_new_tokens = _token_budget(max_new_tokens, 64)
        self.cache_prefix = cache_prefix
        self._features: ImageFeatures | None = None
        self._image_hw: tuple[int, int] | None = None
        self._prefix: tuple[torch.Tensor, Any, int] | None = None
        self.draft_answers = draft_answers
        # keys/values of the text before the image (once per predictor)
        self._text_head: tuple[torch.Tensor, Any, int] | None = None
        self._conversation: tuple[Any, torch.Tensor] | None = None  # the last answer's keys/values, ids
        self._recent: list[list[int]] = []  # token ids of the latest distinct answers, newest first
        self._pending_prefix: torch.Tensor | None = None  # an image prefix the current pass computes

    # ------------------------------------------------------------------------------------------- image

    @torch.no_grad()
    def set_image(self, image: str | Path | bytes | np.ndarray | Any) -> None:
        """Load (path, bytes, PIL image or HxWx3 uint8 array), preprocess and encode an image once."""
        from reasonseg.data.transforms import load_image

        rgb = load_image(image)
        prepared = self.transform.prepare(rgb)
        self._features = self.model.encode_images(
            prepared.pixels[None], [prepared.resized_hw], [prepared.original_hw]
        )
        self._image_hw = prepared.original_hw
        self._prefix = None
        self._conversation = None

    @property
    def has_image(self) -> bool:
        return self._features is not None

    def reset_image(self) -> None:
        """Drop the cached image (frees its embedding and prefix cache)."""
        self._features = None
        self._image_hw = None
        self._prefix = None
        self._conversation = None

    # ------------------------------------------------------------------------------------------ predict

    def _prompt(
        self, instruction: str, history: Sequence[Any] | None, budget: int = 0
    ) -> tuple[list[Turn], torch.Tensor]:
        """The turns and token ids of ``instruction`` after ``history``; :class:`PromptTooLongError`
        when the prompt and an answer of ``budget`` tokens would not fit the LM's context."""
        turns = [_as_turn(t, i) for i, t in enumerate(history or [])]
        if turns and turns[-1].role != "assistant":
            raise ValueError("history must end with an assistant turn")
        turns.append(Turn("user", instruction))
        enc = encode_conversation(
            self.model.tokenizer,
            self.model.config.template,
            turns,
            self.model.num_image_tokens,
            add_generation_prompt=True,
        )
        context = self.model.config.lm.hf_config.get("max_position_embeddings")
        if context is not None and len(enc.input_ids) + budget > context:
            raise PromptTooLongError(
                f"the prompt is {len(enc.input_ids)} tokens ({self.model.num_image_tokens} of them the image, "
                f"{len(turns) - 1} earlier turns) and the answer may take {budget} more: over the LM's "
                f"context of {context} tokens; shorten the instruction or the history, or lower max_new_tokens"
            )
        return turns, enc.input_ids

    def _prefix_for(self, ids: torch.Tensor, *, defer: bool = False) -> tuple[Any, int] | None:
        """The cached keys/values of ``ids``' prefix up to the image tokens (and the token after
        them when it is the template's image-end token).

        Computed on first use; with ``defer`` a missing image prefix is not computed here: the
        text-before-the-image prefix (or None) is returned, the caller's single LM pass runs the
        image tokens together with the question, and :meth:`_keep_image_prefix` takes the image
        prefix from that pass's keys/values (one LM pass for a first query instead of two).
        """
        self._pending_prefix = None
        if not self.cache_prefix:
            return None
        conv = self._conversation
        if conv is not None and len(ids) > len(conv[1]) and torch.equal(ids[: len(conv[1])], conv[1]):
            # A next turn of the last conversation: its keys/values already hold every earlier turn.
            return conv[0], len(conv[1])
        image_pos = (ids == self.model.image_token_id).nonzero().flatten()
        end = int(image_pos[-1]) + 1
        tpl = self.model.template
        if (
            tpl.image_end
            and end < len(ids)
            and int(ids[end]) == self.model.tokenizer.convert_tokens_to_ids(tpl.image_end)
        ):
            end += 1
        if end >= len(ids):
            return None
        prefix = ids[:end]
        if self._prefix is None or not torch.equal(self._prefix[0], prefix):
            # The text before the image (system prompt, turn header) is the same for every image:
            # its keys/values are computed once per predictor and extended with each image's tokens.
            head = prefix[: int(image_pos[0])]
            start = None
            if len(head):
                if self._text_head is None or not torch.equal(self._text_head[0], head):
                    self._text_head = (head, *self.model.prefix_cache(head, None))
                start = (self._text_head[1], self._text_head[2])
            if defer:
                self._pending_prefix = prefix
                return start
            cache, plen = self.model.prefix_cache(prefix, self._features, start=start)
            self._prefix = (prefix, cache, plen)
        return self._prefix[1], self._prefix[2]

    def _keep_image_prefix(self, conversation: tuple[Any, torch.Tensor] | None) -> None:
        """After a deferred :meth:`_prefix_for`: the image prefix's keys/values, cut from the pass's."""
        prefix, self._pending_prefix = self._pending_prefix, None
        if prefix is None or conversation is None:
            return
        cache, conv_ids = conversation
        if len(conv_ids) < len(prefix) or not torch.equal(conv_ids[: len(prefix)], prefix):
            return  # not this prefix's pass: computed on the next query instead
        self._prefix = (prefix, fork_cache(cache, keep=len(prefix)), len(prefix))

    @torch.inference_mode()
    def predict(
        self,
        instruction: str,
        history: Sequence[Any] | None = None,
        *,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        return_logits: bool = False,
    ) -> Prediction:
        """Answer ``instruction`` about the current image.

        Args:
            instruction: the user's question or request.
            history: earlier turns (alternating user/assistant, e.g. ``previous.history``) or None.
            max_new_tokens, do_sample, temperature, top_p, seed: decoding settings (greedy by default).
            return_logits: also return the float mask logits.
        """
        self._require_image()
        budget = _token_budget(max_new_tokens, self.max_new_tokens)
        turns, ids = self._prompt(instruction, history, budget)
        prefix = self._prefix_for(ids, defer=True)
        out = self.model.generate(
            [ids],
            self._features,
            max_new_tokens=budget,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            prefix_cache=prefix,
            drafts=self._drafts(),
        )
        assert out.masks is not None
        self._remember(out.sequences)
        if self.cache_prefix and out.cache is not None:
            self._keep_image_prefix(out.cache)
            self._conversation = out.cache
        return self._prediction(out.texts[0], out.masks[0], turns, return_logits)

    @torch.inference_mode()
    def predict_batch(
        self,
        instructions: Sequence[str],
        *,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        return_logits: bool = False,
    ) -> list[Prediction]:
        """Answer several independent instructions about the current image in one batched decode."""
        self._require_image()
        if not instructions:
            return []
        budget = _token_budget(max_new_tokens, self.max_new_tokens)
        prompts = [self._prompt(q, None, budget) for q in instructions]
        assert self._features is not None
        # Every prompt starts with the same system prompt + image tokens: their cached keys/values
        # are shared by the whole batch (repeated per prompt inside generate), not recomputed.
        prefix = self._prefix_for(prompts[0][1])
        if prefix is not None and any(len(ids) <= prefix[1] for _, ids in prompts):
            prefix = None
        out = self.model.generate(
            [ids for _, ids in prompts],
            self._features.select([0] * len(prompts)),
            max_new_tokens=budget,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            prefix_cache=prefix,
            drafts=self._drafts(),
        )
        assert out.masks is not None
        self._remember(out.sequences)
        return [
            self._prediction(text, masks, turns, return_logits)
            for text, masks, (turns, _) in zip(out.texts, out.masks, prompts, strict=True)
        ]

    @staticmethod
    @torch.inference_mode()
    def predict_many(
        predictors: Sequence[ReasonSegPredictor],
        instructions: Sequence[str],
        *,
        max_new_tokens: int | None = None,
        return_logits: bool = False,
    ) -> list[Prediction]:
        """Answer ``instructions[i]`` about the image of ``predictors[i]`` in one batched greedy decode.

        The predictors share one model and each holds an image (the same predictor may appear
        several times). Every prompt starts from its own image's cached prefix (computed first where
        missing), stacked into one batch (:func:`~reasonseg.model.lisa.stack_caches`), so questions on
        different images cost one LM pass together, as :meth:`predict_batch` does for one image. The
        answers and masks are each predictor's own :meth:`predict` ones, one turn, greedy.
        """
        if len(predictors) != len(instructions):
            raise ValueError(f"{len(predictors)} predictors for {len(instructions)} instructions")
        if not predictors:
            return []
        model = predictors[0].model
        if any(p.model is not model for p in predictors):
            raise ValueError("predict_many: the predictors must share one model")
        for p in predictors:
            p._require_image()
        budget = _token_budget(max_new_tokens, max(p.max_new_tokens for p in predictors))
        prompts = [p._prompt(q, None, budget) for p, q in zip(predictors, instructions, strict=True)]
        prefixes = [p._prefix_for(ids) for p, (_, ids) in zip(predictors, prompts, strict=True)]
        prefix = None
        if all(x is not None for x in prefixes) and len({x[1] for x in prefixes}) == 1:  # type: ignore[index]
            plen = prefixes[0][1]  # type: ignore[index]
            if all(len(ids) > plen for _, ids in prompts):
                prefix = (stack_caches([x[0] for x in prefixes]), plen)  # type: ignore[index]
        feats = [p._features for p in predictors]
        out = model.generate(
            [ids for _, ids in prompts],
            ImageFeatures.cat(feats),  # type: ignore[arg-type]
            max_new_tokens=budget,
            prefix_cache=prefix,
            drafts=_draft_pool(predictors),
        )
        assert out.masks is not None
        results = []
        for p, text, masks, seq, (turns, _) in zip(
            predictors, out.texts, out.masks, out.sequences, prompts, strict=True
        ):
            p._remember([seq])
            results.append(p._prediction(text, masks, turns, return_logits))
        return results

    def _drafts(self) -> list[list[int]] | None:
        return _draft_pool([self])

    def _remember(self, sequences: Sequence[torch.Tensor]) -> None:
        for seq in sequences:
            ids = [int(x) for x in seq]
            if ids and ids[-1] in self.model.stop_token_ids:  # only answers that ended
                self._recent = [ids, *[r for r in self._recent if r != ids][:3]]

    def _require_image(self) -> None:
        if self._features is None:
            raise RuntimeError("no image set: call set_image(image) first")

    def _prediction(
        self, text: str, masks: MaskPrediction, turns: list[Turn], return_logits: bool
    ) -> Prediction:
        assert self._image_hw is not None
        h, w = self._image_hw
        slot_tokens = [self.model.config.seg_token] + (
            [self.model.config.rej_token] if self.model.config.use_rej else []
        )
        labels = target_labels(text, slot_tokens)
        if len(labels) != len(masks.kinds):  # a slot token split by decoding: keep the kinds, drop labels
            labels = [""] * len(masks.kinds)
        keep = [i for i, k in enumerate(masks.kinds) if k == "seg"]
        logits = masks.logits[keep].float().cpu()  # [K,H,W]
        binary = logits > 0
        prob = torch.sigmoid(logits)
        area = binary.flatten(1).sum(1)
        scores = torch.where(
            area > 0,
            (prob * binary).flatten(1).sum(1) / area.clamp(min=1),
            torch.zeros_like(area, dtype=prob.dtype),
        )
        targets: list[Target] = []
        for i, (kind, label) in enumerate(zip(masks.kinds, labels, strict=True)):
            targets.append(Target(kind, label, keep.index(i) if kind == "seg" else None))
        return Prediction(
            text=text,
            masks=binary.numpy().reshape(len(keep), h, w),
            scores=scores.numpy().astype(np.float32),
            iou_predictions=masks.iou_pred[keep].float().cpu().numpy(),
            targets=targets,
            history=[*turns, Turn("assistant", text)],
            logits=logits.numpy() if return_logits else None,
        )


def _draft_pool(predictors: Sequence[ReasonSegPredictor]) -> list[list[int]] | None:
    """Answer drafts for a decode serving ``predictors`` (one model): their recent answers, distinct,
    newest first per predictor, then the model's answer templates; None when any of them decodes
    token by token (``draft_answers=False``)."""
    if not all(p.draft_answers for p in predictors):
        return None
    recent = dict.fromkeys(tuple(r) for p in predictors for r in p._recent)
    return [list(r) for r in recent] + predictors[0].model.answer_drafts()


def _as_turn(turn: Any, index: int) -> Turn:
    """``history[index]`` as a :class:`Turn`: a Turn, an object with ``role`` and ``text``, a mapping
    with ``role`` and ``content`` (or ``text``), as chat APIs write it, or a ``(role, text)`` pair."""
    try:
        if isinstance(turn, Turn):
            return turn
        if isinstance(turn, Mapping):
            text = turn["content"] if "content" in turn else turn["text"]
            return Turn(turn["role"], text)
        if isinstance(turn, (tuple, list)) and len(turn) == 2:
            return Turn(*turn)
        if hasattr(turn, "role") and hasattr(turn, "text"):
            return Turn(turn.role, turn.text)
    except KeyError as exc:
        raise ValueError(f"history[{index}]: a message needs 'role' and 'content', missing {exc}") from None
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"history[{index}]: {exc}") from None
    raise TypeError(
        f"history[{index}]: expected a Turn, a {{'role', 'content'}} mapping or a (role, text) pair, "
        f"got {type(turn).__name__}"
    )


def _token_budget(max_new_tokens: int | None, default: int) -> int:
    """``max_new_tokens``, or ``default`` when None; a ValueError below 1 (0 used to mean the default)."""
    if max_new_tokens is None:
        return default
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return max_new_tokens
