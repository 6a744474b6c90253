"""``reasonseg eval``: evaluate a model on a benchmark split and write the reports.

    reasonseg eval --model lisa-mobile --data reasonseg:/data/ReasonSeg:val --mode teacher-forced --out runs/rs-val
    accelerate launch --num_processes 2 -m reasonseg.cli eval --model DIR --data grefcoco:/data/grefcoco:val \\
        --mode generative --out runs/gref-val           # GPUs; on a CPU-only machine:
    torchrun --nproc_per_node 2 -m reasonseg.cli eval ...   # (gloo; or accelerate launch --multi_gpu)

A rerun with the same ``--out`` resumes: finished samples are skipped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reasonseg.evaluation.segmenter import MODES, EvalMode

if TYPE_CHECKING:
    from reasonseg.model import LisaModel

__all__ = ["EvalCommand", "load_model", "run_eval_command"]


@dataclass(frozen=True)
class EvalCommand:
    """Arguments of ``reasonseg eval`` (validated on construction).

    Attributes:
        model: a model directory (``save_pretrained`` output) or a preset name (``lisa-mobile``, ...).
        data: a data spec (see :class:`reasonseg.evaluation.protocols.DataSpec`).
        mode: "teacher-forced" or "generative".
        out: run directory.
        batch_size: items per model call, per process.
        limit: evaluate only the first N items.
        worst_k: overlays of the K worst samples.
        image_root: image folder for refer/gRefCOCO data (default: found next to the data).
        cache_dir: image-encoder disk cache (None: no cache).
        max_new_tokens: generation budget (generative mode).
        tiny: build a preset at tiny random sizes (tests, smoke runs).
        dtype: the model's precision, ``fp32`` (default: results as published), ``bf16``, ``fp16`` or
            ``auto`` (:func:`reasonseg.model.precision.resolve_dtype` on the process's device).
    """

    model: str
    data: str
    mode: EvalMode
    out: Path
    batch_size: int = 1
    limit: int | None = None
    worst_k: int = 8
    image_root: Path | None = None
    cache_dir: Path | None = None
    max_new_tokens: int = 64
    tiny: bool = False
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        from reasonseg.serving.loading import DTYPE_CHOICES

        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype: must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"--mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit: must be >= 1, got {self.limit}")
        if self.worst_k < 0:
            raise ValueError(f"--worst-k: must be >= 0, got {self.worst_k}")


def load_model(spec: str, *, tiny: bool = False) -> LisaModel:
    """A model directory (holding ``config.json``) or a preset name -> ``LisaModel``."""
    from reasonseg.model import LisaModel

    path = Path(spec)
    if path.is_dir():
        if tiny:
            raise ValueError("--tiny applies to presets, not to a model directory")
        return LisaModel.from_pretrained(path)
    if path.suffix or "/" in spec:
        raise FileNotFoundError(f"--model {spec}: no such model directory")
    if tiny:
        import torch

        # Random weights: seed them, so every process of a multi-process run builds the same model.
        torch.manual_seed(0)
    return LisaModel.from_preset(spec, tiny=tiny)


def run_eval_command(cmd: EvalCommand) -> int:
    """Build the protocol and the model, run (or resume) the evaluation, write the reports."""
    from reasonseg.evaluation.fingerprint import files_digest, model_files
    from reasonseg.evaluation.lisa_segmenter import LisaSegmenter
    from reasonseg.evaluation.protocols import build_protocol
    from reasonseg.evaluation.report import write_reports
    from reasonseg.evaluation.runner import RunConfig, process_state, run_evaluation

    state = process_state()
    protocol = build_protocol(cmd.data, limit=cmd.limit, image_root=cmd.image_root)
    t0 = time.perf_counter()
    model = load_model(cmd.model, tiny=cmd.tiny).to(state.device)
    if cmd.dtype != "fp32":
        from reasonseg.model.precision import resolve_dtype

        model.apply_memory_options(dtype=resolve_dtype(cmd.dtype, state.device))
    load_s = time.perf_counter() - t0
    model_id = (
        str(Path(cmd.model).resolve())
        if Path(cmd.model).is_dir()
        else cmd.model + (" (tiny)" if cmd.tiny else "")
    )
    segmenter = LisaSegmenter(
        model, name=model_id, cache_dir=cmd.cache_dir, max_new_tokens=cmd.max_new_tokens
    )
    config = RunConfig(out_dir=cmd.out, mode=cmd.mode, batch_size=cmd.batch_size)
    manifest = {
        "protocol": protocol.name,
        "data": str(protocol.spec),
        "data_sha256": files_digest(protocol.sources),
        "model": model_id,
    }
    if Path(cmd.model).is_dir():  # a preset's weights are fixed; a folder's may be rewritten in place
        manifest["model_sha256"] = files_digest(model_files(cmd.model))
    if cmd.dtype != "fp32":  # (absent for fp32, so runs written before this option still resume)
        manifest["dtype"] = str(model.dtype).removeprefix("torch.")
    if cmd.mode == "generative":
        manifest["max_new_tokens"] = cmd.max_new_tokens
    result = run_evaluation(
        segmenter, protocol.items, protocol.rules, config, groups=protocol.groups, manifest=manifest
    )
    if state.is_main_process:
        result.summary["run"] = {
            "computed_this_run": result.computed,
            "resumed": result.extra["resumed"],
            "num_processes": result.extra["num_processes"],
            "batch_size": cmd.batch_size,
            "model_load_s": round(load_s, 3),
            "main_process_model_s": round(result.seconds, 3),
            # this process's items over its model time (scoring and I/O excluded)
            "main_process_samples_per_s": round(result.extra["computed_here"] / result.seconds, 4)
            if result.seconds > 0
            else None,
        }
        paths = write_reports(result, protocol.items, cmd.out, worst_k=cmd.worst_k)
        print((paths["summary_md"]).read_text(), end="")
        print(f"reports in {cmd.out}", file=sys.stderr)
    return 0
