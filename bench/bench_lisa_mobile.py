"""lisa-mobile (real SmolLM2-135M-Instruct + MobileSAM weights, untrained LISA head) end to end on a real
photo on this CPU: load times, image encoding, first and follow-up query latency, and the KV cache's
effect on generation.

    .venv/bin/python bench/bench_lisa_mobile.py [--threads 2] [--new-tokens 32] [--skip-convert]

Rows (each timed in this run):

* ``load (first: GGUF -> safetensors)``: a fresh ``$REASONSEG_HOME`` holding only the two registry files
  (copied from the real cache, so nothing is downloaded): SmolLM2 is dequantised from GGUF and written
  once; this is the reference of the load rows.
* ``load (later: cached safetensors)``: the same home again: no conversion.
* ``set_image``: one image-encoder pass (MobileSAM TinyViT, 1024x1024) + the pooled LM image tokens.
* ``first query``: prompt prefix (system + image tokens) + generation; ``follow-up query``: a second
  instruction with the first exchange as history, and ``another query``: a second instruction without
  history (prefix keys/values reused, no encoder pass). The first query is the reference of these rows.
* ``generate, no KV cache``: every new token re-runs the whole sequence (what the official LISA code
  does), the reference of ``generate, KV cache`` (same prompt, same number of tokens; the two token
  sequences are checked to be equal).

Timings depend on the other jobs sharing the cores; the ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PHOTO = "coffee"
QUESTIONS = (
    "Can you segment the cup in this image?",
    "What could I drink from? Please output segmentation mask.",
)


def _time_load_in_fresh_home(src_home: Path) -> tuple[float, float]:
    """(first load incl. GGUF conversion, later load) in a subprocess each, with a fresh home."""
    from reasonseg.weights import REGISTRY

    code = (
        "import time; t=time.perf_counter(); from reasonseg.model import LisaModel; "
        "LisaModel.from_preset('lisa-mobile'); print(time.perf_counter()-t)"
    )
    with tempfile.TemporaryDirectory(prefix="reasonseg-bench-home-") as tmp:
        home = Path(tmp)
        for name in ("mobile_sam", "smollm2_135m_instruct_gguf"):
            art = REGISTRY[name]
            (home / name).mkdir()
            shutil.copyfile(src_home / name / art.filename, home / name / art.filename)
        env = {**os.environ, "REASONSEG_HOME": str(home), "REASONSEG_OFFLINE": "1"}
        times = []
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            times.append(float(out.stdout.strip().splitlines()[-1]))
        assert (home / "smollm2_135m_instruct" / "model.safetensors").is_file()
    return times[0], times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-convert", action="store_true", help="skip the two fresh-home load rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import skimage.data

    from reasonseg.data.conversation import Turn, encode_conversation
    from reasonseg.inference.predictor import ReasonSegPredictor
    from reasonseg.model import LisaModel
    from reasonseg.model.lm import load_smollm2
    from reasonseg.weights import cache_dir, fetch

    fetch("mobile_sam")
    fetch("smollm2_135m_instruct_gguf")
    load_smollm2()  # make sure the real cache is complete before timing in-process loads
    rows: list[tuple[str, float, str]] = []

    if not args.skip_convert:
        first, later = _time_load_in_fresh_home(cache_dir())
        rows += [
            ("load (first: GGUF -> safetensors)", first, "ref"),
            ("load (later: cached safetensors)", later, f"{later / first:.2f}"),
        ]

    t0 = time.perf_counter()
    model = LisaModel.from_preset("lisa-mobile")
    in_process_load = time.perf_counter() - t0
    rows.append(("load (in this process, cached)", in_process_load, ""))

    image = getattr(skimage.data, PHOTO)()
    pred = ReasonSegPredictor(model, max_new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    pred.set_image(image)
    rows.append((f"set_image ({image.shape[1]}x{image.shape[0]} photo)", time.perf_counter() - t0, ""))

    t0 = time.perf_counter()
    first = pred.predict(QUESTIONS[0])
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    follow = pred.predict(QUESTIONS[1], history=first.history)
    t_follow = time.perf_counter() - t0
    t0 = time.perf_counter()
    other = pred.predict(QUESTIONS[1])
    t_other = time.perf_counter() - t0
    rows += [
        ("first query", t_first, "ref"),
        ("follow-up query (with history)", t_follow, f"{t_follow / t_first:.2f}"),
        ("another query (no history)", t_other, f"{t_other / t_first:.2f}"),
    ]

    # KV cache vs the no-cache loop, same prompt, exactly new_tokens tokens (stop tokens disabled).
    ids = encode_conversation(
        model.tokenizer,
        "chatml",
        [Turn("user", QUESTIONS[0])],
        model.num_image_tokens,
        add_generation_prompt=True,
    ).input_ids
    feats = pred._features
    stops = model.stop_token_ids
    model.stop_token_ids = []
    try:
        t0 = time.perf_counter()
        slow = model.generate([ids], feats, max_new_tokens=args.new_tokens, use_cache=False)
        t_slow = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = model.generate([ids], feats, max_new_tokens=args.new_tokens)
        t_fast = time.perf_counter() - t0
    finally:
        model.stop_token_ids = stops
    same = slow.sequences[0].tolist() == fast.sequences[0].tolist()
    rows += [
        (f"generate {args.new_tokens} tokens, no KV cache", t_slow, "ref"),
        (f"generate {args.new_tokens} tokens, KV cache", t_fast, f"{t_fast / t_slow:.2f}"),
    ]

    print(
        f"lisa-mobile on {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads"
    )
    print(
        f"prompt {len(ids)} tokens ({model.num_image_tokens} image tokens); same tokens cached/uncached: {same}"
    )
    print(f"first answer: {first.text!r}\nfollow-up answer: {follow.text!r}\nanother: {other.text!r}")
    lengths = [len(model.tokenizer(p.text).input_ids) for p in (first, follow, other)]
    print(f"answer lengths (tokens): {lengths}")
    print(f"{'step':48s} {'seconds':>9s} {'ratio':>7s}")
    for name, sec, ratio in rows:
        print(f"{name:48s} {sec:9.2f} {ratio:>7s}")
    if not same:
        raise SystemExit("cached and uncached generation disagree")


if __name__ == "__main__":
    main()
