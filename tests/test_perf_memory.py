"""Memory options: bf16, and bitsandbytes 8-bit/4-bit LM loading (CUDA only; here: the error path and
the plumbing, with a stand-in for bitsandbytes whose layers compute like ``nn.Linear``)."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from lisa_tiny_helpers import prompt_ids, random_pixels, single_thread
from reasonseg.model import LisaModel
from reasonseg.model.cpu_linear import CpuLinear
from reasonseg.model.lm import quantize_lm


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def test_quantization_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        RuntimeError, match=r"quantization='4bit' needs a CUDA GPU.*is_available\(\) is False"
    ):
        LisaModel.from_preset("lisa-mobile", tiny=True, quantization="4bit")
    with pytest.raises(RuntimeError, match=r"needs a CUDA device.*device='cpu'"):
        LisaModel.from_preset("lisa-mobile", tiny=True, quantization="8bit", device="cpu")
    with pytest.raises(
        ValueError, match=r"quantization='3bit': expected one of \('8bit', '4bit', 'cpu-int8'\)"
    ):
        quantize_lm(nn.Linear(2, 2), "3bit")


def test_quantization_without_bitsandbytes_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(RuntimeError, match="needs the 'bitsandbytes' package"):
        LisaModel.from_preset("lisa-mobile", tiny=True, quantization="8bit")


class _FakeParam(nn.Parameter):
    def __new__(cls, data: torch.Tensor, requires_grad: bool = False, **kw: Any) -> _FakeParam:
        p = super().__new__(cls, data, requires_grad)
        p.kw = kw  # type: ignore[attr-defined]
        return p


class _FakeLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw: Any) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.kw = kw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(
            x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )


def _fake_bitsandbytes() -> types.ModuleType:
    bnb = types.ModuleType("bitsandbytes")
    bnb.nn = types.SimpleNamespace(  # type: ignore[attr-defined]
        Linear8bitLt=type("Linear8bitLt", (_FakeLinear,), {}),
        Linear4bit=type("Linear4bit", (_FakeLinear,), {}),
        Int8Params=_FakeParam,
        Params4bit=_FakeParam,
    )
    return bnb


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantization_replaces_the_lm_linears_but_not_the_head(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bitsandbytes())
    torch.manual_seed(0)
    ref = LisaModel.from_preset("lisa-mobile", tiny=True)
    torch.manual_seed(0)
    # device="cpu" is refused for real; the stand-in layers are moved by quantize_lm itself.
    model = LisaModel.from_preset("lisa-mobile", tiny=True, dtype=torch.bfloat16)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.mllm.lm.modules())  # CpuLinear included
    replaced = quantize_lm(model.mllm.lm, kind, device="cpu", compute_dtype=torch.bfloat16)
    expected_cls = "Linear8bitLt" if kind == "8bit" else "Linear4bit"
    kinds = {type(m).__name__ for m in model.mllm.lm.model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {expected_cls}
    assert replaced == n_linear - 1  # every Linear of the decoder, not lm_head
    assert type(model.mllm.lm.get_output_embeddings()) is nn.Linear
    assert model.mllm.lm.get_output_embeddings().weight.dtype == torch.bfloat16
    layer = next(m for m in model.mllm.lm.model.modules() if type(m).__name__ == expected_cls)
    if kind == "4bit":
        assert layer.kw["quant_type"] == "nf4" and layer.kw["compute_dtype"] == torch.bfloat16
        assert layer.weight.kw["quant_type"] == "nf4"
    else:
        assert layer.kw["has_fp16_weights"] is False and layer.weight.dtype == torch.float16
    # Same weights in the replaced layers: the (stand-in) quantised model computes like the bf16 one.
    ids = prompt_ids(model, "Segment the cat.")
    px = random_pixels(ref)
    a = ref.to(torch.bfloat16).generate([ids], ref.encode_images(px), max_new_tokens=4, decode_masks=False)
    b = model.generate(
        [ids], model.encode_images(px.to(torch.bfloat16)), max_new_tokens=4, decode_masks=False
    )
    assert len(a.sequences[0]) == len(b.sequences[0]) > 0
    if kind == "4bit":  # the stand-in keeps the bf16 weights exactly
        assert a.sequences[0].tolist() == b.sequences[0].tolist()


def test_bf16_option_casts_the_whole_model() -> None:
    model = LisaModel.from_preset("lisa-mobile", tiny=True, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model.generate(
        [prompt_ids(model, "What?")], model.encode_images(random_pixels(model)), max_new_tokens=3
    )
    assert len(out.sequences[0]) >= 1


def test_cpu_int8_quantises_the_decoder_linears_and_keeps_the_head() -> None:
    torch.manual_seed(0)
    ref = LisaModel.from_preset("lisa-mobile", tiny=True)
    torch.manual_seed(0)
    model = LisaModel.from_preset("lisa-mobile", tiny=True, quantization="cpu-int8")
    quantised = [m for m in model.mllm.lm.model.modules() if "quantized" in type(m).__module__]
    assert quantised and not any(type(m) is nn.Linear for m in model.mllm.lm.model.modules())
    head = model.mllm.lm.get_output_embeddings()
    # The head stays float32 and keeps the faster CPU products (packed several-row products).
    assert type(head) is CpuLinear and head.pack and head.weight.dtype == torch.float32
    feats = model.encode_images(random_pixels(model))
    ids = prompt_ids(model, "Segment the cat.")
    out = model.generate([ids], feats, max_new_tokens=4, decode_masks=False)
    assert len(out.sequences[0]) >= 1
    # int8 weights: close to, not equal to, the float32 LM's hidden states.
    emb = ref.mllm.embed(ids[None], feats.vision_tokens)
    mask = torch.ones_like(ids[None])
    pos = torch.arange(len(ids))[None]
    h_ref = ref.mllm.run_decoder(emb, mask, pos)
    h_q = model.mllm.run_decoder(emb, mask, pos)
    assert (h_q - h_ref).abs().max() < 0.2 * h_ref.abs().max()


def test_cpu_int8_errors_name_the_reason() -> None:
    with pytest.raises(RuntimeError, match="runs on the CPU only, got device='cuda'"):
        LisaModel.from_preset("lisa-mobile", tiny=True, quantization="cpu-int8", device="cuda")
    with pytest.raises(RuntimeError, match=r"needs a float32 LM on the CPU, found \['torch.bfloat16'\]"):
        LisaModel.from_preset("lisa-mobile", tiny=True, quantization="cpu-int8", dtype=torch.bfloat16)
