"""LISA's freeze policy as named functions, each selecting modules by identity (attribute access on the
model), never by matching substrings of parameter names.

    frozen     CLIP vision tower and its projector; SAM image encoder and prompt encoder; the LM body
    LoRA       r=8, alpha=16, dropout 0.05 on the LM's q_proj and v_proj (configurable)
    trained    SAM mask decoder; ``text_hidden_fcs`` (hidden -> 256); the *rows* of the new tokens
               ([SEG], [REJ], ...) in the input embedding and the output head

Only the new tokens' rows of the embedding / output head are trained: a gradient hook multiplies the
gradient of those tensors by a 0/1 row mask, so every other row gets an exact zero gradient; with AdamW
and weight decay 0 on those tensors (``TrainablePlan.row_params`` goes in the no-decay group) a zero
gradient means a zero update, so old rows stay bit-identical. A tied embedding/head is one tensor and is
handled once.

Typical use (what the trainer does)::

    freeze_all(model)
    freeze_vision_tower(model); freeze_sam_encoders(model)      # explicit, also checked by tests
    apply_lora(model.lm, LoraSettings())
    plan = mark_trainable(model, new_token_ids=[seg_id, rej_id])
    ...train...
    merge_lora(model)                                           # before export
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "LoraSettings",
    "TrainablePlan",
    "apply_lisa_freeze_policy",
    "apply_lora",
    "find_lora_targets",
    "freeze_all",
    "freeze_module",
    "freeze_sam_encoders",
    "freeze_vision_tower",
    "lisa_new_token_ids",
    "mark_trainable",
    "merge_lora",
    "parameter_names",
    "set_frozen_eval",
]


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the LM (LISA: r=8, alpha=16, dropout 0.05 on q_proj and v_proj).

    ``targets`` are attribute names of ``nn.Linear`` children (e.g. each attention block's ``q_proj``);
    ``r=0`` disables LoRA.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.r < 0:
            raise ValueError(f"lora.r must be >= 0, got {self.r!r}")
        if self.r > 0 and not self.targets:
            raise ValueError("lora.targets must name at least one projection when lora.r > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0,1), got {self.dropout!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")


def freeze_module(module: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)


def freeze_all(model: nn.Module) -> None:
    """Freeze the whole model (the starting point of the policy)."""
    freeze_module(model)


def _child(model: nn.Module, path: str) -> nn.Module:
    obj: object = model
    for attr in path.split("."):
        if not hasattr(obj, attr):
            raise AttributeError(f"{type(model).__name__} has no sub-module {path!r} (missing {attr!r})")
        obj = getattr(obj, attr)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{type(model).__name__}.{path} is a {type(obj).__name__}, not an nn.Module")
    return obj


def freeze_vision_tower(
    model: nn.Module, *, attrs: Sequence[str] = ("vision_tower", "projector")
) -> list[str]:
    """Freeze the CLIP vision tower and the projector (LISA keeps both frozen).

    ``attrs`` are the sub-module attributes of ``model`` to freeze; those absent from the model (a
    variant without a projector) are skipped. Returns the attributes frozen.
    """
    done = []
    for attr in attrs:
        if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            freeze_module(getattr(model, attr))
            done.append(attr)
    if not done:
        raise AttributeError(f"{type(model).__name__} has none of the vision sub-modules {list(attrs)}")
    return done


def freeze_sam_encoders(model: nn.Module, *, sam_attr: str = "sam") -> None:
    """Freeze SAM's image encoder and prompt encoder (``model.<sam_attr>.image_encoder/.prompt_encoder``)."""
    sam = _child(model, sam_attr)
    freeze_module(_child(sam, "image_encoder"))
    freeze_module(_child(sam, "prompt_encoder"))


def find_lora_targets(lm: nn.Module, targets: Iterable[str]) -> list[str]:
    """Qualified names (relative to ``lm``) of the ``nn.Linear`` modules that are direct children named
    exactly as one of ``targets`` (``self_attn.q_proj`` matches ``q_proj``; ``q_proj_extra`` does not)."""
    wanted = tuple(targets)
    names_by_id = {id(m): n for n, m in lm.named_modules()}
    found: list[str] = []
    for module in lm.modules():
        for attr in wanted:
            child = module._modules.get(attr)
            if isinstance(child, nn.Linear):
                found.append(names_by_id[id(child)])
    if not found:
        raise ValueError(f"no nn.Linear child named one of {list(wanted)} in {type(lm).__name__}")
    return sorted(set(found))


def apply_lora(lm: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject peft LoRA adapters, in place, into the chosen projections of the language model.

    Only ``lm`` is touched, so same-named projections elsewhere (CLIP's attention) stay plain. The base
    weights are frozen; the adapters (``lora_A``/``lora_B``) are trainable. Returns the adapted module
    names (relative to ``lm``); an empty list when ``settings.r == 0``.
    """
    if settings.r == 0:
        return []
    from peft import LoraConfig, inject_adapter_in_model

    names = find_lora_targets(lm, settings.targets)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=names,
        bias="none",
    )
    inject_adapter_in_model(config, lm)
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base ``nn.Linear`` and put the plain layer back in its place.

    After this the model has exactly the modules (and state-dict keys) it had before ``apply_lora``.
    Returns how many layers were merged.
    """
    from peft.tuners.lora import LoraLayer

    parents: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if isinstance(child, LoraLayer):
                parents.append((parent, attr, child))
    for parent, attr, layer in parents:
        layer.merge(safe_merge=True)
        base = layer.get_base_layer()
        setattr(parent, attr, base)
    return len(parents)


def set_frozen_eval(model: nn.Module) -> list[str]:
    """Put every fully frozen sub-module (it has parameters, none trainable) in eval mode, recursively.

    Call after ``model.train()``: a frozen encoder must behave as at inference (BatchNorm running
    statistics, no dropout), otherwise its outputs change from batch to batch and cannot be cached.
    Returns the names of the top-most modules switched.
    """
    switched: list[str] = []
    skip: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if skip and any(name.startswith(s) for s in skip):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
            switched.append(name)
            skip = (*skip, f"{name}.")
    return switched


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first qualified name (tied parameters appear once)."""
    return {id(p): n for n, p in model.named_parameters()}


@dataclass
class TrainablePlan:
    """Which parameters train: whole tensors, and tensors of which only some rows train.

    Attributes:
        full: name -> parameter trained entirely.
        rows: name -> (parameter, row ids [R] int64) of partly trained tensors (embedding, output head).
        hooks: the gradient hooks that zero the other rows (``remove()`` to undo).
    """

    full: dict[str, nn.Parameter] = field(default_factory=dict)
    rows: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        """Every trained parameter once (for the optimiser)."""
        return [*self.full.values(), *(p for p, _ in self.rows.values())]

    def row_params(self) -> list[nn.Parameter]:
        """The partly trained tensors (they must get weight decay 0)."""
        return [p for p, _ in self.rows.values()]

    def num_trainable(self) -> int:
        """Number of scalars actually trained."""
        full = sum(p.numel() for p in self.full.values())
        return full + sum(int(r.numel()) * (p.numel() // p.shape[0]) for p, r in self.rows.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained values only: full tensors by name, and ``<name>@rows`` / ``<name>@row_ids``."""
        out = {n: p.detach() for n, p in self.full.items()}
        for n, (p, r) in self.rows.items():
            out[f"{n}@rows"] = p.detach()[r]
            out[f"{n}@row_ids"] = r
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy trained values back (strict: the key sets, shapes and row ids must match exactly)."""
        expected = set(self.full) | {f"{n}@rows" for n in self.rows} | {f"{n}@row_ids" for n in self.rows}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"trainable state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for n, p in self.full.items():
                if state[n].shape != p.shape:
                    raise ValueError(
                        f"trainable state {n!r}: shape {tuple(state[n].shape)} != {tuple(p.shape)}"
                    )
                p.copy_(state[n])
            for n, (p, r) in self.rows.items():
                if not torch.equal(state[f"{n}@row_ids"].to(r.device), r):
                    raise ValueError(
                        f"trainable state {n!r}: trained rows differ from this model's new tokens"
                    )
                p[r] = state[f"{n}@rows"].to(p.dtype)


def _row_mask_hook(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(device=grad.device, dtype=grad.dtype)

    return hook


def mark_trainable(
    model: nn.Module,
    *,
    modules: Sequence[nn.Module],
    row_tensors: Sequence[nn.Parameter],
    new_token_ids: Sequence[int],
    include_lora: bool = True,
) -> TrainablePlan:
    """Make the given modules fully trainable and the new tokens' rows of ``row_tensors`` trainable.

    Args:
        model: the whole model (names in the plan are relative to it).
        modules: modules trained entirely (LISA: the SAM mask decoder and ``text_hidden_fcs``).
        row_tensors: [V,H] tensors of which only rows ``new_token_ids`` train (input embedding and
            output head weights; a tied pair is given once or twice, it is handled once).
        new_token_ids: vocabulary ids of the added tokens ([SEG], [REJ], ...).
        include_lora: also keep LoRA adapter parameters trainable.

    Returns:
        The :class:`TrainablePlan`; every other parameter of ``model`` has ``requires_grad=False``.
    """
    names = parameter_names(model)
    full_ids: set[int] = set()
    for m in modules:
        full_ids.update(id(p) for p in m.parameters())
    if include_lora:
        from peft.tuners.lora import LoraLayer

        for m in model.modules():
            if isinstance(m, LoraLayer):
                for sub in (m.lora_A, m.lora_B, m.lora_embedding_A, m.lora_embedding_B):
                    full_ids.update(id(p) for p in sub.parameters())
    row_by_id: dict[int, nn.Parameter] = {}
    for t in row_tensors:
        if t.dim() != 2:
            raise ValueError(
                f"row-trained tensor {names.get(id(t), '?')} must be [V,H], got {tuple(t.shape)}"
            )
        row_by_id[id(t)] = t
    ids = sorted({int(i) for i in new_token_ids})
    if row_by_id and not ids:
        raise ValueError("mark_trainable: row tensors given but no new token ids")

    plan = TrainablePlan()
    for p in model.parameters():
        p.requires_grad_(False)
    for n, p in model.named_parameters():
        if id(p) in row_by_id:
            if ids[-1] >= p.shape[0]:
                raise ValueError(f"{n}: token id {ids[-1]} outside its {p.shape[0]} rows")
            rows = torch.tensor(ids, dtype=torch.long)
            mask = torch.zeros(p.shape[0], 1, dtype=p.dtype)
            mask[rows] = 1
            p.requires_grad_(True)
            plan.rows[n] = (p, rows)
            plan.hooks.append(p.register_hook(_row_mask_hook(mask)))
        elif id(p) in full_ids:
            p.requires_grad_(True)
            plan.full[n] = p
    unknown = [t for t in row_by_id if t not in names]
    if unknown:
        raise ValueError("mark_trainable: a row tensor is not a parameter of the model")
    return plan


def lisa_new_token_ids(model: nn.Module, extra_tokens: Sequence[str] = ()) -> list[int]:
    """Ids of the tokens whose rows LISA trains: ``[SEG]`` (and GSVA's ``[REJ]``) plus ``extra_tokens``,
    each found by id in the model's tokenizer."""
    ids = list(model.slot_token_ids())
    vocab = model.tokenizer.get_vocab()
    for tok in extra_tokens:
        if tok not in vocab:
            raise KeyError(f"freeze.trainable_tokens: token {tok!r} is not in the tokenizer")
        ids.append(int(vocab[tok]))
    return sorted(set(ids))


def apply_lisa_freeze_policy(
    model: nn.Module,
    lora: LoraSettings,
    *,
    train_projector: bool = False,
    train_mask_decoder: bool = True,
    train_new_token_rows: bool = True,
    extra_tokens: Sequence[str] = (),
    train_head: bool = True,
) -> TrainablePlan:
    """The whole LISA policy on a ``LisaModel``: freeze everything, inject LoRA into the LM, then mark
    the trained parts. Returns the :class:`TrainablePlan` (the optimiser's parameters).
    ``train_head=False`` keeps the LISA head (``text_hidden_fcs``) frozen too (an ablation)."""
    freeze_all(model)
    freeze_vision_tower(model.mllm)
    freeze_sam_encoders(model)
    apply_lora(model.mllm.lm, lora)
    modules: list[nn.Module] = [model.text_hidden_fcs] if train_head else []
    if train_mask_decoder:
        modules.append(model.sam.mask_decoder)
    if train_projector:
        modules.append(model.mllm.projector)
    rows: list[nn.Parameter] = []
    ids: list[int] = []
    if train_new_token_rows:
        lm = model.mllm.lm
        rows = [lm.get_input_embeddings().weight, lm.get_output_embeddings().weight]
        ids = lisa_new_token_ids(model, extra_tokens)
    return mark_trainable(model, modules=modules, row_tensors=rows, new_token_ids=ids)
