"""Small building blocks shared by SAM's encoders and decoder.

Parameter names follow Meta's ``segment_anything`` so its checkpoints (and MobileSAM's) load strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm2d", "MLPBlock", "attention", "fusable", "linear", "memoised", "tensor_version"]


_MKLDNN_FUSION = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
_MKLDNN_BF16 = _MKLDNN_FUSION and torch.ops.mkldnn._is_mkldnn_bf16_supported()
"""oneDNN's bf16 primitives need AVX-512 (or AVX-NE-CONVERT); on an AVX2-only CPU they fail to build."""


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether fused oneDNN CPU kernels may run on ``x`` with ``weight``: CPU, fp32 or bf16 (the same for
    both; a mismatch falls back to the plain ops and their dtype error; bf16 only where oneDNN runs
    bf16 on this CPU), no autograd (no backward).

    These are the ``torch.ops.mkldnn`` pointwise-fusion ops that ``torch.compile`` emits on CPU; they
    fold a bias, an activation or a residual add into the matmul/convolution, saving whole passes over
    memory-bound activations. Elsewhere (GPU, training) callers run the plain ops.
    """
    return (
        _MKLDNN_FUSION
        and x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _MKLDNN_BF16))
        and weight.dtype == x.dtype
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # under torch.compile, inductor does its own fusion
    )


def tensor_version(t: torch.Tensor) -> int:
    """``t._version`` (bumped by every in-place change), or -1 for an inference tensor, which keeps
    no counter (memoisation keyed on it then relies on the tensor's identity alone)."""
    return -1 if t.is_inference() else int(t._version)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def memoised(
    owner: nn.Module,
    slot: str,
    source: torch.Tensor,
    compute: Callable[[], torch.Tensor],
    extra: Hashable = None,
) -> torch.Tensor:
    """``compute()``, kept on ``owner`` under ``slot`` for as long as ``source`` is the same, unchanged
    tensor and ``extra`` is equal; with autograd on it is always recomputed and never stored. "The
    same" is the same object, or a view of the same memory with the same dtype, shape and strides
    (``feats[i : i + 1]`` taken anew for every query) still at the address it had when memoised (a
    parameter whose ``.data`` was replaced, as PEFT's safe merge does, is not the same); "unchanged"
    is :func:`tensor_version`, which views share with their base. In-place writes through ``.data``
    bump no version and are not seen. The memo keeps its source alive, so its address cannot be
    reused by other data meanwhile. It holds plain references, so the module stays picklable."""
    key = (tensor_version(source), source.data_ptr(), extra)
    memo = owner.__dict__.get(slot)
    grad = torch.is_grad_enabled()
    if memo is not None and not grad and _same_view(memo[0], source) and memo[1] == key:
        return memo[2]
    value = compute()
    if not grad:
        owner.__dict__[slot] = (source, key, value)
    return value


def linear(
    x: torch.Tensor,
    layer: nn.Linear | tuple[torch.Tensor, torch.Tensor],
    act: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(layer(x) + residual)`` for act in {"none", "gelu" (exact erf), "relu"}; [..., in] -> [..., out].

    ``layer`` is an ``nn.Linear`` or its (weight [out, in], bias [out]). One oneDNN kernel when
    :func:`fusable`, the plain ops otherwise.
    """
    weight, bias = (layer.weight, layer.bias) if isinstance(layer, nn.Module) else layer
    if fusable(x, weight) and bias is not None:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "none")
        y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    else:
        y = layer(x) if isinstance(layer, nn.Module) else F.linear(x, weight, bias)
        if residual is not None:
            y = y + residual
    if act == "gelu":
        return F.gelu(y)
    if act == "relu":
        return F.relu(y)
    return y


def _act_name(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if isinstance(act, nn.ReLU):
        return "relu"
    return None


class MLPBlock(nn.Module):
    """Two-layer perceptron ``lin2(act(lin1(x)))`` applied to the last dimension ([..., C] -> [..., C])."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``lin2(act(lin1(x))) (+ residual)``."""
        name = _act_name(self.act)
        h = linear(x, self.lin1, name) if name else self.act(self.lin1(x))
        return linear(h, self.lin2, residual=residual)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a BxCxHxW map (statistics per pixel, eps inside the sqrt)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising the channels-last view with F.layer_norm is one fused kernel instead of five
        # element-wise passes; the permutes are views, and a channels_last input stays zero-copy.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T * scale + bias) v`` through ``scaled_dot_product_attention``.

    Args:
        q: [B, heads, Nq, Dk]; k: [B, heads, Nk, Dk]; v: [B, heads, Nk, Dv].
        bias: additive float bias broadcastable to [B, heads, Nq, Nk] (relative positions, learned biases).
        scale: logit scale; ``Dk ** -0.5`` when None.
    Returns:
        [B, heads, Nq, Dv].
    """
    if bias is None and q.device.type == "cpu" and k.shape[2] <= _FEW_KEYS < q.shape[2]:
        return _attention_few_keys(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        # A full-rank (expanded, zero-copy) 4-D mask lets the CPU flash kernel take it; a 2-D/3-D mask
        # sends SDPA down the unfused math path, about 3x slower for TinyViT's window sizes.
        bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


_FEW_KEYS = 32


def _attention_few_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of many queries to a few keys (SAM's decoder: 4096 image positions attending to ~7 prompt
    tokens), computed transposed: ``k q^T`` is a short, wide product, the softmax runs over the key axis
    in float32, and ``v^T p`` is wide again. On a CPU the flash kernel walks the 4096 queries in small
    blocks against 7 keys; this form took 0.65 ms instead of 7.6 ms for one [1, 8, 4096, 16] call (fp32;
    0.74 vs 8.0 ms in bf16), with a max difference of 5e-7 in fp32."""
    scores = (k @ q.transpose(-1, -2)) * scale  # [B, heads, Nk, Nq]
    p = torch.softmax(scores.float(), dim=-2).to(v.dtype)
    return (v.transpose(-1, -2) @ p).transpose(-1, -2)  # [B, heads, Nq, Dv]
