"""Host cost of the training data path: what a GPU step waits for when the GPU sits idle.

    .venv/bin/python bench/bench_data_pipeline.py [--recipe recipes/experiments/synth-gpu.yaml]
        [--batch-size 32] [--batches 4] [--workers 0,2]

The recipe's datasets are read as the trainer reads them (``build_dataset``, ``SampleStream`` order) and
collated by the trainer's collator for ``lisa-mobile`` (real sizes; no weights needed). Printed:

* per sample, single-threaded: reading and decoding the sample (``get``), SAM's input transform
  (``SamTransform.prepare``: resize to 1024 px, normalise, pad) and the rest of the collation
  (tokenising, masks, stacking);
* the bytes of one collated micro-batch (what a DataLoader worker hands over and the step copies to
  the GPU);
* samples/s through a ``torch.utils.data.DataLoader`` as the trainer builds it, with each of
  ``--workers`` worker counts (ratio against the first count, measured in the same run).

Model card item 16 (models/lisa-mobile-synth/README.md) found an H100 at 7-24% utilisation at
micro-batch 32: this is the host side of that step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_benchmarks, format_table, machine_description
from reasonseg.data.transforms import SamTransform
from reasonseg.serving.cache import nbytes_of
from reasonseg.training.recipe import load_recipe
from reasonseg.training.trainer import SampleStream, _get_sample, _MicroBatches, build_collator, build_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/experiments/synth-gpu.yaml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="micro-batches per measurement")
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts to compare")
    p.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    recipe = load_recipe(args.recipe)
    from reasonseg.model import LisaModel

    model = LisaModel.from_preset("lisa-mobile", load_weights=False)
    dataset = build_dataset(recipe.data, recipe.train.seed)
    collate = build_collator(model)
    stream = SampleStream(len(dataset), recipe.train.seed, args.batch_size)

    spent = {"prepare": 0.0}
    original = SamTransform.prepare

    def timed_prepare(self: SamTransform, image: object) -> object:
        t0 = time.perf_counter()
        try:
            return original(self, image)
        finally:
            spent["prepare"] += time.perf_counter() - t0

    get_s = collate_s = 0.0
    n = 0
    size = 0
    SamTransform.prepare = timed_prepare  # type: ignore[method-assign]
    try:
        for position in range(args.batches):
            pairs = stream.batch(position)
            t0 = time.perf_counter()
            samples = [_get_sample(dataset, i, e) for i, e in pairs]
            t1 = time.perf_counter()
            batch = collate(samples)
            get_s += t1 - t0
            collate_s += time.perf_counter() - t1
            n += len(pairs)
            size = nbytes_of(batch)
    finally:
        SamTransform.prepare = original  # type: ignore[method-assign]
    ms = 1000.0 / n
    rows = [
        ["read and decode (get)", f"{get_s * ms:.1f}"],
        ["SamTransform.prepare (resize, normalise, pad)", f"{spent['prepare'] * ms:.1f}"],
        ["rest of the collation", f"{(collate_s - spent['prepare']) * ms:.1f}"],
        ["total", f"{(get_s + collate_s) * ms:.1f}"],
    ]
    cost_table = format_table(["per sample, 1 thread", "ms"], rows)
    print(machine_description())
    print(f"recipe {args.recipe}, micro-batch {args.batch_size}, {n} samples\n")
    print(cost_table)
    print(f"\none micro-batch: {size / 1e6:.0f} MB\n")

    loader_rows = []
    reference = None
    for workers in [int(w) for w in args.workers.split(",") if w]:
        ds = _MicroBatches(dataset, stream, collate, 0, 1)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=range(args.batches + 1), num_workers=workers
        )
        times = []
        t_prev = time.perf_counter()
        for k, _ in enumerate(loader):
            now = time.perf_counter()
            if k > 0:  # the first batch includes the workers' start
                times.append(now - t_prev)
            t_prev = now
        rate = args.batch_size / statistics.median(times)
        reference = reference or rate
        loader_rows.append([workers, f"{rate:.1f}", f"{rate / reference:.2f}"])
    loader_table = format_table(["DataLoader workers", "samples/s", "ratio"], loader_rows)
    print(loader_table)
    if not args.no_append:
        path = append_benchmarks(
            "Training data path, host side",
            f"{cost_table}\n\n{loader_table}",
            notes=[
                f"recipe {args.recipe}, micro-batch {args.batch_size}; one micro-batch {size / 1e6:.0f} MB"
            ],
        )
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
