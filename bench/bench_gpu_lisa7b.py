"""A LISA-7B-architecture model with random weights (CLIP ViT-L/14-224 + LLaMA-7B + SAM ViT-H, from the
``lisa-7b-v1`` preset) on a GPU: generation with our KV cache against the uncached loop of the original
code, teacher-forced evaluation throughput, peak memory per memory option, and SAM ViT-H ours vs Meta's.

    python bench/bench_gpu_lisa7b.py --device cuda                        # the real sizes (needs ~40 GB)
    python bench/bench_gpu_lisa7b.py --tiny --device cpu --repeats 1      # tiny shapes, any CPU (the test)

Rows (all contenders of a table timed in turn inside one loop, medians):

* ``generate N tokens, no KV cache``: every new token re-runs the whole sequence (prompt with 256 image
  tokens + the answer so far), as LISA's original ``evaluate``/``generate`` loop does; the reference.
* ``generate N tokens, KV cache, eager steps``: :meth:`LisaModel.generate` with ``static_cache=False``
  (a ``DynamicCache``; stop tokens disabled: exactly N tokens).
* ``generate N tokens, KV cache + CUDA graph`` (CUDA only): ``static_cache=True``, generate's default on
  a GPU: a preallocated cache and each one-token step replayed from a CUDA graph. The token sequences
  are compared, and each is checked against one uncached teacher-forced pass (how far the top logit
  leads the emitted token's; bf16 random weights give near-ties, so a flipped tie shows up there).
* ``teacher-forced eval, batch B``: :meth:`LisaModel.forward` on B conversations with one ``[SEG]``
  each, images encoded (CLIP + SAM) and masks decoded, as in the papers' evaluations; samples/s.
* per memory option (``--memory bf16,8bit,4bit``): the GPU memory the built model holds (weights
  GiB), the peak while it encodes one image and generates N tokens with the cache, and that latency. 8-bit/4-bit need CUDA and bitsandbytes; where
  they cannot run, the row says why.
* SAM ViT-H encoder ours vs Meta's segment-anything: ``bench/bench_sam_encoder.py --model vit_h`` run
  in this process (its own table and BENCHMARKS.md section; ``--no-sam`` skips it).

Weights are random (the timings do not depend on them); the vocabulary is LLaMA's 32000 plus the added
tokens. On a CPU the memory column is the process's peak resident size (one figure for the run).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from common import (  # noqa: E402
    append_benchmarks,
    format_table,
    median,
    synchronizer,
    time_interleaved,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUESTION = "Can you segment the animal that is sleeping in this image?"
ANSWER = "Sure, it is [SEG]."
LLAMA_VOCAB = 32000
BF16_GAP = 0.25  # the most a path's emitted token may trail the greedy choice in bf16 (seen: <= 0.0625)


def build_random_lisa7b(
    tiny: bool, device: torch.device, dtype: torch.dtype, quantization: str | None = None
) -> Any:
    """The ``lisa-7b-v1`` layout with random weights, built on ``device`` and cast to ``dtype``."""
    from reasonseg.model import LisaConfig, LisaModel

    config = LisaConfig.from_preset("lisa-7b-v1", tiny=tiny)
    config.tokenizer = "tiny"  # offline; the ids it gives are all inside the 32000-row vocabulary
    config.lm.pretrained = None
    config.vision.clip_pretrained = None
    config.sam.checkpoint = None
    if not tiny:
        config.lm.hf_config["vocab_size"] = LLAMA_VOCAB + 4
        config.lm.vocab_resolved = True
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place on the GPU (a 7B fp32 init on CPU takes minutes)
        model = LisaModel.from_config(config)
    return model.apply_memory_options(dtype=dtype, quantization=quantization, device=device).eval()


def _inputs(model: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(generation prompt [T], teacher-forced ids [B,T'], pixels [B,3,L,L]) for ``model``."""
    from reasonseg.data.conversation import Turn, encode_conversation

    tpl, n = model.config.template, model.num_image_tokens
    prompt = encode_conversation(
        model.tokenizer, tpl, [Turn("user", QUESTION)], n, add_generation_prompt=True
    ).input_ids
    full = encode_conversation(model.tokenizer, tpl, [Turn("user", QUESTION), Turn("assistant", ANSWER)], n)
    side = model.sam.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, side, side, generator=g).to(model.device, model.dtype)
    return prompt, full.input_ids[None].expand(batch, -1).contiguous(), pixels


def _peak(device: torch.device) -> Callable[[], float]:
    """Reset the peak-memory counter; the returned function reads the peak since then (GiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return lambda: torch.cuda.max_memory_allocated(device) / 2**30
    return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def speed(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[str, list[str], bool]:
    """Generation (KV cache vs the uncached loop) and teacher-forced throughput: (table, notes, ok), ok
    when the paths' tokens agree (fp32) or each trails the greedy choice by at most BF16_GAP (else)."""
    sync = synchronizer(device)
    batches = [int(b) for b in args.batches.split(",") if b]
    size = "tiny shapes" if args.tiny else "full size"
    read_peak = _peak(device)
    model = build_random_lisa7b(args.tiny, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    prompt, _, pixels = _inputs(model, 1)
    with torch.inference_mode():
        feats = model.encode_images(pixels)
    model.stop_token_ids = []  # exactly new_tokens tokens
    outs: dict[str, list[int]] = {}

    # The contenders: the original's uncached loop, our cache with eager steps, and (on a GPU) our
    # cache with each step replayed from a CUDA graph (generate's default there).
    paths = {"nocache": dict(use_cache=False), "cache": dict(static_cache=False)}
    if device.type == "cuda":
        paths["graph"] = dict(static_cache=True)

    def gen(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                out = model.generate(
                    [prompt], feats, max_new_tokens=args.new_tokens, decode_masks=False, **paths[name]
                )
            outs[name] = out.sequences[0]

        return run

    n = args.new_tokens
    times = time_interleaved({k: gen(k) for k in paths}, repeats=args.repeats, warmup=1, sync=sync)
    same = all(v.tolist() == outs["nocache"].tolist() for v in outs.values()) and len(outs["cache"]) == n
    gaps = {k: _greedy_gap(model, prompt, feats, seq) for k, seq in outs.items()}
    # In fp32 the paths must agree token for token; in bf16 a flipped near-tie is allowed, a token far
    # from the greedy choice is not.
    ok = same if dtype == torch.float32 else max(gaps.values()) <= BF16_GAP
    t_nc = median(times["nocache"])
    labels = {
        "nocache": f"generate {n} tokens, no KV cache (original loop)",
        "cache": f"generate {n} tokens, KV cache, eager steps",
        "graph": f"generate {n} tokens, KV cache + CUDA graph (ours, GPU default)",
    }
    gen_rows = [
        [labels[k], f"{median(ts) * 1000:.1f}", "", f"{t_nc / median(ts):.2f}x"] for k, ts in times.items()
    ]
    eval_fns = {}
    for b in batches:
        _, ids_b, px_b = _inputs(model, b)

        def run(ids_b: torch.Tensor = ids_b, px_b: torch.Tensor = px_b) -> None:
            with torch.inference_mode():
                model(input_ids=ids_b, pixels=px_b)

        eval_fns[f"teacher-forced eval, batch {b}"] = run
    eval_times = time_interleaved(eval_fns, repeats=args.repeats, warmup=1, sync=sync)
    for (name, ts), b in zip(eval_times.items(), batches, strict=True):
        sec = median(ts)
        gen_rows.append([name, f"{sec * 1000:.1f}", f"{b / sec:.2f}", ""])
    peak_main = read_peak()
    table = format_table(["run", "median ms", "samples/s", "speed-up"], gen_rows)
    notes = [
        f"{size}: random-weight lisa-7b-v1 layout, {n_params / 1e6:.1f} M parameters, {args.dtype}, "
        f"{device}; prompt {len(prompt)} tokens ({model.num_image_tokens} image tokens); median of "
        f"{args.repeats} interleaved rounds after 1 warm-up",
        f"cached and uncached generation gave the same {n} tokens: {same}",
        "largest lead of the top logit over the emitted token, one uncached teacher-forced pass over "
        "each path's answer (0 = the token is that pass's greedy choice; bf16 random weights leave "
        "near-ties): " + ", ".join(f"{k} {v:.3g}" for k, v in gaps.items()),
        f"peak memory of this part: {peak_main:.2f} GiB"
        + (" (GPU, allocated)" if device.type == "cuda" else " (process peak RSS)"),
    ]
    return table, notes, ok


def _greedy_gap(model: Any, prompt: torch.Tensor, feats: Any, answer: torch.Tensor) -> float:
    """max over the answer's steps of (top logit - logit of the emitted token) under one uncached
    forward pass over prompt + answer."""
    from reasonseg.model.mllm import positions_from_mask

    dev = model.device
    full = torch.cat([prompt.to(dev), answer.to(dev)])[None]
    mask = torch.ones_like(full)
    with torch.inference_mode():
        hidden = model.mllm.run_decoder(
            model.mllm.embed(full, feats.vision_tokens), mask, positions_from_mask(mask)
        )
        t = len(prompt)
        logits = model.mllm.lm_logits(hidden[0, t - 1 : full.shape[1] - 1]).float()
        chosen = logits.gather(-1, answer.to(dev)[:, None]).squeeze(-1)
        return float((logits.max(-1).values - chosen).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--tiny", action="store_true", help="tiny random shapes (seconds on a CPU)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,16", help="teacher-forced eval batch sizes")
    ap.add_argument("--memory", default="bf16,8bit,4bit", help="memory options to report (comma list)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sam", action="store_true", help="skip the SAM ViT-H encoder comparison")
    ap.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--benchmarks-file", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    sync = synchronizer(device)
    size = "tiny shapes" if args.tiny else "full size"

    table, notes, ok = speed(args, device, dtype)
    print(table)
    print("\n".join(notes))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    n = args.new_tokens

    # ---- memory options: each built afresh; resident weights after the build, then the peak of
    # encode + cached generation (the build's own transient peak, e.g. a random float32 init before
    # the cast, is left out: loading a real checkpoint does not go through it)
    mem_rows = []
    for option in [m for m in args.memory.split(",") if m]:
        quant = option if option in ("8bit", "4bit") else None
        opt_dtype = DTYPES.get(option, dtype)
        try:
            m = build_random_lisa7b(args.tiny, device, opt_dtype, quantization=quant)
        except (RuntimeError, ValueError, ImportError) as err:
            mem_rows.append([option, "-", "-", "-", f"not run: {str(err).splitlines()[0]}"])
            continue
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        read_peak = _peak(device)
        p, _, px = _inputs(m, 1)
        m.stop_token_ids = []

        def run_opt(m: Any = m, p: torch.Tensor = p, px: torch.Tensor = px) -> None:
            with torch.inference_mode():
                m.generate([p], m.encode_images(px), max_new_tokens=n)

        try:
            ts = time_interleaved({option: run_opt}, repeats=args.repeats, warmup=1, sync=sync)[option]
        except Exception as err:  # e.g. an op without a bf16 CPU kernel, a bitsandbytes kernel error
            first = str(err).splitlines()[0] if str(err) else ""
            mem_rows.append([option, "-", "-", "-", f"failed: {type(err).__name__}: {first}"])
        else:
            weights = f"{resident:.2f}" if resident is not None else "-"
            mem_rows.append([option, weights, f"{read_peak():.2f}", f"{median(ts) * 1000:.1f}", "ok"])
        del m, run_opt, p, px  # run_opt holds the model through its defaults
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    mem_table = format_table(
        ["memory option", "weights GiB", "peak GiB", f"encode + generate {n} ms", "status"], mem_rows
    )
    print(mem_table)

    if not args.no_append:
        append_benchmarks(
            f"LISA-7B architecture, random weights ({size}, {device.type})",
            table + "\n\n" + mem_table,
            notes,
            device=device,
            path=args.benchmarks_file,
        )

    if not args.no_sam:
        import bench_sam_encoder

        sam_args = ["--model", "vit_h", "--device", args.device, "--repeats", str(args.repeats)]
        sam_args += ["--dtype", args.dtype] + (["--tiny"] if args.tiny else [])
        sam_args += ["--no-append"] if args.no_append else []
        if args.benchmarks_file is not None:
            sam_args += ["--benchmarks-file", str(args.benchmarks_file)]
        bench_sam_encoder.main(sam_args)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
