"""Mixture sampler: observed source frequencies, determinism, DataLoader workers, skip-mode redraws."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from reasonseg.data.mixture import LISA_RATES, MixtureDataset
from reasonseg.data.samples import Sample, Turn


def tiny(source: str, n: int) -> list[Sample]:
    return [
        Sample(
            np.zeros((4, 4, 3), np.uint8),
            f"{source}/{i}",
            [Turn("user", "<image>\nq"), Turn("assistant", "It is [SEG].")],
            np.ones((1, 4, 4), np.uint8),
            "semantic",
            source,
        )
        for i in range(n)
    ]


def lisa_sources() -> dict[str, object]:
    return {
        "sem_seg": [tiny("ade20k", 5), tiny("cocostuff", 7)],  # a group: sub-datasets share the rate
        "refer_seg": tiny("refcoco", 3),
        "vqa": tiny("llava", 4),
        "reason_seg": tiny("reason_seg", 2),
    }


def test_observed_frequencies_match_lisa_rates_within_2_percent() -> None:
    mix = MixtureDataset(lisa_sources(), seed=0, samples_per_epoch=10_000)  # default rates: 9:3:3:1
    counts = Counter(mix.get(i).meta["mixture_source"] for i in range(10_000))
    total = sum(LISA_RATES.values())
    for name, rate in LISA_RATES.items():
        assert abs(counts[name] / 10_000 - rate / total) < 0.02, (name, counts[name])
    assert Counter(mix.source_of(i) for i in range(10_000)) == counts  # the cheap path agrees
    sub = Counter(mix.get(i).source for i in range(10_000) if mix.source_of(i) == "sem_seg")
    assert abs(sub["ade20k"] / (sub["ade20k"] + sub["cocostuff"]) - 0.5) < 0.03


def test_custom_rates_and_validation() -> None:
    mix = MixtureDataset(
        {"a": tiny("a", 2), "b": tiny("b", 2)}, rates=[1, 3], seed=1, samples_per_epoch=10_000
    )
    freq = Counter(mix.source_of(i) for i in range(10_000))
    assert abs(freq["a"] / 10_000 - 0.25) < 0.02
    with pytest.raises(ValueError, match="rates"):
        MixtureDataset([tiny("a", 2)], rates=[-1])
    with pytest.raises(ValueError, match="no rate"):
        MixtureDataset({"x": tiny("a", 2)}, rates={"y": 1.0})
    with pytest.raises(ValueError, match="empty"):
        MixtureDataset({"x": []})


def test_deterministic_by_seed_and_epoch_and_never_mutates_sources() -> None:
    src = lisa_sources()
    a = MixtureDataset(src, seed=7, samples_per_epoch=200)
    b = MixtureDataset(lisa_sources(), seed=7, samples_per_epoch=200)
    ids = [a.get(i).image_id for i in range(200)]
    assert ids == [b.get(i).image_id for i in range(200)]
    assert ids != [a.get(i, epoch=1).image_id for i in range(200)]
    assert ids != [MixtureDataset(src, seed=8, samples_per_epoch=200).get(i).image_id for i in range(200)]
    assert all("mixture_source" not in s.meta for s in src["refer_seg"])  # type: ignore[union-attr]


def _ids(batch: list[Sample]) -> list[str]:
    return [s.image_id for s in batch]


def test_same_stream_with_dataloader_workers() -> None:
    mix = MixtureDataset(lisa_sources(), seed=3, samples_per_epoch=64)
    plain = [mix[i].image_id for i in range(64)]
    loader = torch.utils.data.DataLoader(mix, batch_size=8, num_workers=2, collate_fn=_ids)
    assert [i for batch in loader for i in batch] == plain


class Flaky:
    """A reader in skip mode whose odd records are malformed."""

    def __init__(self) -> None:
        self.data = tiny("flaky", 10)

    def __len__(self) -> int:
        return len(self.data)

    def get(self, index: int, epoch: int = 0) -> Sample | None:
        return None if index % 2 else self.data[index]


def test_skipped_records_are_redrawn() -> None:
    mix = MixtureDataset([Flaky()], seed=0, samples_per_epoch=100)
    assert all(int(mix[i].image_id.split("/")[1]) % 2 == 0 for i in range(100))
