"""The encoder benchmark script runs end to end on tiny shapes (timings themselves are not asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_bench_vit_tiny_runs_and_appends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import bench_sam_encoder

    out = tmp_path / "BENCHMARKS.md"
    rc = bench_sam_encoder.main(
        ["--tiny", "--model", "vit_h", "--repeats", "1", "--warmup", "0", "--benchmarks-file", str(out)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "reference (Meta segment_anything)" in text and "speed-up vs ref" in text and "GFLOP" in text
    section = out.read_text()
    assert "## SAM image encoder: vit_h tiny ours vs Meta segment_anything" in section
    assert "- machine: " in section and "- command: `" in section and "| ours" in section


@pytest.mark.weights
def test_bench_mobile_sam_tiny_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_sam_encoder

    rc = bench_sam_encoder.main(["--tiny", "--repeats", "1", "--warmup", "0", "--no-append"])
    assert rc == 0
    assert "reference (MobileSAM reference code)" in capsys.readouterr().out
