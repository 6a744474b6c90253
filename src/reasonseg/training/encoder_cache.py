"""Disk cache of frozen image-encoder outputs, so CPU training encodes each image once, not every epoch.

An entry is keyed by two hashes:

* the image *content*: sha256 of the preprocessed pixel tensor (its bytes, shape and dtype), so a renamed
  or re-decoded copy of the same image hits, and an edited image misses;
* the encoder *identity*: sha256 over the names, shapes, dtypes and bytes of the frozen encoders'
  weights plus a config string; any change to a weight or to the preprocessing makes a new namespace.

Files are safetensors written to a unique temporary file in the destination directory, fsynced, then
``os.replace``d into place, so concurrent processes (data-parallel ranks, several runs) can share one cache:
a reader sees either no file or a whole one. A file that fails to load is treated as a miss and rewritten.

    fp = encoder_fingerprint({"sam": sam.image_encoder}, config="sam-1024")
    cache = EncoderCache(root, fp, output_type=ImageFeatures)
    feats = cache.encode(pixels, model.encode_images)     # pixels [B,3,L,L] -> ImageFeatures
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

__all__ = [
    "CacheStats",
    "EncoderCache",
    "FrozenImageFeatures",
    "content_key",
    "encode_frozen",
    "encoder_fingerprint",
    "frozen_encoder_cache",
    "frozen_features",
    "image_features",
]


def content_key(pixels: torch.Tensor) -> str:
    """sha256 (hex) of one preprocessed image tensor ([3,L,L]): its dtype, shape and bytes."""
    t = pixels.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(pixels.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encoder_fingerprint(modules: Mapping[str, nn.Module], config: str = "") -> str:
    """sha256 (hex) identifying frozen encoders: every parameter and buffer (name, shape, dtype, bytes)
    of each named module, plus ``config`` (e.g. the input size and normalisation)."""
    h = hashlib.sha256()
    h.update(config.encode())
    for label in sorted(modules):
        h.update(f"|module:{label}|".encode())
        for name, tensor in modules[label].state_dict().items():
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class CacheStats:
    """Hit/miss counters of one :class:`EncoderCache` instance."""

    hits: int = 0
    misses: int = 0


class EncoderCache:
    """Per-image cache of encoder outputs under ``root/<fingerprint[:16]>/``.

    Args:
        root: cache directory (created on first write).
        fingerprint: :func:`encoder_fingerprint` of the encoders whose outputs are stored.
        output_type: what the encoder returns: ``torch.Tensor`` or a dataclass whose fields are
            tensors with a leading batch dimension (or None); hits are rebuilt as this type.
    """

    def __init__(self, root: str | Path, fingerprint: str, output_type: type = torch.Tensor) -> None:
        if not (issubclass(output_type, torch.Tensor) or dataclasses.is_dataclass(output_type)):
            raise TypeError(
                f"EncoderCache: output_type must be torch.Tensor or a dataclass, got {output_type!r}"
            )
        self.output_type = output_type
        if not fingerprint or any(c not in "0123456789abcdef" for c in fingerprint):
            raise ValueError(f"EncoderCache: fingerprint must be a hex digest, got {fingerprint!r}")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint[:16]
        self.stats = CacheStats()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors of ``key`` (one image), or None on a miss or an unreadable file."""
        path = self._path(key)
        try:
            # Read the bytes first: once open, the data stays readable even if another process
            # replaces or removes the entry meanwhile (a vanished file is a plain miss).
            data = path.read_bytes()
        except OSError:
            return None
        try:
            return load(data)
        except (SafetensorError, ValueError, RuntimeError):
            path.unlink(missing_ok=True)  # damaged (e.g. a disk error): drop it and recompute
            return None

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Store one image's tensors atomically; returns the file path."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=path.parent)
        os.close(fd)
        try:
            data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            save_file(data, tmp_name, metadata={"fingerprint": self.fingerprint})
            with open(tmp_name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return path

    def encode(self, pixels: torch.Tensor, encode_fn: Callable[[torch.Tensor], Any]) -> Any:
        """Encoder outputs for a batch, computing and storing only the images not cached yet.

        Args:
            pixels: [B,3,L,L] preprocessed images.
            encode_fn: the encoder, ``[b,3,L,L] -> output_type``.

        Returns:
            An ``output_type`` holding all B images, on ``pixels.device``.
        """
        return self.encode_indexed(pixels, lambda idx: encode_fn(pixels[idx]))

    def encode_indexed(self, pixels: torch.Tensor, encode_fn: Callable[[list[int]], Any]) -> Any:
        """:meth:`encode` with an encoder that takes the batch indices of the images to compute (for
        encoders that also need per-image metadata, such as the resized sizes)."""
        if pixels.dim() != 4:
            raise ValueError(f"EncoderCache.encode: pixels must be [B,3,L,L], got {tuple(pixels.shape)}")
        keys = [content_key(p) for p in pixels]
        per_image: list[dict[str, torch.Tensor] | None] = [self.get(k) for k in keys]
        missing = [i for i, e in enumerate(per_image) if e is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            with torch.no_grad():
                out = encode_fn(missing)
            if not isinstance(out, self.output_type):
                got, want = type(out).__name__, self.output_type.__name__
                raise TypeError(f"EncoderCache: encoder returned {got}, cache expects {want}")
            fields = _as_fields(out)
            for j, i in enumerate(missing):
                entry = {name: t[j] for name, t in fields.items() if t is not None}
                self.put(keys[i], entry)
                per_image[i] = entry
        names = sorted(per_image[0])  # type: ignore[arg-type]
        stacked = {
            n: torch.stack([e[n].to(pixels.device) for e in per_image])
            for n in names  # type: ignore[index]
        }
        return _from_fields(stacked, self.output_type)


def _as_fields(out: Any) -> dict[str, torch.Tensor | None]:
    if isinstance(out, torch.Tensor):
        return {"tensor": out}
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        bad = [n for n, v in fields.items() if v is not None and not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"EncoderCache: field(s) {bad} of {type(out).__name__} are not tensors")
        return fields
    raise TypeError(f"EncoderCache: cannot cache an encoder output of type {type(out).__name__}")


def _from_fields(stacked: dict[str, torch.Tensor], output_type: type) -> Any:
    if issubclass(output_type, torch.Tensor):
        return stacked["tensor"]
    return output_type(**{f.name: stacked.get(f.name) for f in dataclasses.fields(output_type)})


# ------------------------------------------------------------------------ a LisaModel's frozen encoders


@dataclasses.dataclass
class FrozenImageFeatures:
    """What the cache stores per image for a ``LisaModel``: the frozen encoders' outputs, before any
    trained part, so training and evaluation of any checkpoint on the same base share the entries.

    sam_embeddings: [B,256,h,w]; tower_features: [B,N,C] (the vision tower's output, pre-projector).
    """

    sam_embeddings: torch.Tensor
    tower_features: torch.Tensor


def frozen_encoder_cache(model: Any, root: str | Path) -> EncoderCache:
    """The cache of ``model``'s frozen image encoders (SAM image encoder + vision tower) under ``root``."""
    import json

    frozen = {"sam_image_encoder": model.sam.image_encoder, "vision_tower": model.mllm.vision_tower}
    config = json.dumps({"vision": dataclasses.asdict(model.config.vision), "sam": model.config.sam.name})
    return EncoderCache(root, encoder_fingerprint(frozen, config), output_type=FrozenImageFeatures)


def encode_frozen(model: Any, pixels: torch.Tensor, resized_hw: Any) -> FrozenImageFeatures:
    """Run ``model``'s frozen encoders on SAM-preprocessed pixels [B,3,L,L] (``resized_hw``: B sizes)."""
    from reasonseg.model.vision_tower import sam_pixels_to_clip

    pixels = pixels.to(device=model.device, dtype=model.dtype)
    # Autocast off: the cache is keyed by the weights' dtype, so its entries must be computed in it
    # (a bf16 mixed-precision step must not store bf16-rounded features under an fp32 key).
    with torch.autocast(pixels.device.type, enabled=False):
        sam = model.sam.image_encoder(pixels)  # [B,256,h,w]
        if model.config.vision.kind == "sam":
            tower_in = sam
        else:
            sizes = [tuple(map(int, hw)) for hw in resized_hw]
            tower_in = sam_pixels_to_clip(pixels, sizes, model.mllm.vision_tower.image_size)
        return FrozenImageFeatures(sam, model.mllm.vision_tower(tower_in))


def frozen_features(
    model: Any, pixels: torch.Tensor, resized_hw: Any, cache: EncoderCache | None = None
) -> FrozenImageFeatures:
    """:func:`encode_frozen` through ``cache`` (computing only the images it lacks), or directly."""
    with torch.no_grad():
        if cache is None:
            return encode_frozen(model, pixels, resized_hw)
        sizes = list(resized_hw)
        return cache.encode_indexed(
            pixels, lambda idx: encode_frozen(model, pixels[idx], [sizes[i] for i in idx])
        )


def image_features(model: Any, frozen: FrozenImageFeatures, resized_hw: Any, original_hw: Any) -> Any:
    """``model.encode_images``'s result from cached :class:`FrozenImageFeatures`: the (trained)
    projector runs here, on the model's device. Returns ``ImageFeatures`` (SAM embeddings
    [B,256,h,w], LM image tokens [B,N,H], B resized and B original sizes)."""
    from reasonseg.model.outputs import ImageFeatures

    tokens = model.mllm.projector(frozen.tower_features.to(model.device, model.dtype))  # [B,N,C] -> [B,N,H]
    resized = [tuple(map(int, hw)) for hw in resized_hw]
    original = [tuple(map(int, hw)) for hw in original_hw]
    return ImageFeatures(frozen.sam_embeddings.to(model.device, model.dtype), tokens, resized, original)
