"""A training step's mask decoding: one mask-decoder call for the whole micro-batch against one call per
sample (the reference), on lisa-mobile (tiny, or real sizes with random weights), measured in the same run.

    .venv/bin/python bench/bench_mask_decoding.py [--size tiny|real] [--batch-size 32] [--repeats 7]
        [--threads 2]

Printed per way: the operations a forward + backward launches (``aten::`` calls counted by the torch
profiler) and the median wall time of a forward + backward. The tiny model's arithmetic is small, so
its step time is mostly per-operation overhead, which is what bounds a GPU step (model card item 16:
an H100 at about 11% utilisation with the real model at micro-batch 32). ``--size real`` checks that a
CPU step at the real sizes, where arithmetic dominates, is not slower.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_benchmarks, format_table
from reasonseg.training.recipe import recipe_from_dict
from reasonseg.training.trainer import LisaObjective, build_model, combine_losses
from train_support import collator_for, make_samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "real"], default="tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = recipe_from_dict(
        {
            "model": {"preset": "lisa-mobile", "tiny": args.size == "tiny", "load_base_weights": False},
            "freeze": {"train_projector": True},
            "train": {"output_dir": "unused", "micro_batch_size": args.batch_size},
        }
    )
    model = build_model(recipe.model)
    recipe.freeze.apply(model)
    batch = collator_for(model)(make_samples(args.batch_size))
    weights = recipe.loss.weights()
    objective = LisaObjective(model, weights)

    def step() -> None:
        terms = objective(batch, None)
        loss = combine_losses(
            terms, weights, ce_count=float(terms.ce_count), mask_count=float(terms.mask_count)
        )["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    batched = model.decode_masks_batch
    # the reference: one decode_masks call per sample, what the forward did before
    ways = {"one call per sample (reference)": model._decode_masks_each, "batched": batched}
    ops: dict[str, int] = {}
    times: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for name, fn in ways.items():
            model.decode_masks_batch = fn  # type: ignore[method-assign]
            step()  # warm-up
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            ops[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        for _ in range(args.repeats):  # interleaved rounds
            for name, fn in ways.items():
                model.decode_masks_batch = fn  # type: ignore[method-assign]
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    finally:
        model.decode_masks_batch = batched  # type: ignore[method-assign]
    ref = next(iter(ways))
    rows = []
    for name in ways:
        med = statistics.median(times[name])
        rows.append(
            [
                name,
                ops[name],
                f"{ops[ref] / ops[name]:.2f}",
                f"{1000 * med:.0f}",
                f"{statistics.median(times[ref]) / med:.2f}",
            ]
        )
    table = format_table(
        ["mask decoding", "aten ops per step", "fewer x", "median ms per step", "faster x"], rows
    )
    print(table)
    if not args.no_append:
        note = f"{args.size} lisa-mobile, micro-batch {args.batch_size}, forward + backward, {args.threads} threads"
        print(f"appended to {append_benchmarks('Mask decoding in a training step', table, notes=[note])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
