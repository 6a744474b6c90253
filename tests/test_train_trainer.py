"""Trainer pieces: the deterministic sample stream, LISA's loss terms on model outputs, bf16 steps."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reasonseg.training.losses import LossWeights
from reasonseg.training.trainer import SampleStream, lisa_loss_terms


def test_stream_is_deterministic_and_ranks_partition_the_global_batch() -> None:
    one = SampleStream(10, seed=3, global_batch=4)
    two = SampleStream(10, seed=3, global_batch=4)
    for p in range(6):  # crosses epoch boundaries (10 is not a multiple of 4)
        full = one.batch(p)
        assert full == two.batch(p)
        assert two.batch(p, 0, 2) + two.batch(p, 1, 2) == full
    epoch0 = [i for p in range(2) for i, _ in one.batch(p)] + [i for i, e in one.batch(2) if e == 0]
    assert sorted(epoch0) == list(range(10))  # every sample once per epoch
    assert [i for i, _ in SampleStream(10, seed=4, global_batch=4).batch(0)] != [i for i, _ in one.batch(0)]


def _output(kinds: list[list[str]], size: int = 4) -> SimpleNamespace:
    masks = [
        SimpleNamespace(logits=torch.zeros(len(k), size, size, requires_grad=True), kinds=k) for k in kinds
    ]
    return SimpleNamespace(logits=torch.zeros(len(kinds), 5, 7, requires_grad=True), masks=masks)


def test_rej_slots_are_left_out_of_mask_terms_unless_asked() -> None:
    out = _output([["seg", "rej"], ["seg"]])
    labels = torch.full((2, 5), -100)
    labels[:, 3] = 1
    batch = SimpleNamespace(
        labels=labels,
        masks=[torch.ones(2, 4, 4), torch.ones(1, 4, 4)],
        ignore=[None, None],
    )
    terms = lisa_loss_terms(out, batch, LossWeights())
    assert terms.mask_count == 2 and terms.ce_count == 2
    assert terms.bce_sum.item() == pytest.approx(2 * math.log(2.0), rel=1e-6)
    assert terms.ce_sum.item() == pytest.approx(2 * math.log(7.0), rel=1e-6)
    assert lisa_loss_terms(out, batch, LossWeights(), mask_loss_on_rej=True).mask_count == 3


def test_slot_and_mask_counts_must_agree() -> None:
    out = _output([["seg", "seg"]])
    batch = SimpleNamespace(labels=torch.full((1, 5), -100), masks=[torch.ones(1, 4, 4)], ignore=None)
    with pytest.raises(ValueError, match=r"sample 0 of the batch: 2 \[SEG\]/\[REJ\] slots .* 1 target masks"):
        lisa_loss_terms(out, batch, LossWeights())


def _tiny_recipe(out: Path, total_steps: int = 1, **train: object):  # type: ignore[no-untyped-def]
    """A recipe for the tiny lisa-mobile on one thread, no progress bar; ``train`` adds train fields."""
    from reasonseg.training.recipe import recipe_from_dict

    fields = {"output_dir": str(out), "progress_bar": False, "num_threads": 1, **train}
    return recipe_from_dict(
        {
            "model": {"preset": "lisa-mobile", "tiny": True},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "total_steps": total_steps},
            "train": fields,
        }
    )


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_bf16_mixed_precision_steps_run_on_cpu(tmp_path: Path) -> None:
    from reasonseg.training.trainer import Trainer, build_model
    from train_support import collator_for, make_samples

    recipe = _tiny_recipe(tmp_path, total_steps=2, micro_batch_size=2, grad_accum=2, mixed_precision="bf16")
    model = build_model(recipe.model)
    trainer = Trainer(recipe, model=model, dataset=make_samples(4), collate=collator_for(model))
    result = trainer.fit()
    assert result.steps == 2 and all(math.isfinite(h.loss) for h in result.history)
    assert all(p.dtype == torch.float32 for p in trainer.plan.parameters())  # master weights stay fp32
    # the share of each step spent blocked on the loader (in-process loader: collation counts as waiting)
    assert all(0.0 < h.data_wait < 1.0 for h in result.history)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_head_input_standardisation_rewrites_the_first_layer_exactly(tmp_path: Path) -> None:
    from reasonseg.training.recipe import recipe_from_dict
    from reasonseg.training.trainer import Trainer, build_model
    from train_support import collator_for, make_samples

    recipe = _tiny_recipe(tmp_path, total_steps=1, micro_batch_size=2, head_init_samples=4)
    model = build_model(recipe.model)
    trainer = Trainer(recipe, model=model, dataset=make_samples(4), collate=collator_for(model))
    first = model.text_hidden_fcs[0]
    w0, b0 = first.weight.detach().clone(), first.bias.detach().clone()
    mu, sigma = trainer.standardise_head_input(4)
    assert model.training  # the mode is restored
    x = torch.randn(3, w0.shape[1])
    expected = ((x - mu) / sigma) @ w0.T + b0
    torch.testing.assert_close(first(x), expected, atol=1e-4, rtol=1e-4)
    # fit() runs it once on a fresh run, before the first step
    calls: list[int] = []
    trainer.standardise_head_input = lambda n: calls.append(n)  # type: ignore[method-assign]
    trainer.fit()
    assert calls == [4]
    # The run now holds a checkpoint: a fresh start there would overwrite it, so only resume may use it.
    with pytest.raises(ValueError, match=r"already holds checkpoints \(newest step-00000001\); resume"):
        trainer.fit()
    with pytest.raises(ValueError, match="head_init_samples"):
        recipe_from_dict({"train": {"head_init_samples": -1}})


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_prefill_cache_shards_encode_each_distinct_image_once(tmp_path: Path) -> None:
    from reasonseg.training.trainer import Trainer, build_model
    from train_support import collator_for, make_samples

    recipe = _tiny_recipe(tmp_path / "run", encoder_cache=str(tmp_path / "cache"))
    model = build_model(recipe.model)
    samples = make_samples(3)
    samples.append(samples[0])  # the same image twice: encoded once
    trainer = Trainer(recipe, model=model, dataset=samples, collate=collator_for(model))
    got = [trainer.prefill_cache((i, 2), progress=False) for i in range(2)]
    assert got == [(2, 2), (1, 1)]
    assert trainer.prefill_cache((0, 1), progress=False) == (3, 0)  # everything cached now
    with pytest.raises(ValueError, match="shard"):
        trainer.prefill_cache((2, 2))


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_prefill_cache_counts_a_hard_linked_file_once(tmp_path: Path) -> None:
    """synth writes each picture once and hard-links it into its second format: two names, one image."""
    import dataclasses
    import os

    from PIL import Image

    from reasonseg.training.trainer import Trainer, build_model
    from train_support import collator_for, make_samples

    recipe = _tiny_recipe(tmp_path / "run", encoder_cache=str(tmp_path / "cache"))
    model = build_model(recipe.model)
    base = make_samples(2)
    paths = []
    for k, s in enumerate(base):
        paths.append(tmp_path / f"a{k}.png")
        Image.fromarray(s.image).save(paths[-1])
    os.link(paths[0], tmp_path / "b0.png")
    names = [paths[0], paths[1], tmp_path / "b0.png", tmp_path / "." / "a1.png"]
    samples = [dataclasses.replace(base[k % 2], image=str(p), image_id=f"s{k}") for k, p in enumerate(names)]
    trainer = Trainer(recipe, model=model, dataset=samples, collate=collator_for(model))
    assert trainer.prefill_cache((0, 1), progress=False) == (2, 2)


def test_objective_runs_only_the_heads_its_weights_use() -> None:
    """CE weight 0: no LM head; BCE and Dice weight 0: no mask decoder, and only the CE term."""
    from lisa_tiny_helpers import tiny_model
    from reasonseg.training.trainer import LisaObjective
    from train_support import collator_for, make_samples

    model = tiny_model("lisa-mobile")
    batch = collator_for(model)(make_samples(2))
    calls: list[bool] = []
    model.sam.mask_decoder.register_forward_hook(lambda *_: calls.append(True))
    terms = LisaObjective(model, LossWeights(ce=1.0, bce=0.0, dice=0.0))(batch)
    assert not calls and terms.mask_count == 0 and terms.ce_count > 0 and terms.ce_sum.requires_grad
    terms = LisaObjective(model, LossWeights(ce=0.0))(batch)
    assert calls and terms.mask_count > 0 and terms.ce_count == 0


_USER_MODULE = """
from reasonseg.data.samples import Sample


def make(n, size=32):
    from train_support import make_samples

    return make_samples(n, size)


def gen(n=2):
    yield from make(n)


def dicts():
    return [{"image": "a.jpg"}]


def empty():
    return []


def broken():
    return Sample(image=None)


not_a_function = 3
"""


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"target": "nosuchmod_xyz.data:make"},
            r"cannot import module 'nosuchmod_xyz\.data' \(ModuleNotFoundError",
        ),
        (
            {"target": "usermod_ds:nothere"},
            r"module 'usermod_ds' \(.*usermod_ds\.py\) has no attribute 'nothere'",
        ),
        ({"target": "usermod_ds:not_a_function"}, r"has a non-callable int 'not_a_function'"),
        (
            {"target": "usermod_ds:make", "options": {"nn": 3}},
            r"options \['nn'\] do not fit usermod_ds:make\(n, size=32\) .*it takes: n, size",
        ),
        ({"target": "usermod_ds:make"}, r"options \[\] do not fit .*missing a required argument: 'n'"),
        ({"target": "usermod_ds:gen"}, r"returned a generator, not a sequence .*wrap it in list\(\)"),
        (
            {"target": "usermod_ds:dicts"},
            r"item 0 is a builtins\.dict, not a reasonseg\.data\.samples\.Sample",
        ),
        ({"target": "usermod_ds:empty"}, r"returned an empty dataset"),
        ({"target": "usermod_ds:broken"}, r"usermod_ds:broken raised TypeError: .*--debug"),
    ],
)
def test_callable_dataset_errors_name_the_recipe_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: dict, expected: str
) -> None:
    """Each is a ``reasonseg train: error:`` line naming ``data.datasets[1]``, not a traceback."""
    from reasonseg.training.recipe import recipe_from_dict
    from reasonseg.training.trainer import build_dataset

    (tmp_path / "usermod_ds.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    good = {"name": "ok", "kind": "callable", "target": "usermod_ds:make", "options": {"n": 2}}
    bad = {"name": "mine", "kind": "callable", **entry}
    recipe = recipe_from_dict({"data": {"datasets": [good, bad]}})
    with pytest.raises(
        ValueError, match=r"^data\.datasets\[1\] \(name 'mine', kind callable, target "
    ) as err:
        build_dataset(recipe.data, seed=0)
    assert err.match(expected)
    ok = recipe_from_dict({"data": {"datasets": [good]}})
    assert len(build_dataset(ok.data, seed=0)) == 2


def test_an_empty_reader_dataset_names_the_entry_and_its_path(tmp_path: Path) -> None:
    from reasonseg.training.recipe import recipe_from_dict
    from reasonseg.training.trainer import build_dataset

    llava = tmp_path / "llava.json"
    llava.write_text("[]")
    entries = [
        {"kind": "callable", "target": "train_support:toy_dataset"},
        {
            "name": "vqa",
            "kind": "llava_instruct",
            "path": str(llava),
            "options": {"image_root": str(tmp_path)},
        },
    ]
    recipe = recipe_from_dict({"data": {"datasets": entries}})
    with pytest.raises(ValueError) as err:
        build_dataset(recipe.data, seed=0)
    assert str(err.value).startswith(f"data.datasets[1] (name 'vqa', kind llava_instruct, path {llava}): "), (
        str(err.value)
    )
    missing = tmp_path / "nowhere"
    entries[1] = {"kind": "reason_seg", "path": str(missing)}
    with pytest.raises(ValueError, match=rf"^data\.datasets\[1\] \(kind reason_seg, path {missing}\): "):
        build_dataset(recipe_from_dict({"data": {"datasets": entries}}).data, seed=0)
