"""Encoder-output cache: keyed by image content and encoder identity, atomic, shared by processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from reasonseg.training.encoder_cache import EncoderCache, content_key, encoder_fingerprint


@dataclass
class Feats:
    embeddings: torch.Tensor  # [B,4,2,2]
    tokens: torch.Tensor  # [B,3,5]
    extra: torch.Tensor | None = None


class CountingEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.calls = 0
        self.images = 0

    def forward(self, pixels: torch.Tensor) -> Feats:
        self.calls += 1
        self.images += pixels.shape[0]
        e = self.conv(pixels)  # [B,4,2,2]
        return Feats(embeddings=e, tokens=e.flatten(1)[:, :15].reshape(-1, 3, 5))


def test_hits_skip_the_encoder_and_return_identical_outputs(tmp_path: Path) -> None:
    enc = CountingEncoder()
    cache = EncoderCache(tmp_path, encoder_fingerprint({"enc": enc}), output_type=Feats)
    pixels = torch.randn(3, 3, 8, 8)
    direct = enc(pixels)
    enc.images = 0
    first = cache.encode(pixels, enc)
    assert enc.images == 3 and cache.stats.misses == 3
    # Second epoch, shuffled, plus one new image: only the new one is encoded.
    batch2 = torch.cat([pixels[[2, 0]], torch.randn(1, 3, 8, 8)])
    second = cache.encode(batch2, enc)
    assert enc.images == 4 and cache.stats.hits == 2
    assert torch.equal(first.embeddings, direct.embeddings) and torch.equal(first.tokens, direct.tokens)
    assert torch.equal(second.embeddings[0], direct.embeddings[2]) and second.extra is None


def test_key_depends_on_content_not_identity(tmp_path: Path) -> None:
    a = torch.rand(3, 8, 8)
    assert content_key(a) == content_key(a.clone())
    b = a.clone()
    b[0, 0, 0] += 1e-3
    assert content_key(a) != content_key(b)
    assert content_key(a) != content_key(a.double())


def test_changed_encoder_weights_change_the_namespace(tmp_path: Path) -> None:
    enc = CountingEncoder()
    fp1 = encoder_fingerprint({"enc": enc}, config="L=8")
    assert fp1 == encoder_fingerprint({"enc": enc}, config="L=8")
    assert fp1 != encoder_fingerprint({"enc": enc}, config="L=16")
    with torch.no_grad():
        enc.conv.weight[0, 0, 0, 0] += 1.0
    fp2 = encoder_fingerprint({"enc": enc}, config="L=8")
    assert fp1 != fp2
    pixels = torch.randn(1, 3, 8, 8)
    EncoderCache(tmp_path, fp1, Feats).encode(pixels, enc)
    cache2 = EncoderCache(tmp_path, fp2, Feats)
    cache2.encode(pixels, enc)
    assert cache2.stats.misses == 1


def test_damaged_entry_is_recomputed(tmp_path: Path) -> None:
    enc = CountingEncoder()
    cache = EncoderCache(tmp_path, encoder_fingerprint({"enc": enc}), Feats)
    pixels = torch.randn(1, 3, 8, 8)
    cache.encode(pixels, enc)
    (entry,) = list(cache.dir.rglob("*.safetensors"))
    entry.write_bytes(b"garbage")
    again = cache.encode(pixels, enc)
    assert cache.stats.misses == 2 and again.embeddings.shape == (1, 4, 2, 2)


def test_plain_tensor_outputs_and_type_checks(tmp_path: Path) -> None:
    conv = nn.Conv2d(3, 2, 4, stride=4)
    cache = EncoderCache(tmp_path, encoder_fingerprint({"c": conv}))
    x = torch.randn(2, 3, 8, 8)
    out = cache.encode(x, conv)
    assert torch.equal(out, cache.encode(x, conv)) and cache.stats.hits == 2
    with pytest.raises(ValueError, match="fingerprint"):
        EncoderCache(tmp_path, "not-hex")
    with pytest.raises(TypeError, match="expects Feats"):
        EncoderCache(tmp_path / "b", "ab" * 32, Feats).encode(x, conv)


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from reasonseg.training.encoder_cache import EncoderCache
    cache = EncoderCache(sys.argv[1], "cd" * 32)
    x = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).reshape(2, 3, 64, 64)
    for _ in range(30):
        for p in cache.dir.rglob("*.safetensors"):  # finished entries only (the other writer's
            p.unlink(missing_ok=True)                # temporary files are its own business)
        out = cache.encode(x, lambda t: t * 2)
        assert torch.equal(out, x * 2)
    """
)


def test_concurrent_processes_share_a_cache(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert not list(tmp_path.rglob(".tmp-*"))
