"""The built-in trained model (models/lisa-mobile-synth): it loads strictly onto the real base weights as the
default of ``--model``, and the README's main command answers its example correctly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "lisa-mobile-synth"
EXAMPLE = REPO / "examples" / "synth_test_scene.jpg"
TARGET = REPO / "examples" / "synth_test_scene_target.png"  # the banana: the scene's only edible object
INSTRUCTION = "What in this image can be eaten? Please output segmentation mask."

pytestmark = [pytest.mark.weights, pytest.mark.slow]


def test_builtin_model_is_the_default_and_a_small_delta() -> None:
    from reasonseg.serving.loading import BUILTIN_MODEL_DIR

    assert BUILTIN_MODEL_DIR.resolve() == MODEL_DIR.resolve()
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["format"] == "delta" and config["name"] == "lisa-mobile"
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert size < 30_000_000


def test_segment_command_answers_the_demo_example(tmp_path: Path) -> None:
    """``reasonseg segment`` with the default model: one [SEG], the mask on the banana (IoU 0.66 when
    committed), and the promised files (overlay, one mask PNG per target, JSON with COCO RLE)."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "reasonseg.cli", "segment", str(EXAMPLE), INSTRUCTION, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "untrained" not in proc.stderr.lower()
    result = json.loads((out / "result.json").read_text())
    assert result["answer"].count("[SEG]") == 1 and "[REJ]" not in result["answer"]
    from reasonseg.model.precision import dtype_name, resolve_dtype

    # --dtype auto: bf16 on a CPU with AMX / AVX-512 BF16, else fp32; the result says which
    assert result["model"] == f"builtin (lisa-mobile-synth) [{dtype_name(resolve_dtype('auto'))}]"
    assert (out / "overlay.png").is_file()
    pred = np.array(Image.open(out / "mask_0.png")) > 0
    target = np.array(Image.open(TARGET)) > 0
    assert pred.shape == target.shape
    iou = (pred & target).sum() / (pred | target).sum()
    assert iou > 0.5, f"IoU with the banana {iou:.3f}"
    rle = result["targets"][0]["mask"]
    assert rle["size"] == list(target.shape) and isinstance(rle["counts"], str)
