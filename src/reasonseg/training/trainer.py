"""The training loop, through Hugging Face accelerate (one process, DDP, DeepSpeed or FSDP alike).

One optimiser step = ``grad_accum`` micro-batches of ``micro_batch_size`` samples on each of the
``num_processes`` processes. The sample order is a pure function of the seed: the stream is the
concatenation of one permutation of the dataset per epoch, and global micro-batch ``p`` is stream
positions ``[p*G, (p+1)*G)`` with ``G = micro_batch_size * num_processes``, rank r taking the r-th slice.
So N processes see exactly the samples one process sees with an N times larger micro-batch, and the
data position of a checkpoint is a single number.

Loss normalisation is global: CE is divided by the number of supervised tokens and the mask terms by
the number of masks *summed over processes*, so the data-parallel average of per-process losses equals
the single-process loss on the same global batch.

    trainer = Trainer(recipe)                 # builds model, freeze plan, data, optimiser
    result = trainer.fit(resume=True)         # continues from the newest complete checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reasonseg.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from reasonseg.training.encoder_cache import (
    EncoderCache,
    FrozenImageFeatures,
    frozen_encoder_cache,
    frozen_features,
    image_features,
)
from reasonseg.training.freeze import TrainablePlan, set_frozen_eval
from reasonseg.training.losses import (
    LossTerms,
    LossWeights,
    combine_losses,
    mask_losses,
    supervised_positions,
    text_ce_loss,
    text_ce_loss_at,
)
from reasonseg.training.optim import build_optimizer, build_scheduler
from reasonseg.training.recipe import DataRecipe, ModelRecipe, TrainRecipe

__all__ = [
    "FrozenImageFeatures",
    "LisaObjective",
    "SampleStream",
    "StepLog",
    "TrainResult",
    "Trainer",
    "build_dataset",
    "build_model",
    "lisa_loss_terms",
]


# ------------------------------------------------------------------------------------------ data order


class SampleStream:
    """Deterministic sample order: epoch e is ``permutation_e(range(n))`` seeded by (seed, e).

    Global micro-batch ``p`` (of ``global_batch`` samples) is stream positions ``[p*G, (p+1)*G)``; a
    position ``s`` is sample ``perm_{s // n}[s % n]`` of epoch ``s // n``.
    """

    def __init__(self, n: int, seed: int, global_batch: int, *, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError("the training dataset is empty")
        self.n, self.seed, self.global_batch, self.shuffle = n, seed, global_batch, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if self.shuffle:
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                self._perms[epoch] = np.arange(self.n)
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
        return self._perms[epoch]

    def batch(self, position: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
        """(index, epoch) pairs of rank ``rank``'s share of global micro-batch ``position``."""
        per = self.global_batch // world_size
        start = position * self.global_batch + rank * per
        return [(int(self._perm(s // self.n)[s % self.n]), s // self.n) for s in range(start, start + per)]


def _image_identity(sample: Any) -> object:
    """What makes two samples' images one image for :meth:`Trainer.prefill_cache`: the file itself
    (device and inode, so the hard links by which synth's two parts share a picture count once, as do
    two paths to one file), else the sample's image id."""
    if isinstance(sample.image, (str, Path)):
        try:
            st = os.stat(sample.image)
            return ("file", st.st_dev, st.st_ino)
        except OSError:
            return ("path", str(sample.image))
    return ("id", sample.image_id)


def _get_sample(dataset: Any, index: int, epoch: int) -> Any:
    getter = getattr(dataset, "get", None)
    if callable(getter):
        try:
            sample = getter(index, epoch)
        except TypeError:
            sample = getter(index)
        if sample is None:  # a reader in skip mode: fall back to its own replacement rule
            sample = dataset[index]
        return sample
    return dataset[index]


_END = object()  # end of the loader


class _MicroBatches(torch.utils.data.Dataset):
    """Item p = this rank's collated share of global micro-batch p (built in a DataLoader worker)."""

    def __init__(self, dataset: Any, stream: SampleStream, collate: Callable, rank: int, world: int) -> None:
        self.dataset, self.stream, self.collate, self.rank, self.world = dataset, stream, collate, rank, world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, position: int) -> Any:
        pairs = self.stream.batch(position, self.rank, self.world)
        return self.collate([_get_sample(self.dataset, i, e) for i, e in pairs])


# --------------------------------------------------------------------------------------- model and data


def build_model(spec: ModelRecipe) -> nn.Module:
    """The ``LisaModel`` a recipe starts from (preset or ``save_pretrained`` directory), in train mode."""
    from reasonseg.model.lisa import LisaModel

    if spec.pretrained is not None:
        model = LisaModel.from_pretrained(spec.pretrained)
    else:
        model = LisaModel.from_preset(spec.preset, tiny=spec.tiny, load_weights=spec.load_base_weights)  # type: ignore[arg-type]
    return model.train()


def build_dataset(spec: DataRecipe, seed: int) -> Any:
    """The training dataset of a recipe: an indexable of ``Sample`` (with ``get(index, epoch)`` when the
    source supports per-epoch variation). Several datasets are mixed by the data package's mixture."""
    if not spec.datasets:
        raise ValueError("data.datasets: the recipe lists no dataset")
    if len(spec.datasets) == 1 and spec.samples_per_epoch is None:
        return _build_one(spec.datasets[0], seed, 0)
    from reasonseg.data.mixture import MixtureDataset

    # Datasets sharing a ``name`` form one source (LISA's "sem_seg" group) at their common rate (the
    # recipe refuses members with different rates), and the mixture picks a member uniformly.
    groups: dict[str, list[Any]] = {}
    rates: dict[str, float] = {}
    for i, d in enumerate(spec.datasets):
        name = d.name or f"{d.kind}#{i}"
        groups.setdefault(name, []).append(_build_one(d, seed, i))
        rates.setdefault(name, d.rate)
    sources = {n: g if len(g) > 1 else g[0] for n, g in groups.items()}
    return MixtureDataset(sources, rates=rates, seed=seed, samples_per_epoch=spec.samples_per_epoch)


def describe_dataset_entry(spec: Any, index: int) -> str:
    """How messages name a recipe's dataset entry: ``data.datasets[2] (name 'vqa', kind llava_instruct,
    path data/llava.json)``."""
    parts = [f"name {spec.name!r}"] if spec.name else []
    parts.append(f"kind {spec.kind}")
    if spec.kind == "callable":
        parts.append(f"target {spec.target}")
    if spec.path is not None:
        parts.append(f"path {spec.path}")
    return f"data.datasets[{index}] ({', '.join(parts)})"


def _callable_target(spec: Any, where: str) -> Callable[..., Any]:
    """The function a ``kind: callable`` entry names, its options checked against its signature."""
    import importlib
    import inspect

    module_name, _, attr = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"{where}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); the module "
            "must be importable by the training process (installed, or its folder on PYTHONPATH)"
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        what = "no attribute" if fn is None else f"a non-callable {type(fn).__name__}"
        raise ValueError(f"{where}: module {module_name!r} ({module.__file__}) has {what} {attr!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to check (a builtin): the call will tell
        return fn
    try:
        signature.bind(**spec.options)
    except TypeError as exc:
        takes = [
            n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        raise ValueError(
            f"{where}: options {sorted(spec.options)} do not fit {spec.target}{signature} ({exc}); "
            f"it takes: {', '.join(takes) or 'no options'}"
        ) from None
    return fn


def _check_samples(data: Any, where: str) -> None:
    """A callable's result must be a non-empty sequence (len and indexing) of ``Sample``."""
    from reasonseg.data.samples import Sample

    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise ValueError(
            f"{where}: returned a {type(data).__name__}, not a sequence with len() and indexing; return a "
            "list (or another sequence) of reasonseg.data.samples.Sample (a generator: wrap it in list())"
        )
    n = len(data)
    if n == 0:
        raise ValueError(f"{where}: returned an empty dataset (0 samples)")
    # every item of an in-memory list; the first of a lazy sequence (items may load images)
    items = enumerate(data) if isinstance(data, (list, tuple)) else [(0, _get_sample(data, 0, 0))]
    for k, item in items:
        if not isinstance(item, Sample):
            raise ValueError(
                f"{where}: item {k} is a {type(item).__module__}.{type(item).__qualname__}, not a "
                "reasonseg.data.samples.Sample"
            )


def _build_one(spec: Any, seed: int, index: int = 0) -> Any:
    """One dataset entry of a recipe; errors name the entry (``data.datasets[i] (...)``)."""
    where = describe_dataset_entry(spec, index)
    if spec.kind == "callable":
        fn = _callable_target(spec, where)
        try:
            data = fn(**spec.options)
        except Exception as exc:
            raise ValueError(
                f"{where}: {spec.target} raised {type(exc).__name__}: {exc} (--debug shows the traceback)"
            ) from exc
        _check_samples(data, where)
        return data
    from reasonseg.data import readers

    factory = getattr(readers, "build_reader", None)
    if factory is None:
        raise ValueError(f"{where}: kind {spec.kind!r} needs reasonseg.data.readers.build_reader")
    if spec.path is None:  # the recipe refuses this; a DatasetSpec built some other way may not
        raise ValueError(f"{where}: kind {spec.kind} needs a path")
    try:
        data = factory(spec.kind, spec.path, mode="train", seed=seed, **spec.options)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if len(data) == 0:
        raise ValueError(f"{where}: the dataset is empty (no record to train on)")
    return data


def build_collator(model: nn.Module, factory: str | None = None) -> Callable[[Sequence[Any]], Any]:
    """The data package's ``LisaCollator`` for this model's tokenizer, template and SAM input size, or
    ``factory(model)`` when a ``"package.module:factory"`` is given."""
    if factory is not None:
        import importlib

        module_name, _, attr = factory.partition(":")
        return getattr(importlib.import_module(module_name), attr)(model)
    from reasonseg.data.collate import LisaCollator
    from reasonseg.data.transforms import SamTransform

    return LisaCollator(
        model.tokenizer,
        model.template,
        SamTransform(target_length=model.sam.image_size),
        model.num_image_tokens,
        max_length=model.config.max_length,
        pad_token_id=model.pad_token_id,
    )


# ---------------------------------------------------------------------------------------- loss terms


def lisa_loss_terms(
    output: Any, batch: Any, weights: LossWeights, *, mask_loss_on_rej: bool = False
) -> LossTerms:
    """Un-normalised CE/BCE/Dice of one micro-batch from a ``LisaOutput`` and its ``LisaBatch``.

    ``batch.masks[i]`` [K_i,H_i,W_i] must have one mask per [SEG]/[REJ] slot of sample i's input_ids;
    [REJ] slots are left out of the mask terms unless ``mask_loss_on_rej``.
    """
    labels = batch.labels.to(output.logits.device)
    logits_at = getattr(output, "logits_at", None)
    if logits_at is None:
        ce_sum, ce_count = text_ce_loss(output.logits, labels)
    elif not bool(logits_at.any()):  # the LM head was skipped (CE weight 0): no CE term
        ce_sum, ce_count = output.hidden_states.new_zeros((), dtype=torch.float32), 0
    else:
        ce_sum, ce_count = text_ce_loss_at(output.logits, labels, logits_at)
    preds: list[torch.Tensor] = []
    gts: list[torch.Tensor] = []
    ignores: list[torch.Tensor | None] = []
    for i, pred in enumerate(output.masks or []):
        gt = torch.as_tensor(batch.masks[i])
        if pred.logits.shape[0] != gt.shape[0]:
            raise ValueError(
                f"sample {i} of the batch: {pred.logits.shape[0]} [SEG]/[REJ] slots in input_ids but "
                f"{gt.shape[0]} target masks (was the answer truncated by max_length?)"
            )
        keep = [j for j, k in enumerate(pred.kinds) if k == "seg" or mask_loss_on_rej]
        preds.append(pred.logits[keep])
        gts.append(gt[keep])
        ign = batch.ignore[i] if getattr(batch, "ignore", None) is not None else None
        ignores.append(None if ign is None else torch.as_tensor(ign, dtype=torch.bool))
    bce_sum, dice_sum, count = mask_losses(preds, gts, ignores, weights=weights)
    return LossTerms(ce_sum, ce_count, bce_sum.to(ce_sum.device), dice_sum.to(ce_sum.device), count)


class LisaObjective(nn.Module):
    """The module data parallelism wraps: model forward + loss terms, returning only the terms.

    Wrapping the objective rather than the model matters for DDP: it looks for unused parameters from
    the forward's outputs, and ``LisaOutput`` carries tensors no loss uses (SAM's IoU prediction), which
    would stall the gradient reduction.

    ``forward(batch, frozen)``: ``frozen`` are cached :class:`FrozenImageFeatures` (the trained projector
    runs here, inside the wrapped module, so its gradients are reduced too) or None (the model encodes).
    Returns :class:`~reasonseg.training.losses.LossTerms`.
    """

    def __init__(self, model: nn.Module, weights: LossWeights, *, mask_loss_on_rej: bool = False) -> None:
        super().__init__()
        self.model = model
        self.weights = weights
        self.mask_loss_on_rej = mask_loss_on_rej

    def forward(self, batch: Any, frozen: FrozenImageFeatures | None = None) -> LossTerms:
        images = None
        if frozen is not None:
            images = image_features(self.model, frozen, batch.resized_hw, batch.original_hw)
        # The LM head only where the CE loss reads it, and nowhere when CE has no weight; the mask
        # decoder only when a mask loss has weight.
        logits_at = supervised_positions(batch.labels)
        if self.weights.ce == 0:
            logits_at = torch.zeros_like(logits_at)
        decode = self.weights.bce != 0 or self.weights.dice != 0
        out = self.model(batch, images=images, logits_at=logits_at, decode_masks=decode)
        return lisa_loss_terms(out, batch, self.weights, mask_loss_on_rej=self.mask_loss_on_rej)


# --------------------------------------------------------------------------------------------- trainer


# Recipe fields that may differ between a run and its ``--resume``: they change neither the model, the
# data order nor the optimisation of the steps already taken (``optim.total_steps`` re-plans the decay
# of the steps still to come; the first resumed step takes its learning rate from the new schedule).
RESUME_SAFE_FIELDS: tuple[str, ...] = (
    "optim.total_steps",
    "train.output_dir",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.progress_bar",
    "train.num_threads",
    "train.find_unused_parameters",
    "data.num_workers",
    "accelerate_config",
)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted names -> leaf values (``data.datasets[0].path``); lists are indexed."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not obj and prefix:
            out[prefix] = {}
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        if not obj:
            out[prefix] = []
        return out
    return {prefix: obj}


_ABSENT = "<absent>"


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted field name -> (old, new) for every field whose value differs (``<absent>`` when missing)."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def check_resume_recipe(
    old: dict[str, Any], new: dict[str, Any], *, where: str
) -> dict[str, tuple[Any, Any]]:
    """Refuse (ValueError naming every field, old -> new) a resume whose recipe differs from the run's in a
    field outside :data:`RESUME_SAFE_FIELDS`; returns the (safe) changes."""
    changes = recipe_changes(old, new)
    bad = {k: v for k, v in changes.items() if k not in RESUME_SAFE_FIELDS}
    if bad:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in bad.items())
        raise ValueError(
            f"--resume: the recipe differs from the one the run in {where} was trained with: {listed}. "
            "Resuming continues that run exactly (its optimizer and schedule state come from the "
            f"checkpoint), so only these fields may change: {', '.join(RESUME_SAFE_FIELDS)}. Undo the "
            "change(s), or start a new run in another train.output_dir"
        )
    return changes


@dataclass
class StepLog:
    """Scalars of one optimiser step (global means over processes and micro-batches)."""

    step: int
    loss: float
    ce: float
    bce: float
    dice: float
    lr: float
    grad_norm: float
    samples_per_s: float
    data_wait: float = float("nan")  # share of the step's wall time spent waiting for the data loader


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    output_dir: Path
    steps: int
    history: list[StepLog] = field(default_factory=list)
    final_checkpoint: Path | None = None
    resumed_from: Path | None = None
    loss_curve: Path | None = None


class Trainer:
    """Builds everything a recipe names and runs the loop.

    ``model``, ``dataset`` and ``collate`` may be given to override what the recipe would build (tests,
    notebooks); ``accelerator`` defaults to one made from the recipe and the launch environment.
    """

    def __init__(
        self,
        recipe: TrainRecipe,
        *,
        model: nn.Module | None = None,
        dataset: Any | None = None,
        collate: Callable[[Sequence[Any]], Any] | None = None,
        accelerator: Any | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.recipe = recipe
        t = recipe.train
        if t.num_threads is not None:
            torch.set_num_threads(t.num_threads)
        if accelerator is None:
            accelerator = Accelerator(
                mixed_precision=t.mixed_precision,
                gradient_accumulation_steps=t.grad_accum,
                cpu=not torch.cuda.is_available(),
                kwargs_handlers=[
                    DistributedDataParallelKwargs(find_unused_parameters=t.find_unused_parameters)
                ],
            )
        self.accelerator = accelerator
        self.output_dir = Path(t.output_dir)
        set_seed(t.seed)  # same on every process: identical initial weights and LoRA init
        self.model = build_model(recipe.model) if model is None else model.train()
        self.plan: TrainablePlan = recipe.freeze.apply(self.model)
        set_frozen_eval(self.model)
        self._dataset_given = dataset is not None
        self.dataset = build_dataset(recipe.data, t.seed) if dataset is None else dataset
        self.collate = build_collator(self.model, recipe.data.collate) if collate is None else collate
        self.loss_weights = recipe.loss.weights()
        self.optimizer = build_optimizer(
            self.plan.parameters(), recipe.optim, no_decay=self.plan.row_params()
        )
        self.scheduler = build_scheduler(self.optimizer, recipe.optim)
        self.cache: EncoderCache | None = None
        if t.encoder_cache:
            self.cache = self._make_cache(Path(t.encoder_cache))

    # ------------------------------------------------------------------------------------ helpers

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    def _make_cache(self, root: Path) -> EncoderCache:
        m = self.model
        frozen = [m.sam.image_encoder, m.mllm.vision_tower]
        if any(p.requires_grad for mod in frozen for p in mod.parameters()):
            raise ValueError(
                "train.encoder_cache needs frozen image encoders (SAM image encoder, vision tower)"
            )
        return frozen_encoder_cache(m, root)

    def _frozen_features(self, batch: Any) -> FrozenImageFeatures | None:
        """The frozen encoders' outputs through the disk cache (None without a cache: the model encodes)."""
        if self.cache is None:
            return None
        return frozen_features(self.model, batch.pixels, batch.resized_hw, self.cache)

    def prefill_cache(self, shard: tuple[int, int] = (0, 1), *, progress: bool = True) -> tuple[int, int]:
        """Encode every distinct training image into ``train.encoder_cache`` before training.

        ``shard=(i, n)`` encodes only the i-th of n interleaved parts, so n processes (one thread each on
        a small CPU) can fill one cache together; the cache's atomic writes make that safe. Every
        dataset of the recipe (or the dataset given to the trainer) is walked whole, not the mixture's
        random draws. Returns (images in this shard, images encoded now); the rest were cached already.
        """
        if self.cache is None:
            raise ValueError("prefill_cache: the recipe sets no train.encoder_cache")
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"prefill_cache: shard must be i/n with 0 <= i < n, got {i}/{n}")
        seen: set[object] = set()
        todo: list[Any] = []
        sources = (
            [self.dataset]
            if self._dataset_given
            else [
                _build_one(spec, self.recipe.train.seed, k)
                for k, spec in enumerate(self.recipe.data.datasets)
            ]
        )
        for ds in sources:
            for k in range(len(ds)):
                sample = _get_sample(ds, k, 0)
                key = _image_identity(sample)
                if key in seen:
                    continue
                seen.add(key)
                if (len(seen) - 1) % n == i:
                    todo.append(sample)
        before = self.cache.stats.misses
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"encode {i}/{n}", unit="image")
        for sample in todo:
            self._frozen_features(self.collate([sample]))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return len(todo), self.cache.stats.misses - before

    @torch.no_grad()
    def standardise_head_input(self, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Data-dependent initialisation of the LISA head (``text_hidden_fcs``), its layout unchanged.

        The LM's hidden states at the positions that predict [SEG]/[REJ] share a large common component
        (different questions give cosine similarities of 0.92-0.98 with SmolLM2), so a randomly
        initialised head maps them to almost the same SAM prompt and the mask decoder learns to ignore
        it. The first linear layer W x + b is rewritten as W ((x - mu) / sigma) + b, with mu and sigma
        the per-feature mean and standard deviation of those hidden states over ``n_samples`` training
        samples (fixed draws, the same on every process): the head starts on standardised inputs.
        Returns (mu [H], sigma [H]).
        """
        m = self.model
        draws = SampleStream(len(self.dataset), self.recipe.train.seed + 1, 1)
        per_batch = self.recipe.train.micro_batch_size
        states: list[torch.Tensor] = []
        was_training = m.training
        m.eval()
        try:
            for start in range(0, n_samples, per_batch):
                pairs = [draws.batch(k)[0] for k in range(start, min(start + per_batch, n_samples))]
                batch = self.collate([_get_sample(self.dataset, i, e) for i, e in pairs])
                frozen = self._frozen_features(batch)
                images = (
                    None if frozen is None else image_features(m, frozen, batch.resized_hw, batch.original_hw)
                )
                out = m(
                    batch,
                    images=images,
                    decode_masks=False,
                    logits_at=torch.zeros_like(batch.input_ids, dtype=torch.bool),
                )
                states += [out.hidden_states[i, pos - 1] for i, pos in enumerate(out.slot_positions)]
        finally:
            m.train(was_training)
            set_frozen_eval(m)
        hidden = torch.cat(states).float()
        if hidden.shape[0] < 2:
            raise ValueError(
                f"head_init_samples: {n_samples} samples gave {hidden.shape[0]} slot states; need >= 2"
            )
        mu = hidden.mean(0)
        sigma = hidden.std(0)
        sigma = sigma.clamp_min(1e-3 * float(sigma.mean()) + 1e-12)
        first = m.text_hidden_fcs[0]
        first.weight.data.div_(sigma.to(first.weight.dtype))
        first.bias.data.sub_(first.weight.data @ mu.to(first.weight.dtype))
        return mu, sigma

    def _loader(self, stream: SampleStream, start: int, end: int) -> torch.utils.data.DataLoader:
        ds = _MicroBatches(self.dataset, stream, self.collate, self.rank, self.world_size)
        workers = self.recipe.data.num_workers
        # The loader's own generator: creating its iterator draws the workers' base seed from it, not
        # from torch's global RNG (which LoRA dropout uses and a resume restores). Seeded by the data
        # position: a pure function of the recipe and the checkpoint.
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.recipe.train.seed, start, self.rank]).generate_state(1)[0])
        )
        return torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            sampler=range(start, end),
            num_workers=workers,
            persistent_workers=False,
            generator=generator,
        )

    @property
    def _engine_state(self) -> bool:
        """DeepSpeed and FSDP shard optimizer state across processes: accelerate's save_state writes it."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    def _checkpoint(self, step: int, position: int, history: list[StepLog]) -> Path:
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        engine = self._engine_state
        return save_checkpoint(
            root,
            step,
            trainable=self.plan.state_dict(),
            optimizer_state={} if engine else self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            trainer_state={
                "data_position": position,
                "history": [dataclasses.asdict(h) for h in history],
                "recipe": self.recipe.to_dict(),  # what --resume compares its recipe with
            },
            rank=self.rank,
            world_size=self.world_size,
            barrier=acc.wait_for_everyone,
            keep_last=self.recipe.train.keep_checkpoints,
            extra_writer=(lambda tmp: acc.save_state(str(tmp / "accelerate_state"))) if engine else None,
        )

    def _resume(self) -> tuple[int, int, list[StepLog], Path | None]:
        ckpt = latest_checkpoint(self.output_dir / "checkpoints")
        if ckpt is None:
            return 0, 0, [], None
        loaded = load_checkpoint(ckpt, rank=self.rank, world_size=self.world_size)
        saved = self._saved_recipe(loaded.trainer_state)
        if saved is not None:
            check_resume_recipe(saved, self.recipe.to_dict(), where=str(self.output_dir))
        total = self.recipe.optim.total_steps
        if loaded.step > total:
            raise ValueError(
                f"--resume: {ckpt} is at step {loaded.step}, beyond optim.total_steps={total}; "
                f"give optim.total_steps >= {loaded.step}"
            )
        self.plan.load_state_dict(loaded.trainable)
        if self._engine_state:
            self._pending_engine_state = ckpt / "accelerate_state"  # loaded after accelerator.prepare
        else:
            self.optimizer.load_state_dict(loaded.optimizer_state)
        self.scheduler.load_state_dict(loaded.scheduler_state)
        # Restored by fit() just before the first step: whatever runs in between (accelerate's prepare,
        # building the loader) must not shift the stream the next dropout masks are drawn from.
        self._resume_rng_state = loaded.rng_state
        history = [StepLog(**h) for h in loaded.trainer_state.get("history", [])]
        return loaded.step, int(loaded.trainer_state["data_position"]), history, ckpt

    def _saved_recipe(self, trainer_state: dict[str, Any]) -> dict[str, Any] | None:
        """The recipe the run was trained with: the checkpoint's own (written since it records it), else
        the run's ``recipe.yaml``; None when neither exists."""
        saved = trainer_state.get("recipe")
        if not isinstance(saved, dict):
            path = self.output_dir / "recipe.yaml"
            if not path.is_file():
                return None
            import yaml

            saved = yaml.safe_load(path.read_text())
            if not isinstance(saved, dict):
                return None
        from reasonseg.training.recipe import recipe_from_dict

        try:  # fields added to the recipe since the run was written count at their defaults
            return recipe_from_dict(saved, source="<saved recipe>").to_dict()
        except ValueError:
            return saved

    def _apply_schedule(self) -> None:
        """Set every group's lr to the (possibly re-planned) schedule's value at the current step: the
        optimizer state of a checkpoint holds the old schedule's lr (0 at the end of a finished run,
        whose total_steps a resume may extend). With an unchanged schedule the values are the same."""
        sched = self.scheduler
        groups = self.optimizer.param_groups
        for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports

    # ---------------------------------------------------------------------------------------- fit

    def fit(self, *, resume: bool = False, max_steps: int | None = None) -> TrainResult:
        """Train to ``optim.total_steps`` (or stop after ``max_steps`` optimiser steps in this call).

        ``resume``: continue from the newest complete checkpoint in ``<output_dir>/checkpoints`` (a fresh
        start when there is none). Without it, an ``output_dir`` that already holds checkpoints is
        refused: a fresh start there would overwrite them (and rotate the old run's away).
        """
        acc = self.accelerator
        r, t = self.recipe, self.recipe.train
        total = r.optim.total_steps
        existing = list_checkpoints(self.output_dir / "checkpoints")
        if existing and not resume:
            raise ValueError(
                f"{self.output_dir} already holds checkpoints (newest {existing[-1].name}); resume that run "
                "(--resume) or choose another train.output_dir"
            )
        step, position, history, resumed = self._resume() if resume else (0, 0, [], None)
        if resumed is not None and step >= total:
            self._resume_rng_state = None
            if acc.is_main_process:
                print(
                    f"{self.output_dir}: already finished at step {step} of optim.total_steps={total} "
                    f"({resumed.name}); nothing to train (raise optim.total_steps to train longer)",
                    file=sys.stderr,
                )
            curve = self.output_dir / "loss_curve.png"
            return TrainResult(
                self.output_dir, step, history, resumed, resumed, curve if curve.is_file() else None
            )
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(r.to_yaml())
        if resumed is None and step == 0 and t.head_init_samples > 0:
            if acc.num_processes == 1:
                # on the GPU when there is one (prepare below puts it there anyway): on the host, the
                # samples' image encoder passes took minutes of a GPU lease
                self.model.to(acc.device)
            self.standardise_head_input(t.head_init_samples)
        objective = LisaObjective(self.model, self.loss_weights, mask_loss_on_rej=r.loss.mask_loss_on_rej)
        objective, optimizer = acc.prepare(objective, self.optimizer)
        pending = getattr(self, "_pending_engine_state", None)
        if pending is not None:
            acc.load_state(str(pending))
        if resumed is not None:
            self._apply_schedule()
        global_batch = t.micro_batch_size * self.world_size
        stream = SampleStream(len(self.dataset), t.seed, global_batch)
        stop = total if max_steps is None else min(total, step + max_steps)
        micro_total = (stop - step) * t.grad_accum
        loader = self._loader(stream, position, position + micro_total)
        writer, bar = self._loggers(step, total)
        accum: dict[str, float] = {"loss": 0.0, "ce": 0.0, "bce": 0.0, "dice": 0.0}
        t_step = time.perf_counter()
        last_ckpt: Path | None = None
        params = self.plan.parameters()
        batches = iter(loader)
        rng_state = getattr(self, "_resume_rng_state", None)
        if rng_state is not None:
            # Last thing before the loop: the checkpoint's RNG state is the state the uninterrupted run
            # had when it went on to the next step (LoRA dropout draws from it), so nothing may draw
            # from it in between.
            restore_rng_state(rng_state)
            self._resume_rng_state = None
        waited = 0.0  # seconds blocked on the loader during this optimiser step
        try:
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, _END)
                if batch is _END:
                    break
                waited += time.perf_counter() - t_wait
                with acc.accumulate(objective):
                    terms = objective(batch, self._frozen_features(batch))
                    counts = torch.tensor(
                        [terms.ce_count, terms.mask_count], dtype=torch.float64, device=acc.device
                    )
                    counts = acc.reduce(counts, reduction="sum") / self.world_size
                    parts = combine_losses(
                        terms, self.loss_weights, ce_count=float(counts[0]), mask_count=float(counts[1])
                    )
                    acc.backward(parts["loss"])
                    grad_norm = float("nan")
                    if acc.sync_gradients and r.optim.grad_clip > 0:
                        norm = acc.clip_grad_norm_(params, r.optim.grad_clip)  # None under DeepSpeed
                        grad_norm = float(norm) if norm is not None else float("nan")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                position += 1
                logged = torch.stack([parts[k].detach().float() for k in accum])
                logged = acc.reduce(logged, reduction="mean")
                for k, v in zip(accum, logged.tolist(), strict=True):
                    accum[k] += v / t.grad_accum
                if not acc.sync_gradients:
                    continue
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                step += 1
                now = time.perf_counter()
                elapsed = max(now - t_step, 1e-9)
                rate = global_batch * t.grad_accum / elapsed
                wait_share = waited / elapsed
                t_step, waited = now, 0.0
                log = StepLog(
                    step,
                    accum["loss"],
                    accum["ce"],
                    accum["bce"],
                    accum["dice"],
                    lr,
                    grad_norm,
                    rate,
                    wait_share,
                )
                history.append(log)
                accum = dict.fromkeys(accum, 0.0)
                self._log(log, writer, bar)
                if step % t.checkpoint_every == 0 or step == stop:
                    last_ckpt = self._checkpoint(step, position, history)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        curve = None
        if acc.is_main_process and history:
            curve = write_loss_curve(history, self.output_dir / "loss_curve.png")
            (self.output_dir / "history.json").write_text(
                json.dumps([dataclasses.asdict(h) for h in history])
            )
        acc.wait_for_everyone()
        return TrainResult(self.output_dir, step, history, last_ckpt, resumed, curve)

    def _loggers(self, step: int, total: int) -> tuple[Any, Any]:
        if not self.accelerator.is_main_process:
            return None, None
        from tqdm.auto import tqdm

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            import warnings

            warnings.warn(
                "tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)", stacklevel=2
            )
            writer = None
        else:
            writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        bar = None
        if self.recipe.train.progress_bar:
            bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
        return writer, bar

    def _log(self, log: StepLog, writer: Any, bar: Any) -> None:
        if writer is not None and log.step % self.recipe.train.log_every == 0:
            for key in ("loss", "ce", "bce", "dice", "lr", "grad_norm", "samples_per_s", "data_wait"):
                value = getattr(log, key)
                if math.isfinite(value):
                    writer.add_scalar(f"train/{key}", value, log.step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{log.loss:.4f}",
                lr=f"{log.lr:.2e}",
                samples_s=f"{log.samples_per_s:.2f}",
                data_wait=f"{log.data_wait:.0%}",
            )


def write_loss_curve(history: Sequence[StepLog], path: Path) -> Path | None:
    """PNG of the total loss and its three terms against the optimiser step (None without matplotlib;
    ``history.json`` beside it holds the same numbers)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h.step for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [h.loss for h in history], label="loss", linewidth=2)
    for key in ("ce", "bce", "dice"):
        ax.plot(steps, [getattr(h, key) for h in history], label=key, linewidth=1, alpha=0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
