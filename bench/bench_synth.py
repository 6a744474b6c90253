"""Speed of ``reasonseg synth`` on this machine: scenes/s and queries/s, 1 vs 2 worker processes.

    .venv/bin/python bench/bench_synth.py [--n 200] [--seed 0]

Each run writes a fresh world (512 px longest side, JPEG q92, ReasonSeg + gRefCOCO) into a temporary
folder. The reference is the single-process run measured in the same invocation; the table gives each
run's rate and its ratio to it. The runs must write byte-identical worlds, which is checked. Other jobs
sharing the CPU slow every row alike, so compare ratios rather than absolute rates across machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from reasonseg.data.synth import WorldConfig, generate_world


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="scenes per run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = WorldConfig(n=args.n, seed=args.seed)
    # Warm-up: load the font, glyphs and background photos once (every worker does this too).
    with tempfile.TemporaryDirectory() as d:
        generate_world(WorldConfig(n=2, seed=args.seed), d)
    rows = []
    digests = set()
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            summary = generate_world(cfg, d, workers=workers)
            dt = time.perf_counter() - t0
            digests.add(digest(Path(d)))
            refs = sum(summary.refs.values())
            rows.append(
                (f"{workers} process{'es' if workers > 1 else ''}", dt, args.n / dt, (args.n + refs) / dt)
            )
    if len(digests) != 1:
        raise SystemExit("1 and 2 worker processes wrote different worlds")
    ref = rows[0][2]
    print(f"reasonseg synth: {args.n} scenes, seed {args.seed}, {platform.machine()}, {os.cpu_count()} cores")
    print(
        f"world: {json.dumps({k: summary.splits[k] for k in summary.splits})}, {sum(summary.refs.values())} gRefCOCO "
        f"refs + {args.n} ReasonSeg queries, polygon IoU mean {summary.polygon_iou_mean:.4f} min {summary.polygon_iou_min:.4f}"
    )
    print(f"{'run':14s} {'seconds':>8s} {'scenes/s':>9s} {'queries/s':>10s} {'vs 1 proc':>10s}")
    for name, dt, sps, qps in rows:
        print(f"{name:14s} {dt:8.1f} {sps:9.2f} {qps:10.2f} {sps / ref:9.2f}x")
    print("byte-identical output across runs: yes")


if __name__ == "__main__":
    main()
