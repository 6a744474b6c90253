"""The LM's linear layers on a CPU without autograd: faster paths than ``F.linear`` for inference.

``F.linear`` in bf16 goes through oneDNN's general matrix product, which reorders the weight into its
blocked layout on every call; in float32 it goes to MKL's ``sgemm``. Cheaper paths, all without
autograd:

* **bf16, one row** (a decoding step): ``torch.mv`` has a bf16 matrix-vector kernel that does not
  reorder. On SmolLM2-135M's 210 products of one step (2 threads, interleaved A/B in one process) a
  step took 57.5 ms instead of 62.1 ms, and 77 instead of 86 ms in a second, more loaded run.
* **several rows** (a prompt, a drafted answer), bf16 where oneDNN multiplies bf16 (AMX or AVX-512),
  and float32: the weight is reordered once, kept beside the layer while the weight is unchanged, and
  multiplied by oneDNN's ``_linear_pointwise``, as ``torch.compile`` does on a CPU. bf16, SmolLM2-135M's
  210 products alone, 1 thread on an Intel Xeon: 112 rows 128 -> 86 ms, 24 rows 77 -> 66 ms; in the
  built-in model (``bench/bench_commits.py``) ``predict`` went from 212.3 to 185.2 ms with 2 threads.
  Float32 on an AVX2-only AMD EPYC (2 threads): a [24,576]x[576,1536] product 0.99 -> 0.73 ms,
  [88,576]x[576,1536] 3.00 -> 2.38 ms, and the 49,152-word head on 6 rows 41 -> 9.7 ms.
* **float32, one row, a big weight** (at least :data:`ONE_ROW_PACK_MIN` values: the LM head): the
  packed product as well (the head on one row: 11.6 -> 6.2 ms on that EPYC); smaller one-row products
  keep ``F.linear``, as fast there as ``torch.mv`` and faster than the packed kernel (576x576: 44 against
  87 us).

The packed copy costs a second copy of the weights (about 270 MB in bf16 and 540 MB in float32 for
SmolLM2-135M with its tied head), so it is on only for LMs of at most :data:`PACK_MAX_PARAMS` linear
weights (SmolLM2 sizes; not a 7B LM, whose copy would be 13 GB or more).

A GPU, autograd and ``torch.compile`` keep ``F.linear``. Results: bf16 products equal ``F.linear``'s
bit for bit (the same oneDNN kernel), ``torch.mv`` up to the rounding of the bf16 output (both
accumulate in float32); float32 packed products differ from MKL's only by the order of the float32
sums (relative differences of about 1e-6).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reasonseg.model.sam.common import memoised

__all__ = ["ONE_ROW_PACK_MIN", "PACK_MAX_PARAMS", "CpuLinear", "plain_linears", "use_cpu_linears"]

PACK_MAX_PARAMS = 2_000_000_000
""":func:`use_cpu_linears` turns packing on (several-row products, and float32 single rows of a big
weight) only when the module's linear weights hold at most this many values (the packed copy holds as
many again)."""

ONE_ROW_PACK_MIN = 1 << 22
"""A float32 product of one row uses the packed weight only when the weight holds at least this many
values (an LM head over a vocabulary; not SmolLM2's 576x1536 layers, where ``F.linear`` is faster)."""

_CAN_PACK_FP32 = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
_CAN_PACK = _CAN_PACK_FP32 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
"""Whether bf16 products can be packed (oneDNN multiplies bf16 on this CPU)."""


class CpuLinear(nn.Linear):
    """``nn.Linear`` with the CPU inference paths above. Same parameters and state-dict names;
    swapped in by class (:func:`use_cpu_linears`), so PEFT and ``isinstance`` checks still see an
    ``nn.Linear``. ``pack`` says whether the packed paths are on (set by
    :func:`use_cpu_linears`); the packed copy is dropped by a cast or a move, and never pickled or
    deep-copied."""

    pack: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [..., out_features], as ``nn.Linear``."""
        w = self.weight
        if (
            x.dtype == w.dtype
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            one_row = x.numel() == x.shape[-1] == w.shape[1]
            if x.dtype == torch.bfloat16:
                if one_row:
                    y = torch.mv(w, x.reshape(-1))
                    if self.bias is not None:
                        y = y + self.bias
                    return y.reshape(*x.shape[:-1], w.shape[0])
                if self.pack and _CAN_PACK:
                    return self._packed_product(x)
            elif (
                x.dtype == torch.float32
                and self.pack
                and _CAN_PACK_FP32
                and (not one_row or w.numel() >= ONE_ROW_PACK_MIN)
            ):
                return self._packed_product(x)
        return F.linear(x, w, self.bias)

    def _packed_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` with the weight reordered once into oneDNN's layout (kept beside the
        layer while the weight is unchanged)."""
        w = self.weight
        packed = memoised(self, "_packed", w, lambda: torch.ops.mkldnn._reorder_linear_weight(w, None))
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def _apply(self, fn: Any, recurse: bool = True) -> CpuLinear:
        self.__dict__.pop("_packed", None)  # a cast or move: the packed copy would only hold memory
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_packed", None)  # an opaque oneDNN tensor: it can be neither copied nor pickled
        return state


def use_cpu_linears(module: nn.Module, *, pack: bool | None = None) -> int:
    """Turn every plain ``nn.Linear`` inside ``module`` into a :class:`CpuLinear` in place (subclasses,
    e.g. quantised layers, are left alone). ``pack``: use prepacked weights (several-row products, a
    big float32 weight's single rows); by default when the module's linear weights hold at most :data:`PACK_MAX_PARAMS` values. Returns how many layers
    were changed."""
    linears = [sub for sub in module.modules() if type(sub) in (nn.Linear, CpuLinear)]
    if pack is None:
        pack = sum(sub.weight.numel() for sub in linears) <= PACK_MAX_PARAMS
    n = 0
    for sub in linears:
        if type(sub) is nn.Linear:
            sub.__class__ = CpuLinear
            n += 1
        sub.pack = pack
    return n


def plain_linears(module: nn.Module) -> int:
    """Undo :func:`use_cpu_linears` in place (quantisers that match ``type(m) is nn.Linear``, e.g.
    torch's ``quantize_dynamic``, then see every layer). Returns how many were changed."""
    n = 0
    for sub in module.modules():
        if type(sub) is CpuLinear:
            sub.__dict__.pop("_packed", None)
            sub.__dict__.pop("pack", None)
            sub.__class__ = nn.Linear
            n += 1
    return n
