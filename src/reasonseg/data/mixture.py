"""Mixing training sources with per-source sample rates (LISA's 9:3:3:1 by default).

:class:`MixtureDataset` is a map-style dataset of ``samples_per_epoch`` items. Item ``i`` of epoch ``e``
draws its source with probability proportional to the rates and then a record of that source, both
from a generator seeded by ``(seed, e, i)``: the result depends on nothing else, so it is the same in
every DataLoader worker and process, and a resumed run sees the same stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from reasonseg.data.samples import DataError, Sample

# LISA: semantic segmentation : referring segmentation : VQA : ReasonSeg = 9 : 3 : 3 : 1.
LISA_RATES: dict[str, float] = {"sem_seg": 9.0, "refer_seg": 3.0, "vqa": 3.0, "reason_seg": 1.0}
MAX_REDRAWS = 32  # tries to replace a record a reader skipped as malformed


def _normalise(rates: Sequence[float]) -> np.ndarray:
    r = np.asarray(rates, dtype=np.float64)
    if r.ndim != 1 or len(r) == 0:
        raise ValueError("rates must be a non-empty list of numbers")
    if not np.isfinite(r).all() or (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"rates must be finite, >= 0 and not all 0, got {list(rates)}")
    return r / r.sum()


class MixtureDataset:
    """Sources mixed by rate.

    Args:
        sources: a list of datasets, or a mapping name -> dataset. A dataset is anything indexable with
            ``len`` (a :class:`~reasonseg.data.readers.Reader`, a list of ``Sample``), or a list of such
            datasets, which then share the source's rate uniformly (LISA picks a sub-dataset of
            "sem_seg" uniformly, then an image).
        rates: one rate per source (a list in source order, or a mapping by name); default: equal,
            or LISA's 9:3:3:1 when the source names are exactly LISA's four.
        seed: the mixture seed.
        samples_per_epoch: length of one epoch (default: the total length of the sources).
    """

    def __init__(
        self,
        sources: Sequence[Any] | Mapping[str, Any],
        rates: Sequence[float] | Mapping[str, float] | None = None,
        *,
        seed: int = 0,
        samples_per_epoch: int | None = None,
    ) -> None:
        if isinstance(sources, Mapping):
            self.names = [str(k) for k in sources]
            parts = list(sources.values())
        else:
            parts = list(sources)
            self.names = [getattr(p, "source", f"source{i}") for i, p in enumerate(parts)]
        if not parts:
            raise ValueError("MixtureDataset needs at least one source")
        self.parts: list[list[Any]] = [list(p) if _is_group(p) else [p] for p in parts]
        for name, group in zip(self.names, self.parts, strict=True):
            for d in group:
                if len(d) == 0:
                    raise ValueError(f"source {name!r} has an empty dataset")
        if rates is None:
            rates = LISA_RATES if set(self.names) == set(LISA_RATES) else [1.0] * len(parts)
        if isinstance(rates, Mapping):
            missing = [n for n in self.names if n not in rates]
            if missing:
                raise ValueError(f"no rate for source(s) {missing}")
            rates = [float(rates[n]) for n in self.names]
        if len(rates) != len(parts):
            raise ValueError(f"{len(rates)} rates for {len(parts)} sources")
        self.rates = _normalise(rates)
        self.seed = int(seed)
        total = sum(len(d) for g in self.parts for d in g)
        self.samples_per_epoch = int(samples_per_epoch) if samples_per_epoch is not None else total
        if self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.epoch = 0

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``__getitem__`` (``get`` takes it explicitly)."""
        self.epoch = int(epoch)

    def _rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index, 0x6D6978])

    def source_of(self, index: int, epoch: int = 0) -> str:
        """The source item ``index`` of ``epoch`` draws from (cheap: loads nothing)."""
        return self.names[int(self._rng(index, epoch).choice(len(self.rates), p=self.rates))]

    def get(self, index: int, epoch: int = 0) -> Sample:
        """Item ``index`` of ``epoch``; a record its reader skips as malformed is replaced by another draw."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        rng = self._rng(index, epoch)
        s = int(rng.choice(len(self.rates), p=self.rates))
        group = self.parts[s]
        for _ in range(MAX_REDRAWS):
            d = group[int(rng.integers(len(group)))]
            j = int(rng.integers(len(d)))
            getter = getattr(d, "get", None)
            sample = getter(j, epoch) if callable(getter) else d[j]
            if sample is not None:  # a copy: never mutate a sample a list-backed source holds
                return dataclasses.replace(sample, meta={**sample.meta, "mixture_source": self.names[s]})
        raise DataError(self.names[s], f"{MAX_REDRAWS} draws in a row hit skipped (malformed) records")

    def __getitem__(self, index: int) -> Sample:
        return self.get(index, self.epoch)


def _is_group(p: Any) -> bool:
    """A list/tuple of datasets (rather than a list of samples)."""
    return (
        isinstance(p, (list, tuple))
        and len(p) > 0
        and all(hasattr(x, "__len__") and hasattr(x, "__getitem__") and not isinstance(x, Sample) for x in p)
    )
