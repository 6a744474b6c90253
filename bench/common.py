"""Small helpers shared by the ``bench/`` scripts: interleaved timing with medians, the machine's
measured matmul rate, a Markdown table, and appending a dated section to ``BENCHMARKS.md``.

    from common import append_benchmarks, format_table, time_interleaved
    times = time_interleaved({"ours": f, "reference": g}, repeats=5)   # {name: [seconds, ...]}

Timings on a shared machine drift with the other jobs; calling the contenders in turn inside one loop
(``time_interleaved``) and comparing medians keeps the ratio fair even when absolute times move.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "REPO_ROOT",
    "append_benchmarks",
    "format_table",
    "machine_description",
    "matmul_gflops",
    "median",
    "synchronizer",
    "time_interleaved",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("median of no timings")
    return float(statistics.median(xs))


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, called in turn ``repeats`` times after ``warmup`` rounds.

    Returns {name: [seconds per call]}; take :func:`median` of each for the figure.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_gflops(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5
) -> float:
    """Measured dense matmul rate (GFLOP/s, 2*n^3 per product, median of ``repeats``) on this machine now."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    times = time_interleaved({"mm": lambda: a @ b}, repeats=repeats, warmup=1, sync=synchronizer(dev))["mm"]
    return 2 * n**3 / median(times) / 1e9


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device | str = "cpu") -> str:
    """One line: CPU model and cores, torch threads, torch version, and the GPU when ``device`` is CUDA."""
    dev = torch.device(device)
    parts = [
        f"{_cpu_model()}, {os.cpu_count()} cores",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"Python {platform.python_version()}",
    ]
    if dev.type == "cuda" and torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name(dev))
    return "; ".join(parts)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def append_benchmarks(
    title: str,
    table: str,
    notes: Sequence[str] = (),
    device: torch.device | str = "cpu",
    command: str | None = None,
    path: Path | None = None,
) -> Path:
    """Append a dated section (machine, command, table, notes) to ``BENCHMARKS.md`` at the repo root."""
    path = path or REPO_ROOT / "BENCHMARKS.md"
    if command is None:
        command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        f"## {title} ({stamp})",
        "",
        f"- machine: {machine_description(device)}",
        f"- command: `{command}`",
        "",
        table,
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write("# Benchmarks\n\nAppended by the scripts in `bench/`; each section is one run.\n\n")
        f.write("\n".join(section) + "\n")
    return path
