"""The built-in trained model (``models/lisa-mobile-synth``, what ``reasonseg segment`` uses by default) on
this CPU, warm: weights already in the cache and loaded, kernels warmed by one untimed query.

    .venv/bin/python bench/bench_builtin_model.py [--image examples/synth_test_scene.jpg] [--repeats 5]
        [--threads N] [--dtype auto|fp32|bf16]

Rows (median of ``--repeats`` runs each, all in this run):

* ``first query``: ``set_image`` (MobileSAM image encoder at 1024 px + the pooled LM image tokens) then
  ``predict`` (prompt prefill + greedy generation with the KV cache + mask decoding): the reference row.
* ``  of which set_image``: the encoder part of the row above.
* ``follow-up query, same image (history)``: a second instruction with the first exchange as history;
  no encoder pass, the prompt prefix's keys/values are reused.
* ``new query, same image``: the second instruction alone (no history): the question, the answer
  (checked against the predictor's answer drafts) and one mask decode.

Timings depend on the other jobs sharing the cores; the ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

DEFAULT_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "synth_test_scene.jpg"
FIRST = "What in this image can be eaten? Please output segmentation mask."
FOLLOW_UP = "Which object here grows in hot tropical places? Please output segmentation mask."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory or preset (default: the built-in model)")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--first", default=FIRST, help="the first instruction")
    ap.add_argument("--follow-up", default=FOLLOW_UP, help="the follow-up instruction")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="as the CLI's --dtype (default auto)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from reasonseg.data.transforms import load_image
    from reasonseg.inference.predictor import ReasonSegPredictor
    from reasonseg.serving.loading import load_model

    t0 = time.perf_counter()
    loaded = load_model(args.model, progress=False, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    image = load_image(args.image)
    pred = ReasonSegPredictor(loaded.model)

    pred.set_image(image)  # warm-up (untimed): first-call allocations and kernel selection
    pred.predict(args.follow_up, history=pred.predict(args.first).history)

    encode_s: list[float] = []
    first_s: list[float] = []
    follow_s: list[float] = []
    new_s: list[float] = []
    answers: tuple[str, str] = ("", "")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        pred.set_image(image)
        t1 = time.perf_counter()
        first = pred.predict(args.first)
        t2 = time.perf_counter()
        follow = pred.predict(args.follow_up, history=first.history)
        t3 = time.perf_counter()
        pred.predict(args.follow_up)
        new_s.append(time.perf_counter() - t3)
        encode_s.append(t1 - t0)
        first_s.append(t2 - t0)
        follow_s.append(t3 - t2)
        answers = (first.text, follow.text)

    med_first = statistics.median(first_s)
    rows = [
        ("first query (set_image + predict)", med_first, "ref"),
        ("  of which set_image (image encoder)", statistics.median(encode_s), ""),
        ("follow-up query, same image (history)", statistics.median(follow_s), ""),
        ("new query, same image (no history)", statistics.median(new_s), ""),
    ]
    rows[1:] = [(name, sec, f"{sec / med_first:.2f}") for name, sec, _ in rows[1:]]

    print(
        f"{loaded.name} ({loaded.source}) on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} threads, {loaded.dtype} (--dtype {args.dtype}); "
        f"model load {load_s:.1f} s"
    )
    print(f"image {args.image} ({image.shape[1]}x{image.shape[0]}); median of {args.repeats}")
    print(f"first: {args.first!r} -> {answers[0]!r}")
    print(f"follow-up: {args.follow_up!r} -> {answers[1]!r}")
    print(f"{'step':44s} {'seconds':>8s} {'ratio':>6s}")
    for name, sec, ratio in rows:
        print(f"{name:44s} {sec:8.2f} {ratio:>6s}")


if __name__ == "__main__":
    main()
