"""Question/answer templates: short, long, explanatory, multi-target, named, no-target."""

from __future__ import annotations

import numpy as np
import pytest

from reasonseg.data import templates as T


def test_questions() -> None:
    assert T.question("the banana", is_sentence=False) == "Can you segment the banana in this image?"
    # Phrases with their own determiner or quantifier do not get a second one.
    assert T.question("every dish", is_sentence=False) == "Can you segment every dish in this image?"
    assert T.question("All the fruits", is_sentence=False) == "Can you segment All the fruits in this image?"
    assert (
        T.question("theatre seats", is_sentence=False) == "Can you segment the theatre seats in this image?"
    )
    assert (
        T.question("What cuts paper?", is_sentence=True)
        == "What cuts paper? Please respond with segmentation mask."
    )
    assert T.question("Why?", is_sentence=True, explain=True).endswith("segmentation mask and explain why.")
    rng = np.random.default_rng(0)
    assert len({T.question("cat", is_sentence=False, rng=rng) for _ in range(50)}) == len(T.SHORT_QUESTIONS)
    with pytest.raises(ValueError, match="empty"):
        T.question("  ", is_sentence=False)


def test_answers_hold_one_slot_per_target_in_order() -> None:
    assert T.answer(["seg"]) == "It is [SEG]."
    assert T.answer(["rej"]) == "It is [REJ]."
    assert T.answer(["seg", "seg", "seg"]) == "Sure, they are [SEG], [SEG] and [SEG]."
    assert T.answer(["seg", "rej"], names=["banana", "cat"]) == "Sure, banana: [SEG], cat: [REJ]."
    assert T.answer(["seg"], explanation="The lemon is sour.") == "It is [SEG]. The lemon is sour."
    rng = np.random.default_rng(1)
    for _ in range(30):
        kinds = list(rng.choice(["seg", "rej"], size=int(rng.integers(1, 5))))
        a = T.answer(kinds, rng=rng)
        assert T.count_slots(a) == len(kinds)
        slots = [w.strip(",.") for w in a.split() if w.strip(",.") in ("[SEG]", "[REJ]")]
        assert slots == ["[SEG]" if k == "seg" else "[REJ]" for k in kinds]
    with pytest.raises(ValueError):
        T.answer([])
    with pytest.raises(ValueError, match="names"):
        T.answer(["seg"], names=["a", "b"])


def test_seg_turns() -> None:
    turns = T.seg_turns("all the fruit", ["seg", "seg"], is_sentence=False)
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[0].text.startswith("<image>\n") and T.count_slots(turns[1].text) == 2
