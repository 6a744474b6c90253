"""Delta checkpoints: store only what differs from the base weights (for small trained releases).

A fine-tuned ``lisa-mobile`` differs from its bases (SmolLM2 from the registry, MobileSAM from the
registry) in a few places: new parts with no base (projector, ``text_hidden_fcs``), the new token rows
of the embedding, the trained mask decoder, and LoRA updates (low rank when merged). Each changed
tensor is stored in the cheapest exact form, under a name that says how to apply it:

* ``full/<key>``: the tensor itself (no base, or a dense change);
* ``rows/<key>/index`` [r] + ``rows/<key>/values`` [r,...]: rows that changed (new token rows);
* ``lowrank/<key>/a`` [out,k] + ``lowrank/<key>/b`` [k,in]: ``W = W_base + a @ b`` (a merged LoRA).

Tensors that share storage (tied embeddings) are stored once, under the first name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["DeltaError", "apply_delta", "compute_delta", "load_delta", "save_delta"]


class DeltaError(RuntimeError):
    """A delta does not fit the model it is applied to."""


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if tensor.numel() and ptr in seen:
            continue
        seen.add(ptr)
        out[key] = tensor
    return out


def _lowrank(
    diff: torch.Tensor, target: torch.Tensor, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Factors (a [out,k], b [k,in]) with ``a @ b == diff`` up to float32 rounding of ``target``, or None.

    A merged LoRA update computed in float32 is low rank plus rounding noise of about 1e-7 * |W| per
    entry, whose singular values stay below ~1e-5 * max|W|; components above that level are kept.
    """
    d = diff.double()
    scale = max(1.0, float(target.abs().max()))
    s = torch.linalg.svdvals(d)
    k = int((s > 1e-5 * scale).sum())
    if k == 0 or k > max_rank:
        return None
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    a = (u[:, :k] * s[:k]).to(target.dtype)
    b = vh[:k].to(target.dtype)
    err = (a.double() @ b.double() - d).abs().max()
    if err > 1e-5 * scale:
        return None
    return a, b


def compute_delta(
    model: nn.Module,
    base: nn.Module,
    *,
    base_prefixes: list[str],
    max_rank: int = 32,
    max_row_fraction: float = 0.25,
) -> dict[str, torch.Tensor]:
    """Encode ``model``'s weights relative to ``base`` (same architecture, base weights loaded).

    Only keys under ``base_prefixes`` are compared with the base; all other weights (parts with no
    pretrained source) are stored in full.
    """
    base_state = base.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, t in _unique_state(model).items():
        t = t.detach().cpu()
        b = base_state.get(key)
        if not any(key.startswith(p) for p in base_prefixes) or b is None or b.shape != t.shape:
            out[f"full/{key}"] = t.contiguous()
            continue
        b = b.detach().cpu()
        if torch.equal(t, b):
            continue
        if t.ndim == 2:
            changed = (t != b).any(dim=1).nonzero().flatten()
            if len(changed) <= max_row_fraction * t.shape[0]:
                out[f"rows/{key}/index"] = changed
                out[f"rows/{key}/values"] = t[changed].contiguous()
                continue
            factors = _lowrank(t - b, t, max_rank)
            if factors is not None:
                out[f"lowrank/{key}/a"], out[f"lowrank/{key}/b"] = (f.contiguous() for f in factors)
                continue
        out[f"full/{key}"] = t.contiguous()
    return out


def save_delta(
    tensors: dict[str, torch.Tensor], path: str | Path, *, dtype: torch.dtype | None = None
) -> None:
    """Write a delta to a safetensors file (floating tensors cast to ``dtype`` when given)."""
    from safetensors.torch import save_file

    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"reasonseg": "delta", "version": "1"})


def load_delta(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a delta written by :func:`save_delta`."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: delta weights not found")
    return load_file(str(path))


@torch.no_grad()
def apply_delta(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Apply a delta in place, strictly: every entry must name a model tensor of the right shape.

    Returns counts per kind (``full``, ``rows``, ``lowrank``).
    """
    state = model.state_dict()
    counts = {"full": 0, "rows": 0, "lowrank": 0}
    problems: list[str] = []
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "full":
            groups[(kind, rest)] = {"value": value}
        elif kind in ("rows", "lowrank"):
            key, _, part = rest.rpartition("/")
            groups.setdefault((kind, key), {})[part] = value
        else:
            problems.append(f"{name}: unknown entry kind {kind!r}")
    for (kind, key), parts in groups.items():
        if key not in state:
            problems.append(f"{key}: not a tensor of the model")
            continue
        target = state[key]
        try:
            if kind == "full":
                value = parts["value"]
                if value.shape != target.shape:
                    raise DeltaError(f"shape {tuple(value.shape)} != model {tuple(target.shape)}")
                target.copy_(value.to(target.dtype))
            elif kind == "rows":
                index, values = parts["index"].long(), parts["values"]
                if values.shape[1:] != target.shape[1:] or (
                    len(index) and int(index.max()) >= target.shape[0]
                ):
                    raise DeltaError(f"rows {tuple(values.shape)} do not fit {tuple(target.shape)}")
                target[index.to(target.device)] = values.to(target.dtype).to(target.device)
            else:
                a, b = parts["a"], parts["b"]
                if (a.shape[0], b.shape[1]) != tuple(target.shape):
                    raise DeltaError(
                        f"factors {tuple(a.shape)}x{tuple(b.shape)} do not fit {tuple(target.shape)}"
                    )
                target.add_((a.double() @ b.double()).to(target.dtype).to(target.device))
            counts[kind] += 1
        except KeyError as exc:
            problems.append(f"{key}: {kind} entry lacks part {exc}")
        except DeltaError as exc:
            problems.append(f"{key}: {exc}")
    if problems:
        raise DeltaError("delta does not fit the model:\n  " + "\n  ".join(problems))
    return counts
