"""Typed training recipes, read from YAML.

A recipe has six sections, each a dataclass validated on construction; an unknown key or a bad value
raises :class:`RecipeError` naming the file and the field (``train.grad_accum: must be >= 1, got 0``).

.. code-block:: yaml

    model:  {preset: lisa-mobile, tiny: false}          # or pretrained: path/to/save_pretrained/dir
    data:   {datasets: [{kind: reason_seg, path: data/reason_seg, rate: 1}]}
    loss:   {ce: 1.0, bce: 2.0, dice: 0.5}
    freeze: {lora: {r: 8, alpha: 16, dropout: 0.05, targets: [q_proj, v_proj]}}
    optim:  {lr: 3.0e-4, weight_decay: 0.0, betas: [0.9, 0.95], warmup_steps: 100, total_steps: 5000}
    train:  {micro_batch_size: 2, grad_accum: 10, mixed_precision: bf16, output_dir: runs/lisa-7b}

``total_steps`` counts optimiser steps; one optimiser step consumes
``micro_batch_size * grad_accum * num_processes`` samples.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from reasonseg.training.freeze import LoraSettings, TrainablePlan, apply_lisa_freeze_policy
from reasonseg.training.losses import LossWeights
from reasonseg.training.optim import OptimConfig

__all__ = [
    "DataRecipe",
    "DatasetSpec",
    "FreezeRecipe",
    "LossRecipe",
    "ModelRecipe",
    "RecipeError",
    "TrainRecipe",
    "TrainSettings",
    "load_recipe",
]


class RecipeError(ValueError):
    """A recipe file or field is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class ModelRecipe:
    """Which model to start from: a preset (``LisaModel.from_preset``) or a ``save_pretrained`` directory.

    ``load_base_weights=False`` starts from random weights (tests, benchmarks, or a "7B-sized" smoke run).
    """

    preset: str | None = "lisa-mobile"
    tiny: bool = False
    pretrained: str | None = None
    load_base_weights: bool = True

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.pretrained is None):
            raise ValueError("model: give exactly one of 'preset' and 'pretrained'")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the training mixture.

    ``kind`` names a reader (``reasonseg.data.readers.build_reader``: ``reason_seg``, ``grefcoco``,
    ``refcoco``, ``ade20k``, ``synth``, ...) or ``callable``: then ``target`` is
    ``"package.module:function"`` returning a sequence of ``Sample`` (called with ``**options``), the way
    to plug in your own data (it takes no ``path``: pass one in ``options`` if the function wants it);
    a reader kind needs ``path``. ``rate`` is the relative sampling rate (LISA: 9:3:3:1); datasets with
    the same ``name`` form one source of the mixture (LISA's ``sem_seg`` group) and must give the same
    rate.
    A reader kind's ``options`` are checked against the options its reader takes
    (``reasonseg.data.readers.reader_options``) when the recipe is read, so a typo fails before any model
    loads; ``mode`` and ``seed`` are not among them: the trainer sets ``mode="train"`` and ``train.seed``.
    """

    kind: str
    path: str | None = None
    rate: float = 1.0
    name: str | None = None
    target: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.kind:
            raise ValueError("kind must be a non-empty string")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate!r}")
        if self.kind == "callable":
            if not self.target or ":" not in self.target:
                raise ValueError("kind 'callable' needs target: 'package.module:function'")
            if self.path is not None:
                raise ValueError(
                    f"kind 'callable' takes no path (got {self.path!r}): its function gets only the "
                    "options; pass a path as one of them (options: {path: ...}) if the function takes one"
                )
            return
        self._check_reader_options()
        if self.target is not None:
            raise ValueError(f"target applies only to kind 'callable', not to kind {self.kind!r}")
        if self.path is None or not str(self.path).strip():
            raise ValueError(f"kind {self.kind!r} needs path (the dataset's folder or file)")

    def _check_reader_options(self) -> None:
        from reasonseg.data.readers import READER_KINDS, reader_options

        if self.kind not in READER_KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; known: callable, {', '.join(READER_KINDS)}")
        accepted = [o for o in reader_options(self.kind) if o not in ("mode", "seed")]
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise ValueError(
                f"dataset {self.name or self.kind!r} (kind {self.kind}): unknown option(s) {unknown}; "
                f"{self.kind} takes: {', '.join(accepted)} (mode and seed are set by the trainer)"
            )


@dataclass(frozen=True)
class DataRecipe:
    """The training data: datasets and how many samples an epoch of the mixture has.

    ``collate`` optionally names a ``"package.module:factory"`` called with the model that returns the
    collate function; by default the data package's ``LisaCollator``.
    """

    datasets: tuple[DatasetSpec, ...] = ()
    samples_per_epoch: int | None = None
    num_workers: int = 0
    collate: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "datasets",
            tuple(d if isinstance(d, DatasetSpec) else DatasetSpec(**d) for d in self.datasets),
        )
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {self.samples_per_epoch!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers!r}")
        first: dict[str, int] = {}
        for i, d in enumerate(self.datasets):
            if d.name is None:
                continue
            j = first.setdefault(d.name, i)
            if self.datasets[j].rate != d.rate:
                raise ValueError(
                    f"datasets[{j}] and datasets[{i}] share name {d.name!r} but give different rates "
                    f"({self.datasets[j].rate!r} and {d.rate!r}): the datasets of one name form one "
                    "source of the mixture, sampled at one rate; give them the same rate, or different names"
                )
        if self.collate is not None and ":" not in self.collate:
            raise ValueError(f"collate must be 'package.module:factory', got {self.collate!r}")


@dataclass(frozen=True)
class LossRecipe:
    """Loss weights (LISA: 1.0 CE, 2.0 BCE, 0.5 Dice). ``mask_loss_on_rej``: also supervise [REJ] slots
    with their all-zero masks (off: a [REJ] slot is taught by the CE term only)."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    dice_scale: float = 1000.0
    dice_eps: float = 1e-6
    mask_loss_on_rej: bool = False

    def weights(self) -> LossWeights:
        return LossWeights(self.ce, self.bce, self.dice, self.dice_scale, self.dice_eps)

    def __post_init__(self) -> None:
        self.weights()  # validates


@dataclass(frozen=True)
class FreezeRecipe:
    """The freeze policy. LISA: LoRA on q/v, frozen CLIP + projector + SAM encoders, trained mask decoder,
    ``text_hidden_fcs`` and the new tokens' rows. ``train_projector`` is for variants whose projector is
    new (lisa-mobile)."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    train_projector: bool = False
    train_mask_decoder: bool = True
    train_new_token_rows: bool = True
    train_head: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraSettings(**self.lora))

    def apply(self, model: Any) -> TrainablePlan:
        """This policy on a ``LisaModel`` (:func:`~reasonseg.training.freeze.apply_lisa_freeze_policy`):
        what training and export both build, so they agree on every field."""
        return apply_lisa_freeze_policy(
            model,
            self.lora,
            train_projector=self.train_projector,
            train_mask_decoder=self.train_mask_decoder,
            train_new_token_rows=self.train_new_token_rows,
            train_head=self.train_head,
        )


MixedPrecision = Literal["no", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainSettings:
    """Loop settings. ``checkpoint_every`` is in optimiser steps; ``encoder_cache`` a directory for the
    frozen image encoders' outputs (None: encode every time); ``num_threads`` sets torch's intra-op
    threads per process (on a shared or small CPU, 1 per process avoids oversubscription);
    ``head_init_samples`` > 0 standardises the LISA head's input on that many training samples before
    the first step (``Trainer.standardise_head_input``; a fresh run only)."""

    output_dir: str = "runs/train"
    micro_batch_size: int = 2
    grad_accum: int = 1
    mixed_precision: MixedPrecision = "no"
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 3
    log_every: int = 1
    encoder_cache: str | None = None
    progress_bar: bool = True
    find_unused_parameters: bool = True
    num_threads: int | None = None
    head_init_samples: int = 0

    def __post_init__(self) -> None:
        if self.head_init_samples < 0:
            raise ValueError(f"head_init_samples: must be >= 0, got {self.head_init_samples!r}")
        for name in ("micro_batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision: must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads: must be >= 1 or null, got {self.num_threads!r}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: must be >= 1 or null, got {self.keep_checkpoints!r}")


@dataclass(frozen=True)
class TrainRecipe:
    """A whole recipe (see the module docstring)."""

    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    loss: LossRecipe = field(default_factory=LossRecipe)
    freeze: FreezeRecipe = field(default_factory=FreezeRecipe)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    accelerate_config: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-serialisable; tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Any) -> TrainRecipe:
        """A copy with some fields of some sections changed: ``recipe.replace(train={"seed": 1})``."""
        data = self.to_dict()
        for name, changes in sections.items():
            if name not in data:
                raise RecipeError(f"recipe: unknown section {name!r}")
            if isinstance(data[name], dict):
                data[name].update(changes)
            else:
                data[name] = changes
        return recipe_from_dict(data, source="<replace>")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_SECTIONS: dict[str, type] = {
    "model": ModelRecipe,
    "data": DataRecipe,
    "loss": LossRecipe,
    "freeze": FreezeRecipe,
    "optim": OptimConfig,
    "train": TrainSettings,
}


def _check_keys(cls: type, data: dict[str, Any], where: str, source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{source}: {where}: unknown field(s) {unknown}; known: {sorted(known)}")


def _check_types(cls: type, data: dict[str, Any], where: str, source: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        hint = hints[key]
        if not _type_ok(value, hint):
            raise RecipeError(f"{source}: {where}.{key}: expected {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return True


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where}: expected a mapping, got {type(data).__name__}")
    _check_keys(cls, data, where, source)
    _check_types(cls, data, where, source)
    data = dict(data)
    if cls is FreezeRecipe and isinstance(data.get("lora"), dict):
        _check_keys(LoraSettings, data["lora"], f"{where}.lora", source)
        _check_types(LoraSettings, data["lora"], f"{where}.lora", source)
    if cls is DataRecipe:
        specs = []
        for i, d in enumerate(data.get("datasets") or []):
            if not isinstance(d, dict):
                raise RecipeError(f"{source}: {where}.datasets[{i}]: expected a mapping")
            _check_keys(DatasetSpec, d, f"{where}.datasets[{i}]", source)
            _check_types(DatasetSpec, d, f"{where}.datasets[{i}]", source)
            try:
                specs.append(DatasetSpec(**d))
            except ValueError as exc:
                raise RecipeError(f"{source}: {where}.datasets[{i}]: {exc}") from None
        data["datasets"] = tuple(specs)
    for key in ("betas", "targets"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    try:
        return cls(**data)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{source}: {where}: {exc}") from None


def recipe_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> TrainRecipe:
    """Build and validate a recipe from plain data (a parsed YAML file)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SECTIONS) - {"accelerate_config"})
    if unknown:
        raise RecipeError(
            f"{source}: unknown section(s) {unknown}; known: {[*_SECTIONS, 'accelerate_config']}"
        )
    parts = {name: _build(cls, data.get(name) or {}, name, source) for name, cls in _SECTIONS.items()}
    acc = data.get("accelerate_config")
    if acc is not None and not isinstance(acc, str):
        raise RecipeError(f"{source}: accelerate_config: expected a path string, got {acc!r}")
    return TrainRecipe(**parts, accelerate_config=acc)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> TrainRecipe:
    """Read a YAML recipe; ``overrides`` are ``section.field=value`` strings (value parsed as YAML)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a recipe file (see recipes/*.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2:
            raise RecipeError(f"override {item!r}: expected section.field=value")
        node = data.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return recipe_from_dict(data, source=str(path))
