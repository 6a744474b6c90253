"""The LM's linear layers in bf16 on a CPU without autograd (``--dtype auto`` picks bf16 where the CPU
has AMX or AVX-512 BF16; see :mod:`reasonseg.model.precision`).

``F.linear`` in bf16 goes through oneDNN's general matrix product, which reorders the weight into its
blocked layout on every call. Two cheaper paths, both without autograd:

* **one row** (a decoding step): ``torch.mv`` has a bf16 matrix-vector kernel that does not reorder.
  On SmolLM2-135M's 210 products of one step (2 threads, interleaved A/B in one process) a step took
  57.5 ms instead of 62.1 ms, and 77 instead of 86 ms in a second, more loaded run.
* **several rows** (a prompt, a drafted answer): the weight is reordered once, kept beside the layer
  while the weight is unchanged, and multiplied by oneDNN's ``_linear_pointwise``, as ``torch.compile``
  does on a CPU. SmolLM2-135M's 210 products alone, 1 thread: 112 rows 128 -> 86 ms, 24 rows 77 ->
  66 ms. In the built-in model (``bench/bench_commits.py``, interleaved, one slow phase of the machine)
  ``predict`` went from 310.5 to 292.3 ms with 1 thread and from 212.3 to 185.2 ms with 2, the
  follow-up from 233.8 to 220.8 and from 169.7 to 155.0 ms. It costs a second copy of the weights
  (about 270 MB for SmolLM2-135M with its tied head), so it is on only for LMs of at most
  :data:`PACK_MAX_PARAMS` linear weights (SmolLM2 sizes; not a 7B LM, whose copy would be 13 GB).

Float32 (where the prepacked kernel is not faster and not bit-equal), a GPU, autograd and
``torch.compile`` keep ``F.linear``. Results equal ``F.linear``'s: the prepacked product bit for bit (the
same oneDNN kernel), ``torch.mv`` up to the rounding of the bf16 output (both accumulate in float32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reasonseg.model.sam.common import memoised

__all__ = ["PACK_MAX_PARAMS", "CpuLinear", "plain_linears", "use_cpu_linears"]

PACK_MAX_PARAMS = 2_000_000_000
""":func:`use_cpu_linears` prepacks several-row products only when the module's linear weights hold at
most this many values (the packed copy holds as many again)."""

_CAN_PACK = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)


class CpuLinear(nn.Linear):
    """``nn.Linear`` with the bf16 CPU inference paths above. Same parameters and state-dict names;
    swapped in by class (:func:`use_cpu_linears`), so PEFT and ``isinstance`` checks still see an
    ``nn.Linear``. ``pack`` says whether several rows use a prepacked weight (set by
    :func:`use_cpu_linears`); the packed copy is dropped by a cast or a move, and never pickled or
    deep-copied."""

    pack: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [..., out_features], as ``nn.Linear``."""
        w = self.weight
        if (
            x.dtype == torch.bfloat16
            and w.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            if x.numel() == x.shape[-1] == w.shape[1]:  # one row
                y = torch.mv(w, x.reshape(-1))
                if self.bias is not None:
                    y = y + self.bias
                return y.reshape(*x.shape[:-1], w.shape[0])
            if self.pack and _CAN_PACK:
                packed = memoised(
                    self, "_packed", w, lambda: torch.ops.mkldnn._reorder_linear_weight(w, None)
                )
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, w, self.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> CpuLinear:
        self.__dict__.pop("_packed", None)  # a cast or move: the packed copy would only hold memory
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_packed", None)  # an opaque oneDNN tensor: it can be neither copied nor pickled
        return state


def use_cpu_linears(module: nn.Module, *, pack: bool | None = None) -> int:
    """Turn every plain ``nn.Linear`` inside ``module`` into a :class:`CpuLinear` in place (subclasses,
    e.g. quantised layers, are left alone). ``pack``: prepack several-row products; by default when
    the module's linear weights hold at most :data:`PACK_MAX_PARAMS` values. Returns how many layers
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
