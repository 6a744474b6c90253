"""Content fingerprints of the files an evaluation run depends on (model weights, annotations).

A run directory is resumed only when its manifest matches the new run's (see
:mod:`reasonseg.evaluation.runner`). Paths alone do not pin what was evaluated: ``reasonseg export
--force`` can write new weights into the same model folder, and an annotation file can be edited in
place. The manifest therefore also holds a digest of the files' contents.

Files up to :data:`FULL_HASH_BYTES` are hashed whole. A larger file (a 7B checkpoint) is hashed by its
size and :data:`SAMPLES` evenly spaced chunks of :data:`CHUNK` bytes, its first and last included:
retraining changes every tensor, so the sampled bytes change too, and a 14 GB file costs 64 MiB of
reading instead of 14 GB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["files_digest", "model_files"]

FULL_HASH_BYTES = 256 << 20
CHUNK = 1 << 20
SAMPLES = 64


def _file_digest(path: Path, h: hashlib._Hash) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(CHUNK), b""):
                h.update(block)
            return
        step = (size - CHUNK) / (SAMPLES - 1)
        for k in range(SAMPLES):
            fh.seek(round(k * step))
            h.update(fh.read(CHUNK))


def files_digest(paths: Iterable[str | Path]) -> str:
    """sha256 over the names, sizes and contents of ``paths``, in the given order (see the module
    docstring for files over :data:`FULL_HASH_BYTES`). A missing file is an error naming it."""
    h = hashlib.sha256()
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: cannot fingerprint a missing file")
        _file_digest(path, h)
    return h.hexdigest()


def model_files(directory: str | Path) -> list[Path]:
    """The files of a ``save_pretrained`` directory that decide its outputs: ``config.json``, the
    weights (``*.safetensors``, ``*.bin``, ``*.pt``) and the tokenizer files, sorted by name."""
    folder = Path(directory)
    patterns = ("config.json", "*.safetensors", "*.bin", "*.pt", "tokenizer*.json", "chat_template.jinja")
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)
