"""SAM-pixel -> CLIP-pixel conversion used by the CLIP vision towers (LISA-7B/13B, GSVA presets)."""

from __future__ import annotations

import numpy as np
import torch

from reasonseg.data.transforms import SamTransform
from reasonseg.model.vision_tower import sam_pixels_to_clip


def test_bf16_input_converts_on_cpu_and_matches_fp32() -> None:
    rng = np.random.default_rng(0)
    sam_in = SamTransform(64).prepare(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.asarray(sam_in.pixels))[None]  # [1,3,64,64]
    ref = sam_pixels_to_clip(pixels, [sam_in.resized_hw], 32)  # [1,3,32,32]
    got = sam_pixels_to_clip(pixels.to(torch.bfloat16), [sam_in.resized_hw], 32)
    assert ref.shape == got.shape == (1, 3, 32, 32)
    assert got.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits of the normalised values (|x| <= ~2.2)
    assert torch.allclose(got.float(), ref, atol=0.05)
