"""The real LisaModel (tiny random lisa-mobile) through the evaluation: both modes, batching, the encoder
cache, and the ``reasonseg eval`` command on a ReasonSeg-format fixture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from reasonseg.evaluation.lisa_segmenter import LisaSegmenter
from reasonseg.evaluation.protocols import build_protocol
from reasonseg.evaluation.runner import RunConfig, run_evaluation
from test_eval_protocols import write_grefcoco, write_reasonseg

if TYPE_CHECKING:
    from reasonseg.model import LisaModel


@pytest.fixture(scope="module")
def tiny_model() -> LisaModel:
    from reasonseg.model import LisaModel

    torch.manual_seed(0)
    return LisaModel.from_preset("lisa-mobile", tiny=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaldata")
    return {"reasonseg": write_reasonseg(root / "RS"), "grefcoco": write_grefcoco(root / "G")}


def test_teacher_forced_masks_are_the_models_forward(
    tiny_model: LisaModel, data: dict[str, Path], tmp_path: Path
) -> None:
    from reasonseg.data.conversation import encode_conversation

    proto = build_protocol(f"grefcoco:{data['grefcoco']}:val")
    seg = LisaSegmenter(tiny_model)
    item = proto.items[0].loaded()
    res = seg.segment([item], "teacher-forced")[0]
    s = item.load()
    ids = encode_conversation(
        tiny_model.tokenizer, tiny_model.template, s.turns, tiny_model.num_image_tokens
    ).input_ids
    feats = seg.encode([s.load_image()])
    with torch.no_grad():
        out = tiny_model.forward(input_ids=ids[None], images=feats)
    assert out.kinds[0] == ["seg", "rej"]  # the reference answer's slots, in order
    assert np.array_equal(res.masks, (out.masks[0].logits > 0).numpy())
    assert res.rejected == out.predicted_rej[0].tolist()  # the model's own [SEG]/[REJ] choice per slot


def test_batching_and_encoder_cache_do_not_change_results(
    tiny_model: LisaModel, data: dict[str, Path], tmp_path: Path
) -> None:
    proto = build_protocol(f"reasonseg:{data['reasonseg']}:val")
    runs = {}
    cached = LisaSegmenter(tiny_model, cache_dir=tmp_path / "cache")
    for name, seg, bs in (
        ("b1", LisaSegmenter(tiny_model), 1),
        ("b3", LisaSegmenter(tiny_model), 3),
        ("cold", cached, 2),
        ("warm", cached, 2),
    ):
        cfg = RunConfig(tmp_path / name, "teacher-forced", batch_size=bs, progress=False)
        runs[name] = run_evaluation(seg, proto.items, proto.rules, cfg, groups=proto.groups)
    assert cached.cache.stats.misses == 3 and cached.cache.stats.hits == 3
    assert cached.encoder_calls == 3  # the warm run never ran the image encoder
    ref = runs["b1"]
    for name in ("b3", "cold", "warm"):
        assert runs[name].summary["metrics"] == ref.summary["metrics"], name
        assert [r["targets"] for r in runs[name].records] == [r["targets"] for r in ref.records], name


def test_generative_mode_records_answers(
    tiny_model: LisaModel, data: dict[str, Path], tmp_path: Path
) -> None:
    proto = build_protocol(f"grefcoco:{data['grefcoco']}:val")
    seg = LisaSegmenter(tiny_model, max_new_tokens=6)
    cfg = RunConfig(tmp_path / "gen", "generative", batch_size=2, progress=False)
    res = run_evaluation(seg, proto.items, proto.rules, cfg)
    m = res.summary["metrics"]["overall"]
    assert m["n_targets"] == 3 and m["tp"] + m["fn"] == 1 and m["tn"] + m["fp"] == 2
    for rec in res.records:
        assert isinstance(rec["answer"], str)
        assert rec["n_slots"] == rec["answer"].count("[SEG]") + rec["answer"].count("[REJ]")


@pytest.mark.slow  # builds its own tiny model twice (~10 s each here)
def test_eval_command_end_to_end_and_resume(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reasonseg.cli import main

    argv = [
        "eval",
        "--model",
        "lisa-mobile",
        "--tiny",
        "--data",
        f"reasonseg:{data['reasonseg']}:val",
        "--mode",
        "teacher-forced",
        "--out",
        str(tmp_path / "run"),
        "--batch-size",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--worst-k",
        "2",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| overall | 3 | 3 |" in table and "| short | 2 | 2 |" in table and "| long | 1 | 1 |" in table
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["protocol"] == "reasonseg/val" and summary["mode"] == "teacher-forced"
    assert summary["run"]["computed_this_run"] == 3
    assert len(list((tmp_path / "run" / "worst").glob("*.png"))) == 2
    # a rerun resumes everything and reports the same metrics
    assert main(argv) == 0
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["run"]["computed_this_run"] == 0 and again["metrics"] == summary["metrics"]
    # the wrong mode on the same directory is refused with a one-line error
    assert main([*argv[:6], "--mode", "generative", *argv[8:]]) == 2
    assert "mode='teacher-forced', not 'generative'" in capsys.readouterr().err


def test_eval_command_in_bf16_records_the_dtype(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    """``--dtype bf16`` evaluates the bf16 model; the manifest records it, so the run cannot be resumed
    in float32 by mistake; a bad name is refused before anything is loaded."""
    from reasonseg.cli import main

    out = tmp_path / "run"
    argv = ["eval", "--model", "lisa-mobile", "--tiny", "--data", f"reasonseg:{data['reasonseg']}:val",
            "--mode", "teacher-forced", "--out", str(out), "--no-cache"]  # fmt: skip
    assert main([*argv, "--dtype", "bf16"]) == 0
    assert json.loads((out / "run.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(argv) == 2  # fp32 on the bf16 run's directory
    assert "dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--dtype", "float64"])


def test_eval_resume_refuses_rewritten_weights_and_edited_annotations(
    tiny_model: LisaModel, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The manifest pins the model folder's and the annotation files' contents, not only their paths:
    new weights exported over the same folder, or an annotation edited in place, are not resumed with
    the earlier results."""
    import shutil

    from reasonseg.cli import main

    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    root = tmp_path / "ReasonSeg"
    shutil.copytree(data["reasonseg"], root)
    argv = ["eval", "--model", str(model_dir), "--data", f"reasonseg:{root}:val", "--mode", "teacher-forced",
            "--out", str(tmp_path / "run"), "--no-cache", "--worst-k", "0"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(manifest["model_sha256"]) == 64 and len(manifest["data_sha256"]) == 64
    assert main(argv) == 0  # unchanged: resumed
    capsys.readouterr()

    anno = sorted((root / "val").glob("*.json"))[0]
    record = json.loads(anno.read_text())
    record["text"] = ["edited " + record["text"][0]]
    anno.write_text(json.dumps(record))
    assert main(argv) == 2
    assert "data_sha256" in capsys.readouterr().err
    shutil.copytree(data["reasonseg"], root, dirs_exist_ok=True)  # the original annotations back

    from safetensors.torch import load_file, save_file

    weights = sorted(model_dir.glob("*.safetensors"))[0]
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)  # retrained weights written over the same folder
    assert main(argv) == 2
    assert "model_sha256" in capsys.readouterr().err


@pytest.mark.slow  # two processes, each loading the model (~30 s here)
def test_cli_under_accelerate_two_processes_matches_one(
    tiny_model: LisaModel, data: dict[str, Path], tmp_path: Path
) -> None:
    import socket
    import subprocess
    import sys

    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    common = ["eval", "--model", str(model_dir), "--data", f"grefcoco:{data['grefcoco']}:val"]
    common += ["--mode", "teacher-forced", "--no-cache", "--worst-k", "1"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # On a CPU-only host accelerate's multi-process launcher is its torchrun path (--multi_gpu); the
    # runner then asks PartialState for a CPU (gloo) group.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", port, "-m", "reasonseg.cli"]
    for name, argv in (
        ("one", [sys.executable, "-m", "reasonseg.cli", *common]),
        ("two", [*launch, *common, "--batch-size", "2"]),
    ):
        proc = subprocess.run(
            [*argv, "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["run"]["num_processes"] == 1 and two["run"]["num_processes"] == 2
    assert one["metrics"] == two["metrics"]
    assert (tmp_path / "one" / "per_sample.jsonl").read_bytes() == (
        tmp_path / "two" / "per_sample.jsonl"
    ).read_bytes()
