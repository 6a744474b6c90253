"""The LM's linear layers for one-token decoding steps in bf16 on a CPU (``--dtype auto`` picks bf16
where the CPU has AMX or AVX-512 BF16; see :mod:`reasonseg.model.precision`).

``F.linear`` on a single bf16 row goes through oneDNN's general matrix product, which reorders the
weight on every call; ``torch.mv`` has a bf16 matrix-vector kernel that does not. On SmolLM2-135M's
210 products of one decoding step (2 threads, interleaved A/B in one process) a step took 57.5 ms
instead of 62.1 ms, and 77 instead of 86 ms in a second, more loaded run. Several rows, float32, a GPU
or autograd keep ``F.linear``. Pre-packing the weights into oneDNN's blocked layout for several-row
products was also tried: it gained 0-6% in the model for a second copy of every weight, and was dropped.

Results equal ``F.linear`` up to the rounding of the bf16 output (both accumulate in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CpuLinear", "plain_linears", "use_cpu_linears"]


class CpuLinear(nn.Linear):
    """``nn.Linear`` that runs a single bf16 row on a CPU without autograd as ``torch.mv``. Same
    parameters and state-dict names; swapped in by class (:func:`use_cpu_linears`), so PEFT and
    ``isinstance`` checks still see an ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [..., out_features], as ``nn.Linear``."""
        w = self.weight
        if (
            x.dtype == torch.bfloat16
            and w.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.numel() == x.shape[-1] == w.shape[1]  # one row
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            y = torch.mv(w, x.reshape(-1))
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)


def use_cpu_linears(module: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` inside ``module`` into a :class:`CpuLinear` in place (subclasses,
    e.g. quantised layers, are left alone). Returns how many were changed."""
    n = 0
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = CpuLinear
            n += 1
    return n


def plain_linears(module: nn.Module) -> int:
    """Undo :func:`use_cpu_linears` in place (quantisers that match ``type(m) is nn.Linear``, e.g.
    torch's ``quantize_dynamic``, then see every layer). Returns how many were changed."""
    n = 0
    for sub in module.modules():
        if type(sub) is CpuLinear:
            sub.__class__ = nn.Linear
            n += 1
    return n
