"""The GPU benchmark script (LISA-7B layout) runs end to end on tiny shapes on a CPU; timings are not
asserted, only that every row is produced, cached == uncached tokens, and the section is appended."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_gpu_bench_tiny_runs_on_cpu_and_appends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import bench_gpu_lisa7b

    out = tmp_path / "BENCHMARKS.md"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = "--tiny --device cpu --dtype fp32 --repeats 1 --new-tokens 4 --batches 1,2 --memory fp32,4bit"
        rc = bench_gpu_lisa7b.main([*args.split(), "--no-sam", "--benchmarks-file", str(out)])
    finally:
        torch.set_num_threads(n)
    assert rc == 0  # the cached and uncached loops gave the same tokens
    text = capsys.readouterr().out
    for row in (
        "generate 4 tokens, no KV cache (original loop)",
        "generate 4 tokens, KV cache, eager steps",
        "teacher-forced eval, batch 1",
        "teacher-forced eval, batch 2",
    ):
        assert row in text
    assert "cached and uncached generation gave the same 4 tokens: True" in text
    assert "CUDA graph" not in text  # a GPU-only row
    gaps = text.split("near-ties): ")[1].splitlines()[0]  # "nocache 0, cache 0" in fp32
    assert all(float(part.split()[1]) < 1e-4 for part in gaps.split(", ")), gaps
    section = out.read_text()
    assert "## LISA-7B architecture, random weights (tiny shapes, cpu)" in section
    assert "- machine: " in section and "- command: `" in section
    assert "| fp32 " in section and "| ok " in section  # a memory option that runs on a CPU
    assert "not run: quantization='4bit' needs a CUDA" in section  # and one that cannot


def test_random_lisa7b_tiny_has_the_preset_layout() -> None:
    import bench_gpu_lisa7b

    model = bench_gpu_lisa7b.build_random_lisa7b(True, torch.device("cpu"), torch.float32)
    assert model.config.name == "lisa-7b-v1" and model.config.vision.kind == "clip"
    assert model.config.template == "llava_v1" and model.sam.image_encoder is not None


@pytest.mark.weights
@pytest.mark.slow
def test_bench_commits_compares_two_revisions_side_by_side() -> None:
    """Two checkouts of HEAD run the same measurement at once: every row, both answers, no leftovers."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = root / "bench" / "bench_commits.py"
    cmd = [sys.executable, str(script), "--base", "HEAD", "--new", "HEAD", "--repeats", "1", "--firsts", "1"]
    out = subprocess.run(
        [*cmd, "--no-append"], capture_output=True, text=True, timeout=600, check=True
    ).stdout
    for row in ("follow-up, cached image", "first query (set_image + predict)", "of which predict"):
        assert row in out
    assert "answers: base 'It is [SEG].', new 'It is [SEG].'" in out
    trees = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True)
    assert "bench-commits-" not in trees.stdout  # the temporary checkouts are removed
