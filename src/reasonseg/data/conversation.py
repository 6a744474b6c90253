"""Conversation templates and their tokenisation with label masking.

A conversation is a list of :class:`Turn` (``role`` is ``"user"`` or ``"assistant"``). A
:class:`ConversationTemplate` renders it to the exact string the language model was trained on;
:func:`encode_conversation` tokenises that string, marks every token outside the assistant answers
with the ignore label ``-100``, and expands the single ``<image>`` placeholder into
``num_image_tokens`` copies of the image token id (the multimodal LM replaces those positions by the
projected image features, locating them by id).

Two templates ship:

* ``"llava_v1"`` (LISA, GSVA): ``"<system> USER: <q> ASSISTANT: <a></s>USER: ..."``, the image wrapped
  as ``<im_start><image><im_end>`` as in LISA's official ``use_mm_start_end`` layout.
* ``"chatml"`` (SmolLM2-Instruct): ``"<|im_start|>user\\n<q><|im_end|>\\n<|im_start|>assistant\\n..."``.

    >>> t = get_template("llava_v1")
    >>> t.render([Turn("user", "<image>\\nWhat is this?")], add_generation_prompt=True)[-10:]
    'ASSISTANT:'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "REJ_TOKEN",
    "SEG_TOKEN",
    "TEMPLATES",
    "ConversationTemplate",
    "EncodedConversation",
    "Turn",
    "encode_conversation",
    "get_template",
]

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
REJ_TOKEN = "[REJ]"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
IGNORE_INDEX = -100

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: Role
    text: str

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"Turn.role must be 'user' or 'assistant', got {self.role!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"Turn.text must be a str, got {type(self.text).__name__}")


@dataclass(frozen=True)
class ConversationTemplate:
    """How turns become one string.

    A rendered conversation is ``prefix + system + system_suffix`` followed by, per turn,
    ``role_prefix[role] + text + role_suffix[role]``. With ``add_generation_prompt`` the last
    ``role_prefix["assistant"]`` is appended (rstripped by ``generation_prompt_rstrip`` characters)
    so the model continues with the answer. ``stop`` is the string that ends an answer; it is part
    of the training target.
    """

    name: str
    system: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    stop: str
    generation_prompt: str
    image_start: str = ""
    image_end: str = ""
    extra_tokens: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.assistant_suffix.startswith(self.stop):
            raise ValueError(
                f"template {self.name!r}: assistant_suffix must start with the stop string {self.stop!r}"
            )

    def _user_text(self, text: str) -> str:
        if self.image_start or self.image_end:
            text = text.replace(IMAGE_TOKEN, self.image_start + IMAGE_TOKEN + self.image_end)
        return text

    def render_spans(
        self, turns: Sequence[Turn], add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """Render ``turns``; also return the ``[start, end)`` character spans of the training targets
        (each assistant answer and its ``stop`` string)."""
        _check_turns(turns)
        parts = [self.system_prefix + self.system + self.system_suffix]
        pos = len(parts[0])
        spans: list[tuple[int, int]] = []
        for turn in turns:
            if turn.role == "user":
                piece = self.user_prefix + self._user_text(turn.text) + self.user_suffix
                parts.append(piece)
                pos += len(piece)
            else:
                parts.append(self.assistant_prefix)
                pos += len(self.assistant_prefix)
                answer = turn.text + self.stop
                spans.append((pos, pos + len(answer)))
                tail = answer + self.assistant_suffix[len(self.stop) :]
                parts.append(tail)
                pos += len(tail)
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts), spans

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
        """The string the LM sees for ``turns``."""
        return self.render_spans(turns, add_generation_prompt)[0]

    def special_tokens(self) -> list[str]:
        """Tokens the tokenizer must know as single units for this template."""
        out = [t for t in (self.image_start, self.image_end, self.stop) if t]
        return out + [t for t in self.extra_tokens if t not in out]


def _check_turns(turns: Sequence[Turn]) -> None:
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ValueError(
                f"turn {i} has role {turn.role!r}; turns must alternate user/assistant, user first"
            )


_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, ConversationTemplate] = {
    # LLaVA v1 "vicuna_v1" format (sep " ", sep2 "</s>"), used by LISA and GSVA.
    "llava_v1": ConversationTemplate(
        name="llava_v1",
        system=_LLAVA_SYSTEM,
        system_prefix="",
        system_suffix=" ",
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT: ",
        assistant_suffix="</s>",
        stop="</s>",
        generation_prompt="ASSISTANT:",
        image_start=IM_START_TOKEN,
        image_end=IM_END_TOKEN,
    ),
    # ChatML as written by SmolLM2-Instruct's chat template.
    "chatml": ConversationTemplate(
        name="chatml",
        system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
        stop="<|im_end|>",
        generation_prompt="<|im_start|>assistant\n",
        extra_tokens=("<|im_start|>", "<|im_end|>"),
    ),
}


def get_template(name: str | ConversationTemplate) -> ConversationTemplate:
    """A template by name (``"llava_v1"``, ``"chatml"``), or the template itself."""
    if isinstance(name, ConversationTemplate):
        return name
    if name not in TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


@dataclass
class EncodedConversation:
    """A tokenised conversation.

    Attributes:
        input_ids: LongTensor [T]; the image placeholder already expanded to ``num_image_tokens``
            copies of the image token id.
        labels: LongTensor [T]; ``-100`` everywhere except the assistant answers (and their stop token).
        text: the rendered string before expansion.
        num_image_tokens: how many image positions ``input_ids`` holds (0 when there is no image).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    text: str
    num_image_tokens: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise KeyError(
            f"token {token!r} is not in the tokenizer's vocabulary; add it as a special token first"
        )
    return int(tid)


def encode_conversation(
    tokenizer: Any,
    template: str | ConversationTemplate,
    turns: Sequence[Turn],
    num_image_tokens: int,
    max_length: int | None = None,
    *,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    """Tokenise ``turns`` with label masking and image-placeholder expansion.

    The placeholder ``<image>`` may appear at most once; when ``num_image_tokens > 0`` and no turn
    holds it, ``"<image>\\n"`` is put in front of the first user turn (LLaVA's convention).

    Args:
        tokenizer: a Hugging Face *fast* tokenizer that knows ``<image>`` and the template's special
            tokens as single tokens (``LisaModel.tokenizer`` does).
        template: a template or its name.
        turns: alternating user/assistant turns, user first (any objects with ``role`` and ``text``).
        num_image_tokens: copies of the image token id the placeholder expands to (0: text only).
        max_length: truncate to this many tokens (after expansion); the image is never cut.
        add_generation_prompt: end with the assistant prefix (for generation; the last turn is then a user turn).

    Raises:
        ValueError: the placeholder appears more than once, or truncation would cut the image.
    """
    tpl = get_template(template)
    turns = [
        t if isinstance(t, Turn) else Turn(t.role, t.text) for t in turns
    ]  # accept any (role, text) turn
    n_placeholders = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if n_placeholders > 1:
        raise ValueError(f"a conversation may hold one {IMAGE_TOKEN} placeholder, found {n_placeholders}")
    if num_image_tokens > 0 and n_placeholders == 0:
        turns[0] = Turn(turns[0].role, IMAGE_TOKEN + "\n" + turns[0].text)
    if num_image_tokens == 0 and n_placeholders == 1:
        raise ValueError(f"the conversation holds {IMAGE_TOKEN} but num_image_tokens is 0")
    text, spans = tpl.render_spans(turns, add_generation_prompt)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    for i, (a, b) in enumerate(offsets):
        # A token is a target when its characters overlap an answer span: a byte-level "ĠSure" starts
        # on the space the assistant prefix ends with, and is still the answer's first token.
        if b > a and any(a < e and b > s for s, e in spans):
            labels[i] = ids[i]

    out_ids: list[int] = []
    out_labels: list[int] = []
    if num_image_tokens > 0:
        image_id = _token_id(tokenizer, IMAGE_TOKEN)
        found = ids.count(image_id)
        if found != 1:
            raise ValueError(
                f"{IMAGE_TOKEN} tokenised to {found} image tokens (id {image_id}), expected 1: "
                "is it registered as a special token?"
            )
        for tid, lab in zip(ids, labels, strict=True):
            if tid == image_id:
                out_ids.extend([image_id] * num_image_tokens)
                out_labels.extend([IGNORE_INDEX] * num_image_tokens)
            else:
                out_ids.append(tid)
                out_labels.append(lab)
    else:
        out_ids, out_labels = ids, labels
    if max_length is not None and len(out_ids) > max_length:
        if (
            num_image_tokens > 0
            and out_ids[:max_length].count(out_ids[out_ids.index(image_id)]) != num_image_tokens
        ):
            raise ValueError(f"max_length={max_length} would cut the {num_image_tokens} image tokens")
        out_ids, out_labels = out_ids[:max_length], out_labels[:max_length]
    return EncodedConversation(
        input_ids=torch.tensor(out_ids, dtype=torch.long),
        labels=torch.tensor(out_labels, dtype=torch.long),
        text=text,
        num_image_tokens=num_image_tokens,
    )
