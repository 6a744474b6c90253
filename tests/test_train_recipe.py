"""Recipes and launch configs: the shipped files parse, validate, and build with the tiny preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reasonseg.training.recipe import RecipeError, TrainRecipe, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def test_lisa_7b_recipe_has_the_paper_settings() -> None:
    r = load_recipe(RECIPES / "lisa-7b.yaml")
    assert (r.loss.ce, r.loss.bce, r.loss.dice) == (1.0, 2.0, 0.5)
    assert (r.freeze.lora.r, r.freeze.lora.alpha, r.freeze.lora.dropout) == (8, 16.0, 0.05)
    assert r.freeze.lora.targets == ("q_proj", "v_proj") and not r.freeze.train_projector
    o = r.optim
    assert (o.lr, o.weight_decay, o.betas, o.warmup_steps, o.grad_clip) == (3e-4, 0.0, (0.9, 0.95), 100, 1.0)
    assert (r.train.micro_batch_size, r.train.grad_accum, r.train.mixed_precision) == (2, 10, "bf16")
    rates = {d.name: d.rate for d in r.data.datasets}
    assert rates == {"sem_seg": 9, "refer_seg": 3, "vqa": 3, "reason_seg": 1}
    assert r.accelerate_config == "recipes/accelerate/zero2.yaml"
    assert load_recipe(RECIPES / "lisa-mobile.yaml").freeze.train_projector


def test_errors_name_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {grad_accum: 0}\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: train: grad_accum: must be >= 1"):
        load_recipe(bad)
    bad.write_text("optim: {lr: fast}\n")
    with pytest.raises(RecipeError, match=r"optim\.lr: expected float"):
        load_recipe(bad)
    bad.write_text("freeze: {lora: {rank: 8}}\n")
    with pytest.raises(RecipeError, match=r"freeze\.lora: unknown field\(s\) \['rank'\]"):
        load_recipe(bad)
    bad.write_text("trian: {}\n")
    with pytest.raises(RecipeError, match="unknown section"):
        load_recipe(bad)
    bad.write_text("data: {datasets: [{kind: callable}]}\n")
    with pytest.raises(RecipeError, match=r"data\.datasets\[0\]: kind 'callable' needs target"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="is a directory, not a recipe file"):
        load_recipe(tmp_path)


def test_overrides_and_round_trip(tmp_path: Path) -> None:
    r = load_recipe(
        RECIPES / "lisa-mobile.yaml", ["train.seed=7", "optim.betas=[0.8, 0.9]", "freeze.lora.r=4"]
    )
    assert r.train.seed == 7 and r.optim.betas == (0.8, 0.9) and r.freeze.lora.r == 4
    again = tmp_path / "again.yaml"
    again.write_text(r.to_yaml())
    assert load_recipe(again) == r
    assert isinstance(recipe_from_dict({}), TrainRecipe)


def test_7b_recipe_plumbing_builds_with_the_tiny_preset(tmp_path: Path) -> None:
    from peft.tuners.lora import LoraLayer

    from reasonseg.training.trainer import Trainer, build_model
    from train_support import collator_for, make_samples

    r = load_recipe(RECIPES / "lisa-7b.yaml").replace(
        model={"tiny": True, "load_base_weights": False},
        train={"output_dir": str(tmp_path), "mixed_precision": "no"},
    )
    model = build_model(r.model)
    # LISA-7B-v1's vocabulary has [SEG] but no [REJ]: the real collator handles it
    trainer = Trainer(r, model=model, dataset=make_samples(2), collate=collator_for(model))
    batch = trainer.collate(make_samples(2))
    assert batch.input_ids.shape[0] == 2
    lora = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora) == 2 * model.mllm.lm.config.num_hidden_layers
    groups = trainer.optimizer.param_groups
    assert groups[0]["betas"] == (0.9, 0.95) and groups[0]["lr"] == pytest.approx(3e-4 / 100)
    assert trainer.accelerator.gradient_accumulation_steps == 10
    assert trainer.accelerator.num_processes == 1


def test_accelerate_configs_parse_and_build_their_plugins() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    ddp = load_config_from_file(str(RECIPES / "accelerate" / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU

    z2 = load_config_from_file(str(RECIPES / "accelerate" / "zero2.yaml"))
    assert z2.distributed_type == DistributedType.DEEPSPEED and z2.mixed_precision == "bf16"
    ds = DeepSpeedPlugin(**z2.deepspeed_config)
    assert ds.deepspeed_config["zero_optimization"]["stage"] == 2
    assert (
        ds.deepspeed_config["gradient_accumulation_steps"]
        == load_recipe(RECIPES / "lisa-7b.yaml").train.grad_accum
    )

    fs = load_config_from_file(str(RECIPES / "accelerate" / "fsdp.yaml"))
    assert fs.distributed_type == DistributedType.FSDP
    cfg = dict(fs.fsdp_config)
    layer_cls = cfg.pop("fsdp_transformer_layer_cls_to_wrap")
    renames = {"fsdp_offload_params": "cpu_offload", "fsdp_version": "fsdp_version"}
    kwargs = {renames.get(k, k.removeprefix("fsdp_")): v for k, v in cfg.items()}
    assert kwargs.pop("sync_module_states") is True  # needs an accelerator device to construct
    plugin = FullyShardedDataParallelPlugin(transformer_cls_names_to_wrap=[layer_cls], **kwargs)
    assert plugin.transformer_cls_names_to_wrap == [layer_cls]
    # The layer class FSDP wraps exists in the (tiny) LISA-7B LM.
    from reasonseg.model.config import LisaConfig
    from reasonseg.model.lm import build_causal_lm

    lm = build_causal_lm(LisaConfig.from_preset("lisa-7b-v1", tiny=True).lm.hf_config)
    assert any(type(m).__name__ == layer_cls for m in lm.modules())
    torch.manual_seed(0)


def test_datasets_with_one_name_form_one_mixture_source() -> None:
    from reasonseg.training.trainer import build_dataset

    r = recipe_from_dict(
        {
            "data": {
                "samples_per_epoch": 12,
                "datasets": [
                    {
                        "name": "a",
                        "kind": "callable",
                        "target": "train_support:toy_dataset",
                        "rate": 3,
                        "options": {"n": 2},
                    },
                    {
                        "name": "a",
                        "kind": "callable",
                        "target": "train_support:toy_dataset",
                        "rate": 3,
                        "options": {"n": 3, "seed": 1},
                    },
                    {
                        "name": "b",
                        "kind": "callable",
                        "target": "train_support:toy_dataset",
                        "rate": 1,
                        "options": {"n": 1, "seed": 2},
                    },
                ],
            }
        }
    )
    mix = build_dataset(r.data, seed=0)
    assert len(mix) == 12 and mix.names == ["a", "b"]
    assert list(mix.rates) == pytest.approx([0.75, 0.25])
    assert mix.get(5, epoch=1).image_id == mix.get(5, epoch=1).image_id  # deterministic by (index, epoch)


def test_reader_option_typos_fail_when_the_recipe_is_read(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(
        "data:\n  datasets:\n"
        "    - {name: synth, kind: synth, path: nowhere, options: {fixed_answer: true}}\n"
        "    - {name: reason, kind: reason_seg, path: nowhere, options: {explanatry_rate: 0.0}}\n"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)  # before any model loads, and before the (missing) data is opened
    message = str(err.value)
    assert message.startswith(f"{bad}: data.datasets[1]: dataset 'reason' (kind reason_seg)")
    assert "unknown option(s) ['explanatry_rate']" in message
    assert "reason_seg takes: explanatory_rate, fixed_answer, skip_malformed, split" in message
    bad.write_text("data: {datasets: [{kind: refcoco, path: x, options: {seed: 3}}]}\n")
    with pytest.raises(RecipeError, match=r"unknown option\(s\) \['seed'\].*set by the trainer"):
        load_recipe(bad)
    bad.write_text("data: {datasets: [{kind: refcocoo, path: x}]}\n")
    with pytest.raises(
        RecipeError, match=r"datasets\[0\]: unknown kind 'refcocoo'; known: callable, reason_seg"
    ):
        load_recipe(bad)


def test_build_reader_names_options_its_reader_does_not_take(tmp_path: Path) -> None:
    from reasonseg.data.readers import build_reader, reader_options

    assert "per_instance" in reader_options("grefcoco") and "image_root" in reader_options("refcoco")
    assert "image_root" not in reader_options("paco_lvis")  # build_reader sets it from the path
    with pytest.raises(
        ValueError, match=r"'ade20k' takes no option\(s\) \['clases_per_sample'\].*classes_per"
    ):
        build_reader("ade20k", tmp_path, clases_per_sample=2)


def test_datasets_of_one_name_with_different_rates_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "rates.yaml"
    bad.write_text(
        "data:\n  datasets:\n"
        "    - {name: a, kind: callable, target: 'm:f', rate: 3}\n"
        "    - {name: b, kind: callable, target: 'm:f', rate: 1}\n"
        "    - {name: a, kind: callable, target: 'm:g'}\n"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    message = str(err.value)
    assert "datasets[0] and datasets[2] share name 'a' but give different rates (3 and 1.0)" in message


def test_dataset_entries_need_a_path_for_readers_and_none_for_callables(tmp_path: Path) -> None:
    bad = tmp_path / "paths.yaml"
    bad.write_text("data: {datasets: [{kind: callable, target: 'm:f'}, {kind: reason_seg}]}\n")
    with pytest.raises(RecipeError, match=r"data\.datasets\[1\]: kind 'reason_seg' needs path"):
        load_recipe(bad)
    bad.write_text("data: {datasets: [{kind: callable, target: 'm:f', path: /x}]}\n")
    with pytest.raises(RecipeError, match=r"data\.datasets\[0\]: kind 'callable' takes no path \(got '/x'\)"):
        load_recipe(bad)
    bad.write_text("data: {datasets: [{kind: refcoco, path: x, target: 'm:f'}]}\n")
    with pytest.raises(RecipeError, match=r"datasets\[0\]: target applies only to kind 'callable'"):
        load_recipe(bad)
