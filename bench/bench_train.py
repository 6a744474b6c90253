"""Training throughput (samples/s) of lisa-mobile on this CPU, tiny and real sizes, encoder cache off and
warm; plus the wall time of the tiny overfit run (4 examples to mask IoU >= 0.9).

    .venv/bin/python bench/bench_train.py [--sizes tiny,real] [--steps 4] [--threads 1]

Rows (each a fresh Trainer in one process; the ratio column is against the first row of the same size,
measured in the same run):

* ``no cache``: the frozen encoders run on every micro-batch (the reference);
* ``cache warm``: their outputs come from the disk cache (filled by an untimed cold pass first).

"real" is lisa-mobile at its real sizes (MobileSAM ViT-T at 1024 px, SmolLM2-135M) with random weights,
so no download is needed; throughput does not depend on the weight values. The first optimiser step of
each run is warm-up and left out of the median. ``overfit`` times ``tests/test_train_overfit.py``'s recipe
(150 steps, batch 4) and reports the IoU it reaches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_description
from reasonseg.training.recipe import recipe_from_dict
from reasonseg.training.trainer import Trainer, build_model
from train_support import collator_for, make_samples


def _recipe(tiny: bool, out: Path, steps: int, batch: int, cache: Path | None, threads: int) -> dict:
    return {
        "model": {"preset": "lisa-mobile", "tiny": tiny, "load_base_weights": False},
        "freeze": {"train_projector": True},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "total_steps": steps},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": batch,
            "checkpoint_every": 10_000,
            "progress_bar": False,
            "num_threads": threads,
            "encoder_cache": None if cache is None else str(cache),
        },
    }


def throughput(tiny: bool, steps: int, batch: int, threads: int, tmp: Path) -> list[tuple[str, float, float]]:
    """[(row name, median samples/s, build seconds)] for cache off and cache warm."""
    size = 32 if tiny else 256
    samples = make_samples(8, size=size)
    rows = []
    cache = tmp / f"cache-{'tiny' if tiny else 'real'}"
    for name, use_cache, cold_pass in (("no cache", False, False), ("cache warm", True, True)):
        t0 = time.perf_counter()
        recipe = recipe_from_dict(_recipe(tiny, tmp / f"run-{name}-{tiny}", steps, batch, None, threads))
        if use_cache:
            recipe = recipe.replace(train={"encoder_cache": str(cache)})
        model = build_model(recipe.model)
        build_s = time.perf_counter() - t0
        trainer = Trainer(recipe, model=model, dataset=samples, collate=collator_for(model))
        if cold_pass:  # fill the cache, untimed
            with torch.no_grad():
                for i in range(0, len(samples), batch):
                    trainer._frozen_features(trainer.collate(samples[i : i + batch]))
        hist = trainer.fit().history
        rates = [h.samples_per_s for h in hist[1:]] or [hist[0].samples_per_s]
        rows.append((name, statistics.median(rates), build_s))
    return rows


def overfit(threads: int, tmp: Path) -> tuple[float, float, float]:
    """(build seconds, fit seconds, mean IoU) of the overfit test's recipe."""
    from test_train_overfit import OVERFIT_RECIPE, mask_ious

    t0 = time.perf_counter()
    recipe = recipe_from_dict(OVERFIT_RECIPE).replace(
        train={
            "output_dir": str(tmp / "overfit"),
            "encoder_cache": str(tmp / "overfit-cache"),
            "num_threads": threads,
        }
    )
    model = build_model(recipe.model)
    samples = make_samples(4)
    collate = collator_for(model)
    trainer = Trainer(recipe, model=model, dataset=samples, collate=collate)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - t1
    ious = mask_ious(model, collate(samples))
    return build_s, fit_s, sum(ious) / len(ious)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,real")
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps per run (the first is warm-up)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids oversubscription when shared)"
    )
    ap.add_argument("--no-overfit", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# bench_train: {machine_description()}, torch threads {args.threads}, batch {args.batch}")
    table = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for size in args.sizes.split(","):
            rows = throughput(size == "tiny", args.steps, args.batch, args.threads, tmp)
            ref = rows[0][1]
            for name, rate, build_s in rows:
                table.append(
                    (f"lisa-mobile {size}", name, f"{rate:.2f}", f"{rate / ref:.2f}x", f"{build_s:.1f}")
                )
        print(format_table(["model", "run", "samples/s", "vs no cache", "build s"], table))
        if not args.no_overfit:
            build_s, fit_s, iou = overfit(args.threads, tmp)
            print()
            print(
                format_table(
                    ["overfit (tiny, 4 examples, 150 steps)", "build s", "train s", "mean IoU"],
                    [("lisa-mobile tiny", f"{build_s:.1f}", f"{fit_s:.1f}", f"{iou:.3f}")],
                )
            )


if __name__ == "__main__":
    main()
