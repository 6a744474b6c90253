"""Which floating-point type a model runs in: ``--dtype auto|fp32|bf16|fp16`` for ``segment``, ``chat``,
``serve`` and :func:`reasonseg.serving.loading.load_model`.

``auto`` picks bfloat16 where the hardware multiplies bf16 natively and float32 elsewhere:

* CUDA: bf16 where the GPU supports it (LISA's own inference default), else fp16.
* CPU: bf16 where the processor has AMX tiles or AVX-512 BF16 (Intel Sapphire Rapids and later, AMD
  Zen 4 and later). oneDNN then runs the matrix products and convolutions in bf16 with float32
  accumulation, several times faster than float32. Without those instructions bf16 is emulated and slower
  than float32, so ``auto`` keeps float32.

What bf16 changes is stated and tested (``tests/test_precision.py``). Positional encodings and the mask
upsampling stay float32, so only the network's own products are rounded. On the built-in model's 100
held-out test queries (``bench/eval_synth_queries.py --dtype bf16``) every answer text was unchanged,
the masks overlapped their float32 versions with IoU median 0.975 (min 0.887), and gIoU / cIoU moved
from 21.65 / 25.37 to 21.56 / 25.24. ``--dtype fp32`` reproduces float32 results exactly; evaluation
(``reasonseg eval``) runs in float32 unless told otherwise.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["DTYPE_NAMES", "cpu_has_fast_bf16", "dtype_name", "resolve_dtype"]

DTYPE_NAMES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""The names ``--dtype`` accepts (``auto`` is resolved per device by :func:`resolve_dtype`)."""


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16), as torch sees it."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for ``name`` (a key of :data:`DTYPE_NAMES` or a dtype) on ``device``.

    Raises:
        ValueError: an unknown name, or ``fp16`` on a CPU (no fast fp16 matmul there; use bf16).
    """
    if isinstance(name, torch.dtype):
        dtype: torch.dtype | None = name
    elif name in DTYPE_NAMES:
        dtype = DTYPE_NAMES[name]
    else:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    kind = torch.device(device).type
    if dtype is None:  # auto
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if kind == "cpu" and cpu_has_fast_bf16() else torch.float32
    if dtype == torch.float16 and kind == "cpu":
        raise ValueError("dtype fp16 is not supported on a CPU (use bf16 or fp32)")
    if dtype == torch.bfloat16 and kind == "cpu" and not cpu_has_fast_bf16():
        warnings.warn(
            "dtype bf16 on a CPU without AMX or AVX-512 BF16: it runs, but several times slower than fp32 "
            "(--dtype auto picks fp32 here)",
            stacklevel=2,
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of ``dtype`` (``torch.bfloat16`` -> ``"bf16"``); ``str(dtype)`` for others."""
    for name, value in DTYPE_NAMES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")
