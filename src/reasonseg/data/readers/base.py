"""Shared reader machinery: indexed access, deterministic per-record randomness, opt-in skip mode."""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from reasonseg.data.samples import DataError, Sample

ReadMode = Literal["train", "eval"]
# A polygon may overshoot the image border by this many pixels (annotation tools round outwards).
POLYGON_TOLERANCE_PX = 1.0
# Image files are found by these suffixes, compared case-insensitively (``X.JPG`` is a ``.jpg``).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
REPORT_FIRST = 3  # skipped records a warning lists before "... and N more"


class SkippedRecordsWarning(UserWarning):
    """Records were skipped as malformed (``skip_malformed=True``); the message counts and lists them."""


@dataclass(frozen=True)
class SkippedRecord:
    """A record skipped in skip mode: its index, the file at fault and the reason."""

    index: int
    path: str
    reason: str


class Reader(ABC):
    """Indexed dataset of :class:`Sample`.

    ``mode="train"`` draws query/answer templates with a generator seeded by ``(seed, epoch, index)``, so a
    sample is a pure function of those three numbers, in any process or DataLoader worker; ``mode="eval"``
    always takes the first query text and the first template.

    Malformed records raise :class:`DataError` naming the file and the reason. A reader whose records sit
    in one annotation file checks their structure when it opens it (:meth:`check_records`), so a bad
    record fails at start-up; what needs the image (masks, sizes) is checked when the record is loaded.
    With ``skip_malformed=True`` malformed records are skipped instead, counted in :attr:`skipped`, and
    :meth:`report` says which and why; a :class:`SkippedRecordsWarning` tells the user once at start-up
    (records found by :meth:`check_records`) and once at the first record skipped while loading (per
    process: each DataLoader worker has its own copy of the reader).
    """

    source: str = "unknown"

    def __init__(self, *, mode: ReadMode = "train", seed: int = 0, skip_malformed: bool = False) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.mode: ReadMode = mode
        self.seed = int(seed)
        self.skip_malformed = bool(skip_malformed)
        self.skipped: dict[int, SkippedRecord] = {}
        self._warned_on_load = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _load(self, index: int, rng: np.random.Generator | None) -> Sample:
        """Build sample ``index``; raise :class:`DataError` when its record is malformed."""

    def _check(self, index: int) -> None:
        """Cheap start-up check of record ``index`` (structure, keys, types; no image decoding): raise
        :class:`DataError` when it is malformed. Readers that call :meth:`check_records` override it."""
        return None  # nothing to check without an annotation file

    def check_records(self) -> None:
        """Run :meth:`_check` on every record; the end of ``__init__`` of a reader with an annotation file.

        A malformed record raises :class:`DataError`; in skip mode it is skipped from the start instead,
        and one :class:`SkippedRecordsWarning` names the reader, the count and the first reasons.
        """
        for i in range(len(self)):
            try:
                self._check(i)
            except DataError as exc:
                if not self.skip_malformed:
                    raise
                self.skipped[i] = SkippedRecord(i, exc.path, exc.reason)
        if self.skipped and len(self.skipped) == len(self):
            raise DataError(
                self.source, f"all {len(self)} records are malformed\n{self.report(REPORT_FIRST)}"
            )
        if self.skipped:
            warnings.warn(self.report(REPORT_FIRST), SkippedRecordsWarning, stacklevel=3)

    def rng_for(self, index: int, epoch: int = 0) -> np.random.Generator | None:
        """The per-record generator (None in eval mode: first text, first template)."""
        if self.mode == "eval":
            return None
        return np.random.default_rng([self.seed, epoch, index])

    def get(self, index: int, epoch: int = 0) -> Sample | None:
        """Sample ``index``, or None if it is malformed and skip mode is on."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.source}: index {index} out of range [0, {len(self)})")
        if index in self.skipped:
            return None
        try:
            return self._load(index, self.rng_for(index, epoch))
        except DataError as exc:
            if not self.skip_malformed:
                raise
            self.skipped[index] = SkippedRecord(index, exc.path, exc.reason)
            if not self._warned_on_load:
                self._warned_on_load = True
                warnings.warn(
                    f"{self.source}: skipped malformed record #{index} ({exc}); skip_malformed is on, so "
                    "further ones are skipped without a warning (reader.report() lists them)",
                    SkippedRecordsWarning,
                    stacklevel=2,
                )
            return None

    def __getitem__(self, index: int) -> Sample:
        """Sample ``index``; in skip mode a malformed record is replaced by the next good one."""
        n = len(self)
        for step in range(n):
            sample = self.get((index + step) % n)
            if sample is not None:
                return sample
        raise DataError(self.source, f"all {n} records are malformed")

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            sample = self.get(i)
            if sample is not None:
                yield sample

    def report(self, limit: int | None = None) -> str:
        """One line per skipped record (the first ``limit`` of them), after a count."""
        records = sorted(self.skipped.values(), key=lambda r: r.index)
        lines = [f"{self.source}: skipped {len(records)} of {len(self)} records as malformed"]
        lines += [f"  #{r.index} {r.path}: {r.reason}" for r in records[:limit]]
        if limit is not None and len(records) > limit:
            lines.append(f"  ... and {len(records) - limit} more (reader.report() lists them all)")
        return "\n".join(lines)


def read_json(path: str | Path, *, cp1252_fallback: bool = False) -> Any:
    """Parse a UTF-8 JSON file (a byte-order mark is allowed); DataError naming the file for a missing
    file, broken JSON, or bytes that are not UTF-8 (with their offset).

    ``cp1252_fallback``: decode a non-UTF-8 file as Windows-1252 instead, with a warning naming it. Some
    ReasonSeg annotations are cp1252 and LISA's reader falls back the same way; other formats are UTF-8.
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(p, "is a directory, expected a JSON file")
    if not p.is_file():
        raise DataError(p, "file is missing")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        if not cp1252_fallback:
            raise DataError(p, f"not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}") from exc
        warnings.warn(
            f"{p}: not UTF-8 (byte offset {exc.start}), read as cp1252", UnicodeWarning, stacklevel=2
        )
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as exc2:
            raise DataError(p, f"neither UTF-8 nor cp1252 (byte offset {exc2.start})") from exc2
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(p, f"broken JSON ({exc})") from exc


def files_with_suffix(folder: Path, suffixes: Iterable[str]) -> list[Path]:
    """The files in ``folder`` whose suffix is one of ``suffixes`` (lower case), compared
    case-insensitively so that ``X.JPG`` counts as ``.jpg``; sorted, [] when the folder is missing."""
    wanted = tuple(suffixes)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in wanted and p.is_file())


def images_by_stem(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Image files of ``folder`` by stem (:func:`files_with_suffix`); for one stem with several suffixes,
    the one listed first in ``suffixes`` wins."""
    found: dict[str, Path] = {}
    for p in sorted(files_with_suffix(folder, suffixes), key=lambda p: suffixes.index(p.suffix.lower())):
        found.setdefault(p.stem, p)
    return found


def require(obj: Any, key: str, typ: type | tuple[type, ...], path: str | Path) -> Any:
    """``obj[key]`` checked for presence and type; DataError naming the file and field otherwise."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(path, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, typ):
        names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise DataError(path, f"field {key!r} is a {type(value).__name__}, expected {names}")
    return value


def check_polygon(points: Any, hw: tuple[int, int], path: str | Path, what: str) -> np.ndarray:
    """Validate a polygon given as [[x, y], ...] (or flat [x0, y0, x1, y1, ...]) -> float [P,2].

    Raises DataError for fewer than 3 points, non-numbers, or points outside the image by more than
    ``POLYGON_TOLERANCE_PX``.
    """
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"{what}: polygon points are not numbers") from exc
    if pts.ndim == 1 and pts.size % 2 == 0:
        pts = pts.reshape(-1, 2)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
        raise DataError(path, f"{what}: a polygon needs >= 3 [x, y] points, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise DataError(path, f"{what}: polygon has non-finite coordinates")
    h, w = hw
    t = POLYGON_TOLERANCE_PX
    bad = (pts[:, 0] < -t) | (pts[:, 0] > w + t) | (pts[:, 1] < -t) | (pts[:, 1] > h + t)
    if bad.any():
        x, y = pts[np.argmax(bad)]
        raise DataError(path, f"{what}: polygon point ({x:.1f}, {y:.1f}) is outside the {w}x{h} image")
    return pts


def rasterize_polygon(points: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Fill one polygon (float [P,2] x,y in pixels) including its outline -> bool [H,W].

    Like LISA's reader (``np.int32`` points, ``cv2.polylines`` then ``cv2.fillPoly``): coordinates are
    truncated to integers and every pixel on or inside the outline is set.
    """
    h, w = hw
    canvas = Image.new("L", (w, h), 0)
    xy = [(int(x), int(y)) for x, y in np.trunc(points)]
    ImageDraw.Draw(canvas).polygon(xy, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def paint_polygons(
    polygons: Sequence[tuple[np.ndarray, int]], hw: tuple[int, int], *, larger_first: bool = True
) -> np.ndarray:
    """Paint (polygon, value) pairs into a uint8 [H,W] label map, larger polygons first so smaller ones
    drawn later (e.g. an ignore region inside a target) stay visible, as LISA does for ReasonSeg."""
    rasters = [(rasterize_polygon(p, hw), v) for p, v in polygons]
    if larger_first:
        rasters.sort(key=lambda rv: -int(rv[0].sum()))
    out = np.zeros(hw, dtype=np.uint8)
    for r, v in rasters:
        out[r] = v
    return out
