"""SmolLM2 loading through the cache (converted once, never again), the tiny tokenizer, and errors of
model directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonseg.model import LisaModel
from reasonseg.model import lm as lm_mod


def _fake_complete(dir_: Path) -> None:
    dir_.mkdir(parents=True)
    (dir_ / "model.safetensors").write_bytes(b"x" * 10)
    (dir_ / "config.json").write_text("{}")
    files = {p.name: p.stat().st_size for p in dir_.iterdir()}
    (dir_ / "reasonseg-complete.json").write_text(json.dumps({"source": "test", "files": files}))


def test_a_complete_cached_conversion_is_reused_without_converting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REASONSEG_HOME", str(tmp_path))
    _fake_complete(tmp_path / lm_mod.SMOLLM2_CACHE_NAME)

    def no_fetch(*a: object, **k: object) -> Path:
        raise AssertionError("a complete cache must not be fetched or converted again")

    monkeypatch.setattr("reasonseg.weights.fetch", no_fetch)
    assert lm_mod.load_smollm2() == tmp_path / lm_mod.SMOLLM2_CACHE_NAME


def test_an_incomplete_cache_is_converted_again_and_nothing_partial_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REASONSEG_HOME", str(tmp_path))
    monkeypatch.setenv("REASONSEG_OFFLINE", "1")
    target = tmp_path / lm_mod.SMOLLM2_CACHE_NAME
    _fake_complete(target)
    (target / "model.safetensors").write_bytes(b"x" * 3)  # truncated after the marker was written
    calls: list[str] = []

    def failing_fetch(name: str, **k: object) -> Path:
        calls.append(name)
        raise RuntimeError("offline test: no GGUF")

    monkeypatch.setattr("reasonseg.weights.fetch", failing_fetch)
    with pytest.raises(RuntimeError, match="no GGUF"):
        lm_mod.load_smollm2()
    assert calls == ["smollm2_135m_instruct_gguf"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp dir removed


def test_tiny_tokenizer_is_deterministic_and_encodes_anything() -> None:
    a, b = lm_mod.build_tiny_tokenizer(), lm_mod.build_tiny_tokenizer()
    text = "Où est le chat? 🐈 [SEG]"
    assert a(text).input_ids == b(text).input_ids
    assert a.decode(a(text).input_ids) == text


def test_from_pretrained_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LisaModel.from_pretrained(tmp_path)
    model = LisaModel.from_preset("lisa-mobile", tiny=True)
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    data["format"] = "zip"
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown format 'zip'"):
        LisaModel.from_pretrained(tmp_path / "m")


def test_gguf_special_tokens_are_read_and_pinned(tmp_path: Path) -> None:
    """The ids a GGUF declares win over whatever transformers' conversion chose (model card, item 16)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ids = lm_mod.gguf_special_token_ids(path)
    assert ids == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 2}

    tok = lm_mod.build_tiny_tokenizer()
    tok.eos_token = tok.convert_ids_to_tokens(1)  # what a converter might have picked instead
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            eos_token_id=1,
        )
    )
    lm_mod.pin_special_tokens(tok, model, ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 2)
    assert (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id) == (2, 2, 1)
    assert model.generation_config.eos_token_id == 2


@pytest.mark.weights
def test_smollm2_gguf_declares_im_end_as_end_and_pad() -> None:
    from reasonseg.weights import fetch

    ids = lm_mod.gguf_special_token_ids(fetch("smollm2_135m_instruct_gguf"))
    assert ids == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 2}
