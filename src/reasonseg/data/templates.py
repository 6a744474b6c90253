"""Question and answer templates (short, long, explanatory, multi-target with ``[SEG]``/``[REJ]``).

The templates here produce plain text turns; the conversation template of the model being trained
(``reasonseg.data.conversation``: ``llava_v1`` for LISA, ``chatml`` for SmolLM2) wraps them later.
The phrasings follow the style of LISA's published templates (REFERENCE.md section 3) and GSVA's
multi-target answers (section 4). Every function takes an explicit ``numpy.random.Generator`` so a
sample is a pure function of (seed, index); ``rng=None`` picks the first template (evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reasonseg.data.conversation import IMAGE_TOKEN, REJ_TOKEN, SEG_TOKEN, Turn
from reasonseg.data.samples import TargetKind

__all__ = [
    "IMAGE_TOKEN",
    "REJ_TOKEN",
    "SEG_TOKEN",
    "answer",
    "count_slots",
    "join_names",
    "named_turns",
    "question",
    "seg_turns",
]

SHORT_QUESTIONS: tuple[str, ...] = (
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTIONS: tuple[str, ...] = (
    "{sent} Please respond with segmentation mask.",
    "{sent} Please output segmentation mask.",
)
EXPLAIN_QUESTIONS: tuple[str, ...] = (
    "{sent} Please output segmentation mask and explain why.",
    "{sent} Please output segmentation mask and give the reason.",
)
SINGLE_ANSWERS: tuple[str, ...] = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)
NAMED_QUESTIONS: tuple[str, ...] = (
    "Can you segment {names} in this image?",
    "Please segment {names} in this image.",
    "What are {names} in this image? Please respond with segmentation masks.",
)
MULTI_PREFIXES: tuple[str, ...] = ("Sure, they are", "They are", "Sure, the segmentation results are")
REJECT_ANSWERS: tuple[str, ...] = (
    "It is [REJ].",
    "Sure, it is [REJ].",
)
VQA_IMAGE_FIRST = "{image}\n{text}"
# Phrases that bring their own determiner: a template's "the {class_name}" drops its "the" for them.
_DETERMINERS = tuple(
    f"{w} "
    for w in ("the", "a", "an", "all", "every", "each", "any", "some", "this", "that", "these", "those")
)


def _pick(options: Sequence[str], rng: np.random.Generator | None) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def question(
    text: str,
    *,
    is_sentence: bool,
    explain: bool = False,
    rng: np.random.Generator | None = None,
) -> str:
    """The user text (without the image token) for a query.

    Short phrases ("the banana") go into a short template; sentences ("What could cut this paper?")
    are kept verbatim with a "please output a mask" suffix; ``explain`` asks for a reason as well.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty query text")
    if explain:
        return _pick(EXPLAIN_QUESTIONS, rng).format(sent=text)
    if is_sentence:
        return _pick(LONG_QUESTIONS, rng).format(sent=text)
    template = _pick(SHORT_QUESTIONS, rng)
    if text.lower().startswith(_DETERMINERS):  # "segment the {class_name}" with "the cup", "every dish"
        template = template.replace("the {class_name}", "{class_name}")
    return template.format(class_name=text)


def answer(
    target_kinds: Sequence[TargetKind],
    *,
    names: Sequence[str] | None = None,
    explanation: str | None = None,
    rng: np.random.Generator | None = None,
) -> str:
    """The assistant text holding one ``[SEG]``/``[REJ]`` slot per target, in order.

    - one target: "Sure, it is [SEG]." / "It is [REJ]."
    - several targets: "Sure, they are [SEG], [SEG] and [SEG]."
    - ``names`` (GSVA multi-expression style): "Sure, banana: [SEG], cat: [REJ]."
    - ``explanation`` is appended as a second sentence.
    """
    kinds = list(target_kinds)
    if not kinds:
        raise ValueError("an answer needs at least one target slot")
    for k in kinds:
        if k not in ("seg", "rej"):
            raise ValueError(f"target kind must be 'seg' or 'rej', got {k!r}")
    slots = [SEG_TOKEN if k == "seg" else REJ_TOKEN for k in kinds]
    if names is not None:
        if len(names) != len(slots):
            raise ValueError(f"{len(names)} names for {len(slots)} targets")
        body = "Sure, " + ", ".join(f"{n}: {s}" for n, s in zip(names, slots, strict=True)) + "."
    elif len(slots) == 1:
        body = _pick(SINGLE_ANSWERS if kinds[0] == "seg" else REJECT_ANSWERS, rng).replace("[SEG]", slots[0])
    else:
        listed = ", ".join(slots[:-1]) + " and " + slots[-1]
        body = f"{_pick(MULTI_PREFIXES, rng)} {listed}."
    if explanation:
        body = f"{body} {explanation.strip()}"
    return body


def seg_turns(
    text: str,
    target_kinds: Sequence[TargetKind],
    *,
    is_sentence: bool,
    explanation: str | None = None,
    names: Sequence[str] | None = None,
    rng: np.random.Generator | None = None,
    fixed_answer: bool = False,
) -> list[Turn]:
    """A two-turn segmentation conversation: user (image token + question), assistant (answer).

    ``fixed_answer``: always the first answer template ("It is [SEG]." / "It is [REJ]." / "Sure, they
    are ..."), whatever ``rng``; questions still vary. A small model trained briefly learns the slot's
    meaning faster when the context before the slot does not change.
    """
    q = question(text, is_sentence=is_sentence, explain=explanation is not None, rng=rng)
    a = answer(target_kinds, names=names, explanation=explanation, rng=None if fixed_answer else rng)
    return [Turn("user", f"{IMAGE_TOKEN}\n{q}"), Turn("assistant", a)]


def join_names(names: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def named_turns(
    names: Sequence[str], target_kinds: Sequence[TargetKind], *, rng: np.random.Generator | None = None
) -> list[Turn]:
    """GSVA multi-expression conversation: one question naming every expression, an answer with one
    named slot each ("Sure, the cat: [SEG], the dog: [REJ].")."""
    if not names or len(names) != len(target_kinds):
        raise ValueError(f"need one name per target, got {len(names)} names for {len(target_kinds)} targets")
    q = _pick(NAMED_QUESTIONS, rng).format(names=join_names(names))
    return [
        Turn("user", f"{IMAGE_TOKEN}\n{q}"),
        Turn("assistant", answer(target_kinds, names=names, rng=rng)),
    ]


def count_slots(text: str) -> int:
    """Number of ``[SEG]`` plus ``[REJ]`` slots in an answer."""
    return text.count(SEG_TOKEN) + text.count(REJ_TOKEN)
