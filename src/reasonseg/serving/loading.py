"""Resolving ``--model`` for ``segment``, ``chat`` and ``serve``: a preset name or a model directory, with
progress bars for fetching base weights and building the model.

``DEFAULT_MODEL`` names the built-in trained lisa-mobile (issue 7). Until its weights exist at
``BUILTIN_MODEL_DIR``, asking for it falls back to the *untrained* ``lisa-mobile`` preset with the real base
weights (MobileSAM + SmolLM2-135M-Instruct) and a loud warning: answers and masks are then meaningless, but
every command still runs end to end.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from reasonseg.model.lisa import LisaModel

__all__ = [
    "BUILTIN_MODEL_DIR",
    "DEFAULT_MODEL",
    "DTYPE_CHOICES",
    "FALLBACK_PRESET",
    "LoadedModel",
    "load_model",
]

DEFAULT_MODEL = "builtin"
"""What ``--model`` means when not given: the trained lisa-mobile shipped with the package."""

BUILTIN_MODEL_DIR = Path(
    os.environ.get("REASONSEG_BUILTIN_MODEL")
    or Path(__file__).resolve().parents[3] / "models" / "lisa-mobile-synth"
)
"""Where the built-in trained model lives: a ``save_pretrained`` directory (delta format) committed at
``models/lisa-mobile-synth/`` of the repository (issue 7); ``$REASONSEG_BUILTIN_MODEL`` overrides it."""

FALLBACK_PRESET = "lisa-mobile"

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
"""``--dtype`` values (the keys of ``reasonseg.model.precision.DTYPE_NAMES``, spelled here so that
building the CLI parser does not import torch)."""


@dataclass
class LoadedModel:
    """A loaded model and how it was found: ``name`` is shown to users and in API results."""

    model: LisaModel
    name: str
    source: str
    untrained: bool
    seconds: float
    dtype: str = "fp32"  # what the weights run in ("fp32", "bf16", "fp16"), after resolving "auto"

    @property
    def label(self) -> str:
        """The name with the precision, as results and the API report it: ``"builtin (...) [bf16]"``."""
        return f"{self.name} [{self.dtype}]"


def _progress_bar(total: int, enabled: bool) -> tqdm:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="loading model", unit="step", disable=not enabled, file=sys.stderr,
                bar_format="{desc}: {n_fmt}/{total_fmt} |{bar:20}| {elapsed} {postfix}")  # fmt: skip


def _fetch_base_weights(preset: str, say: Callable[[str], None]) -> list[Callable[[], object]]:
    """The fetch steps a preset needs before building (each returns a local path), in order."""
    from reasonseg import weights
    from reasonseg.model.config import LisaConfig

    config = LisaConfig.from_preset(preset)
    steps: list[Callable[[], object]] = []
    ck = config.sam.checkpoint
    if ck and ck in weights.REGISTRY:
        steps.append(lambda: weights.fetch(ck, progress=say))
    if config.lm.pretrained == "smollm2":
        from reasonseg.model.lm import load_smollm2

        steps.append(lambda: load_smollm2(progress=say))
    return steps


def load_model(
    spec: str | None = None, *, tiny: bool = False, progress: bool = True, dtype: str | torch.dtype = "fp32"
) -> LoadedModel:
    """Load the model named by ``spec``.

    Args:
        spec: ``None``/``"builtin"`` (the trained lisa-mobile, or the untrained fallback with a warning), a
            preset name (``reasonseg.model.config.PRESETS``: base weights real, new parts random), or a
            directory written by ``LisaModel.save_pretrained``.
        tiny: build the preset at tiny random sizes (tests and load tests of the serving machinery only);
            a ValueError with a model directory or the trained built-in model, which have fixed sizes.
        progress: show progress bars on stderr (False also hides the bars of transformers itself).

    Raises:
        KeyError: ``spec`` is neither a directory nor a known preset (the message lists the presets).
    """
    from transformers.utils import logging as hf_logging

    hide = not progress and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        return _load_model(spec, tiny=tiny, progress=progress, dtype=dtype)
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def _load_model(spec: str | None, *, tiny: bool, progress: bool, dtype: str | torch.dtype) -> LoadedModel:
    """:func:`load_model` with transformers' progress bars already set as asked."""
    from reasonseg.model.config import PRESETS
    from reasonseg.model.lisa import LisaModel
    from reasonseg.model.precision import dtype_name, resolve_dtype

    torch_dtype = resolve_dtype(dtype, "cpu")  # a bad name fails before anything is loaded

    t0 = time.perf_counter()
    spec = spec or DEFAULT_MODEL
    untrained = False
    if spec == DEFAULT_MODEL:
        if (BUILTIN_MODEL_DIR / "config.json").is_file():
            directory: Path | None = BUILTIN_MODEL_DIR
        else:
            warnings.warn(
                f"the built-in trained model is not available ({BUILTIN_MODEL_DIR} has no config.json); "
                f"falling back to the UNTRAINED '{FALLBACK_PRESET}' preset with real base weights "
                "(MobileSAM + SmolLM2-135M-Instruct): its answers and masks are not meaningful",
                stacklevel=3,  # the caller of load_model
            )
            print(f"warning: using the untrained '{FALLBACK_PRESET}' preset (no trained built-in model yet)",
                  file=sys.stderr)  # fmt: skip
            directory, spec, untrained = None, FALLBACK_PRESET, True
    elif Path(spec).is_dir():
        directory = Path(spec)
    elif spec in PRESETS:
        directory = None
        untrained = True
    else:
        raise KeyError(
            f"--model {spec!r} is neither a model directory nor a preset; presets: {', '.join(PRESETS)}"
        )

    if directory is not None:
        if tiny:
            raise ValueError(
                f"--tiny applies to a preset --model (e.g. --model lisa-mobile --tiny), not to {directory}"
            )
        bar = _progress_bar(1, progress)
        bar.set_postfix_str(f"reading {directory}")
        model = LisaModel.from_pretrained(
            directory, progress=lambda msg: bar.set_postfix_str(msg[:60]), dtype=torch_dtype
        )
        bar.update(1)
        bar.close()
        name = f"builtin ({directory.name})" if directory == BUILTIN_MODEL_DIR else directory.name
        return LoadedModel(
            model, name, str(directory), False, time.perf_counter() - t0, dtype_name(torch_dtype)
        )

    bar = None

    def say(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg[:70])

    steps = [] if tiny else _fetch_base_weights(spec, say)
    bar = _progress_bar(len(steps) + 1, progress)
    for i, step in enumerate(steps):
        bar.set_postfix_str(f"fetching base weights ({i + 1}/{len(steps)})")
        step()
        bar.update(1)
    bar.set_postfix_str("building " + (f"tiny {spec}" if tiny else spec))
    model = LisaModel.from_preset(spec, tiny=tiny, dtype=torch_dtype).eval()
    bar.update(1)
    bar.close()
    name = f"{spec} (tiny, random)" if tiny else spec + (" (untrained head)" if untrained else "")
    return LoadedModel(
        model, name, f"preset:{spec}", untrained, time.perf_counter() - t0, dtype_name(torch_dtype)
    )
