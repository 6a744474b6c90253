"""LISA / GSVA: a multimodal LM whose ``[SEG]`` tokens prompt SAM's mask decoder.

The pieces (one box of the paper's diagram each):

* ``mllm``: :class:`~reasonseg.model.mllm.MultimodalLM` (vision tower + projector + causal LM);
* ``sam``: Segment Anything (``reasonseg.model.sam``): image encoder, prompt encoder, mask decoder;
* ``text_hidden_fcs``: Linear(H,H)-ReLU-Linear(H,256)-Dropout(0), the LISA head.

The mask embedding of a ``[SEG]`` (or GSVA's ``[REJ]``) token is the last-layer hidden state, after
the final norm, at the position that *predicts* that token, i.e. the position right before it
(LISA's rule, which its official weights were trained with). Projected to 256, it is the only sparse
prompt of SAM's mask decoder, with the prompt encoder's ``no_mask_embed`` as the dense prompt and
``multimask_output=False``: one mask per slot. A ``[REJ]`` slot means "absent"; the predictor reports
it as such and returns no mask for it.

Two entry points, no loss inside: :meth:`LisaModel.forward` (teacher forcing, for training and the
papers' evaluations) and :meth:`LisaModel.generate` (KV-cached decoding, batches with left padding,
greedy or sampling; the mask embeddings are captured while decoding).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reasonseg.data.conversation import get_template
from reasonseg.model.config import LisaConfig
from reasonseg.model.mllm import MultimodalLM, positions_from_mask
from reasonseg.model.outputs import GenerateOutput, ImageFeatures, LisaOutput, MaskPrediction, TargetKind
from reasonseg.model.projector import Projector
from reasonseg.model.vision_tower import build_vision_tower, sam_pixels_to_clip

__all__ = ["BuildReport", "LisaModel", "fork_cache", "load_tokenizer", "stack_caches"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DELTA_NAME = "delta.safetensors"
FORMAT_VERSION = 1


def load_tokenizer(spec: str) -> Any:
    """The base tokenizer named by ``LisaConfig.tokenizer``: ``"tiny"``, ``"smollm2"``, a hub id or a directory."""
    from reasonseg.model.lm import build_tiny_tokenizer, load_smollm2

    if spec == "tiny":
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    if spec == "smollm2":
        return AutoTokenizer.from_pretrained(str(load_smollm2()))
    return AutoTokenizer.from_pretrained(spec)


def _lisa_tokens(config: LisaConfig) -> list[str]:
    tokens = [config.seg_token] + ([config.rej_token] if config.use_rej else []) + [config.image_token]
    return tokens + [t for t in get_template(config.template).special_tokens() if t not in tokens]


def add_lisa_tokens(tokenizer: Any, config: LisaConfig) -> list[str]:
    """Add ``[SEG]`` (``[REJ]``), ``<image>`` and the template's tokens as atomic special tokens
    (those already present keep their ids). Returns the tokens that were added."""
    vocab = tokenizer.get_vocab()
    new = [t for t in _lisa_tokens(config) if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    return new


def _token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.get_vocab().get(token)
    if tid is None:
        raise KeyError(f"token {token!r} is missing from the tokenizer")
    return int(tid)


def _clean_hf_config(cfg: Any) -> dict[str, Any]:
    out = cfg.to_diff_dict()
    out["model_type"] = cfg.model_type
    for k in (
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
    ):
        out.pop(k, None)
    out["hidden_size"] = cfg.hidden_size
    out["vocab_size"] = cfg.vocab_size
    return out


def fork_cache(cache: Any, keep: int | None = None) -> Any:
    """A copy of a prompt prefix's keys/values that a next pass may extend while the original stays
    as it is (the predictor's per-image prefix serves every follow-up question); with ``keep``, a
    copy of only its first ``keep`` positions.

    transformers' ``DynamicCache`` layers grow, crop and repeat by building new tensors, never in
    place, so for those the copy shares the tensors and only copies the layer objects: microseconds
    instead of a ``deepcopy`` of every tensor (4 ms a follow-up for SmolLM2-135M's 30 layers on
    this CPU). Any other cache (static, sliding-window, offloaded) is deep-copied.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if (
        type(cache) is DynamicCache
        and not cache.offloading
        and all(type(layer) is DynamicLayer for layer in cache.layers)
    ):
        fork = copy.copy(cache)
        fork.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        fork = copy.deepcopy(cache)
    if keep is not None:
        _drop_last_tokens(fork, int(fork.get_seq_length()) - keep)
    return fork


def stack_caches(caches: Sequence[Any]) -> Any:
    """One ``DynamicCache`` whose row i holds ``caches[i]`` (batch-1 caches of one length, e.g. the
    image prefixes of several images): the prefix cache of a batch of prompts on different images."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not caches:
        raise ValueError("stack_caches needs at least one cache")
    first = caches[0]
    for c in caches:
        if type(c) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in c.layers):
            raise TypeError(
                f"stack_caches: only DynamicCache with DynamicLayer layers, got {type(c).__name__}"
            )
        if len(c.layers) != len(first.layers) or int(c.get_seq_length()) != int(first.get_seq_length()):
            raise ValueError("stack_caches: the caches differ in layer count or length")
        if _cache_rows(c) != 1:
            raise ValueError(f"stack_caches: caches must have batch 1, got {_cache_rows(c)}")
    out = fork_cache(first)
    for i, layer in enumerate(out.layers):
        layer.keys = torch.cat([c.layers[i].keys for c in caches])
        layer.values = torch.cat([c.layers[i].values for c in caches])
    return out


def _cache_rows(cache: Any) -> int:
    """The batch size of a transformers cache (1 when it holds nothing yet)."""
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel():
            return int(keys.shape[0])
    return 1


# Each model's static decoders (CUDA graphs, preallocated caches), outside the module so that copying
# or pickling a model neither copies them nor trips over a graph.
_STATIC_DECODERS: weakref.WeakKeyDictionary[nn.Module, dict[Any, Any]] = weakref.WeakKeyDictionary()


def static_decoders(model: nn.Module) -> dict[Any, Any]:
    """The :class:`~reasonseg.model.graph_decode.StaticDecoder` pool of ``model`` ((batch, length,
    device, dtype) -> decoder, least recently used first); ``.clear()`` frees their memory."""
    return _STATIC_DECODERS.setdefault(model, {})


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``: the first maximum, as ``argmax``; ``max`` is faster on bf16 CPU logits
    (0.7 against 1.8 ms for 6 rows of SmolLM2's 49k-token vocabulary)."""
    return logits.max(dim=-1).indices


@dataclass
class BuildReport:
    """What building a model loaded, and how long each part took (seconds)."""

    sources: dict[str, str]
    seconds: dict[str, float]


class LisaModel(nn.Module):
    """The LISA/GSVA model. Build it with :meth:`from_preset`, :meth:`from_config` or :meth:`from_pretrained`.

    Attributes:
        config: the :class:`LisaConfig` it was built from (``lm.hf_config["vocab_size"]`` is the real one).
        tokenizer: its tokenizer (with ``[SEG]``, ``[REJ]``, ``<image>`` and the template's tokens).
        mllm: the multimodal LM. sam: Segment Anything. text_hidden_fcs: the LISA head.
        seg_token_id, rej_token_id (None without ``use_rej``), image_token_id: found by id in the tokenizer.
        stop_token_ids: ids that end an answer (the template's stop token and the tokenizer's eos).
    """

    def __init__(self, config: LisaConfig, tokenizer: Any, mllm: MultimodalLM, sam: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.mllm = mllm
        self.sam = sam
        hidden = mllm.hidden_size
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, config.head.out_dim),
            nn.Dropout(config.head.dropout),
        )
        self.template = get_template(config.template)
        self.seg_token_id = _token_id(tokenizer, config.seg_token)
        self.rej_token_id = _token_id(tokenizer, config.rej_token) if config.use_rej else None
        self.image_token_id = _token_id(tokenizer, config.image_token)
        stops = {_token_id(tokenizer, self.template.stop)}
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        self.stop_token_ids = sorted(stops)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        self.pad_token_id = int(pad)
        self.build_report = BuildReport({}, {})

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_preset(
        cls,
        name: str,
        tiny: bool = False,
        *,
        load_weights: bool = True,
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
        device: torch.device | str | None = None,
    ) -> LisaModel:
        """A named preset (``lisa-7b-v1``, ``lisa-13b-llama2-v1``, ``gsva-7b``, ``lisa-mobile``).

        ``tiny=True`` gives the same layout at tiny random sizes (for tests). Otherwise the base weights
        (LM, SAM, CLIP) are loaded when ``load_weights``; the new parts (head, projector unless the
        preset ships one, new token rows) start random. ``dtype``, ``quantization``, ``device``: see
        :meth:`apply_memory_options`.
        """
        return cls.from_config(
            LisaConfig.from_preset(name, tiny=tiny),
            load_base=load_weights and not tiny,
            dtype=dtype,
            quantization=quantization,
            device=device,
        )

    @classmethod
    def from_config(
        cls,
        config: LisaConfig,
        *,
        load_base: bool = False,
        tokenizer: Any | None = None,
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
        device: torch.device | str | None = None,
    ) -> LisaModel:
        """Build the model for ``config``; ``load_base`` loads the base weights named in it (LM
        ``pretrained``, SAM ``checkpoint``, CLIP ``clip_pretrained``), else everything is random.
        ``dtype``, ``quantization``, ``device``: see :meth:`apply_memory_options`."""
        _check_memory_options(quantization, device)  # fail before the (long) build
        config = copy.deepcopy(config)
        sources: dict[str, str] = {}
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        if tokenizer is None:
            tokenizer = load_tokenizer(config.tokenizer)
        add_lisa_tokens(tokenizer, config)
        seconds["tokenizer"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        lm = _build_lm(config, len(tokenizer), load_base, sources)
        seconds["lm"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        tower = build_vision_tower(config.vision)
        if load_base and config.vision.kind == "clip" and config.vision.clip_pretrained:
            from transformers import CLIPVisionModel

            tower.clip = CLIPVisionModel.from_pretrained(config.vision.clip_pretrained, dtype=torch.float32)
            sources["vision"] = config.vision.clip_pretrained
        projector = Projector(config.projector)
        seconds["vision"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sam = _build_sam(config, load_base, sources)
        seconds["sam"] = time.perf_counter() - t0

        image_id = _token_id(tokenizer, config.image_token)
        mllm = MultimodalLM(tower, projector, lm, image_id, config.num_image_tokens)
        model = cls(config, tokenizer, mllm, sam)
        model.build_report = BuildReport(sources, seconds)
        return model.apply_memory_options(dtype=dtype, quantization=quantization, device=device).eval()

    def apply_memory_options(
        self,
        *,
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
        device: torch.device | str | None = None,
    ) -> LisaModel:
        """Memory options for GPU users, applied in place in this order: cast to ``dtype`` (e.g.
        ``torch.bfloat16``: half the memory of float32), move to ``device``, then quantise the LM's
        linear layers with bitsandbytes (``quantization="8bit"`` or ``"4bit"``, CUDA only; the LM
        head, the embeddings, the vision parts and SAM keep ``dtype``; see
        :func:`reasonseg.model.lm.quantize_lm`), or with torch's dynamic int8 on a CPU
        (``"cpu-int8"``, float32 model: faster batch-1 decoding). Do not cast a quantised model
        afterwards.

        Raises:
            ValueError: an unknown ``quantization``. RuntimeError: quantisation without CUDA or
            without ``bitsandbytes`` (the message says which).
        """
        _check_memory_options(quantization, device)
        if dtype is not None:
            self.to(dtype)
        if device is not None:
            self.to(device)
        if quantization is not None:
            from reasonseg.model.lm import quantize_lm

            quantize_lm(
                self.mllm.lm,
                quantization,
                device=device if device is not None else ("cpu" if quantization == "cpu-int8" else "cuda"),
                compute_dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16,
            )
        return self

    def compile_image_encoder(self, **options: Any) -> LisaModel:
        """Compile SAM's image encoder with ``torch.compile`` (in place: parameter names and checkpoints
        are unchanged), for inference on a GPU: SAM ViT-H in bf16 on an H100 went from 34.5 to 19.8 ms
        an image (``bench/bench_sam_encoder.py --model vit_h --device cuda --dtype bf16 --compile``).
        The first call of each input shape compiles (tens of seconds); ``options`` go to
        ``torch.compile`` (e.g. ``mode="max-autotune"``, ``backend=...``). Returns ``self``."""
        self.sam.image_encoder.compile(**options)
        return self

    # --------------------------------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.mllm.lm.parameters()).dtype

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def slot_token_ids(self) -> list[int]:
        return [self.seg_token_id] + ([self.rej_token_id] if self.rej_token_id is not None else [])

    def _kind(self, token_id: int) -> TargetKind:
        return "rej" if token_id == self.rej_token_id else "seg"

    # ------------------------------------------------------------------------------------------- images

    def encode_images(
        self,
        pixels: torch.Tensor,
        resized_hw: Sequence[tuple[int, int]] | None = None,
        original_hw: Sequence[tuple[int, int]] | None = None,
    ) -> ImageFeatures:
        """One encoder pass: SAM-preprocessed pixels [B,3,L,L] -> :class:`ImageFeatures`
        (SAM embeddings [B,256,L/16,L/16] + projected LM image tokens [B,N,H]).

        ``resized_hw``/``original_hw`` (from ``SamTransform.prepare``) default to the full square.
        With a ``sam`` vision tower the SAM embedding itself feeds the LM; with CLIP, CLIP's input is
        derived from the same pixels (see ``sam_pixels_to_clip``).
        """
        b, _, h, w = pixels.shape
        resized = [tuple(map(int, hw)) for hw in resized_hw] if resized_hw is not None else [(h, w)] * b
        original = [tuple(map(int, hw)) for hw in original_hw] if original_hw is not None else list(resized)
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        encoder = self.sam.image_encoder
        trainable = any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            sam_emb = encoder(pixels)  # [B,256,h,w]
        if self.config.vision.kind == "sam":
            tower_input = sam_emb
        else:
            tower_input = sam_pixels_to_clip(pixels, resized, self.mllm.vision_tower.image_size)
        tokens = self.mllm.image_tokens(tower_input)  # [B,N,H]
        return ImageFeatures(sam_emb, tokens, resized, original)  # type: ignore[arg-type]

    def decode_masks(
        self,
        hidden: torch.Tensor,
        sam_embedding: torch.Tensor,
        resized_hw: tuple[int, int],
        original_hw: tuple[int, int],
        kinds: list[TargetKind],
    ) -> MaskPrediction:
        """LM hidden states of n slots [n,H] + one image's SAM embedding [1,256,h,w] -> masks [n,H0,W0]."""
        oh, ow = original_hw
        h, w = sam_embedding.shape[-2:]
        if hidden.shape[0] == 0:
            prompt = self.text_hidden_fcs(hidden)
            empty = prompt.new_zeros(0, oh, ow)
            return MaskPrediction(empty, prompt.new_zeros(0, 4 * h, 4 * w), prompt.new_zeros(0), [], prompt)
        prompt, low_res, iou = self._run_mask_decoder(hidden, sam_embedding)
        return self._mask_prediction(prompt, low_res, iou, resized_hw, original_hw, kinds)

    def decode_masks_batch(
        self, hidden: Sequence[torch.Tensor], images: ImageFeatures, kinds: Sequence[list[TargetKind]]
    ) -> list[MaskPrediction]:
        """:meth:`decode_masks` for every sample of a batch (``hidden[i]`` [n_i,H], row i of ``images``),
        with one mask-decoder call for all slots of all images instead of one call per sample. On a GPU
        the per-sample calls' many small operations, not their arithmetic, bound a training step
        (``bench/bench_mask_decoding.py``: 7.4x fewer operations at micro-batch 32). Only the resize to
        each image's own size stays per sample. With slots on one image at most, this is
        :meth:`decode_masks` itself, which shares that image's embedding among its prompts."""
        counts = [int(h.shape[0]) for h in hidden]
        owners = [i for i, c in enumerate(counts) if c]
        if len(owners) <= 1:  # one image at most: its embedding is shared by its prompts, as in inference
            return self._decode_masks_each(hidden, images, kinds)
        emb = images.sam_embeddings
        index = torch.repeat_interleave(
            torch.tensor(owners, device=emb.device),
            torch.tensor([counts[i] for i in owners], device=emb.device),
        )
        prompt, low_res, iou = self._run_mask_decoder(
            torch.cat([hidden[i] for i in owners]), emb.index_select(0, index)
        )
        out: list[MaskPrediction] = []
        start = 0
        for i, n in enumerate(counts):
            if n == 0:
                sam_i = emb[i : i + 1]
                out.append(
                    self.decode_masks(hidden[i], sam_i, images.resized_hw[i], images.original_hw[i], [])
                )
                continue
            rows = slice(start, start + n)
            start += n
            out.append(
                self._mask_prediction(
                    prompt[rows],
                    low_res[rows],
                    iou[rows],
                    images.resized_hw[i],
                    images.original_hw[i],
                    kinds[i],
                )
            )
        return out

    def _mask_prediction(
        self,
        prompt: torch.Tensor,
        low_res: torch.Tensor,
        iou: torch.Tensor,
        resized_hw: tuple[int, int],
        original_hw: tuple[int, int],
        kinds: Sequence[TargetKind],
    ) -> MaskPrediction:
        """One image's n slots from the mask decoder (prompts [n,256], low-res logits [n,1,4h,4w], IoU
        [n,1]) -> their :class:`MaskPrediction`, the logits resized to the original image [n,H0,W0]."""
        from reasonseg.data.transforms import postprocess_masks

        full = postprocess_masks(low_res, resized_hw, original_hw, target_length=self.sam.image_size)
        return MaskPrediction(full[:, 0], low_res[:, 0], iou[:, 0], list(kinds), prompt)

    def _slot_outputs(
        self, hidden: Sequence[torch.Tensor], images: ImageFeatures | None, kinds: Sequence[list[TargetKind]]
    ) -> tuple[list[MaskPrediction] | None, list[torch.Tensor]]:
        """Per sample: the slots' masks (None without ``images``) and their SAM prompts [n_i,256]."""
        if images is None:
            return None, [self.text_hidden_fcs(h) for h in hidden]
        masks = self.decode_masks_batch(hidden, images, kinds)
        return masks, [m.embeddings for m in masks]

    def _decode_masks_each(
        self, hidden: Sequence[torch.Tensor], images: ImageFeatures, kinds: Sequence[list[TargetKind]]
    ) -> list[MaskPrediction]:
        """:meth:`decode_masks_batch` as one :meth:`decode_masks` call per sample."""
        return [
            self.decode_masks(
                hidden[i],
                images.sam_embeddings[i : i + 1],
                images.resized_hw[i],
                images.original_hw[i],
                kinds[i],
            )
            for i in range(len(hidden))
        ]

    def _run_mask_decoder(
        self, hidden: torch.Tensor, sam_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n slots' hidden states [n,H] and their image embedding ([1,...] shared, or [n,...] one per
        slot) -> (SAM prompts [n,256], low-res mask logits [n,1,4h,4w], IoU predictions [n,1])."""
        prompt = self.text_hidden_fcs(hidden)  # [n,256]
        n = prompt.shape[0]
        h, w = sam_embedding.shape[-2:]
        pe = self.sam.prompt_encoder
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=sam_embedding,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=prompt.unsqueeze(1),  # the only sparse prompt
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return prompt, low_res, iou

    # ------------------------------------------------------------------------------------ teacher forced

    def forward(
        self,
        batch: Any | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: ImageFeatures | None = None,
        pixels: torch.Tensor | None = None,
        resized_hw: Sequence[tuple[int, int]] | None = None,
        original_hw: Sequence[tuple[int, int]] | None = None,
        decode_masks: bool = True,
        logits_at: torch.Tensor | None = None,
    ) -> LisaOutput:
        """Teacher-forced pass over full conversations (no loss).

        Args:
            batch: a ``LisaBatch`` (fields ``input_ids``, ``attention_mask``, ``pixels``, ``resized_hw``,
                ``original_hw``) or None to pass them by keyword.
            input_ids: [B,T] with the image placeholder expanded (``encode_conversation``); padding on
                either side, marked by ``attention_mask`` [B,T] (1 = real token).
            images: precomputed :class:`ImageFeatures` (row i for sample i); else ``pixels`` [B,3,L,L]
                are encoded here.
            decode_masks: run SAM's mask decoder on every [SEG]/[REJ] slot.
            logits_at: [B,T] bool; compute the LM head only where True (training needs the supervised
                positions alone: the head over a 49k vocabulary at every position is a large share of a
                small model's step). ``logits`` is then [N,V]. None: every position.

        Returns:
            :class:`LisaOutput`: logits [B,T,V]; per sample the slot embeddings [n_i,256], masks
            [n_i,H_i,W_i] (logits at the original size), slot kinds, and GSVA's predicted [REJ] flags.
        """
        if batch is not None:
            input_ids = batch.input_ids if input_ids is None else input_ids
            attention_mask = (
                getattr(batch, "attention_mask", None) if attention_mask is None else attention_mask
            )
            pixels = getattr(batch, "pixels", None) if pixels is None else pixels
            resized_hw = getattr(batch, "resized_hw", None) if resized_hw is None else resized_hw
            original_hw = getattr(batch, "original_hw", None) if original_hw is None else original_hw
        if input_ids is None:
            raise ValueError("forward needs input_ids (or a batch holding them)")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if images is None and pixels is not None:
            images = self.encode_images(pixels, resized_hw, original_hw)
        embeds = self.mllm.embed(input_ids, images.vision_tokens if images is not None else None)
        hidden = self.mllm.run_decoder(embeds, attention_mask, positions_from_mask(attention_mask))  # [B,T,H]
        if logits_at is None:
            logits = self.mllm.lm_logits(hidden)  # [B,T,V]
        else:
            logits_at = logits_at.to(device=hidden.device, dtype=torch.bool)
            logits = self.mllm.lm_logits(hidden[logits_at])  # [N,V]

        slot_ids = torch.tensor(self.slot_token_ids(), device=input_ids.device)
        is_slot = torch.isin(input_ids, slot_ids) & attention_mask.bool()
        is_slot[:, 0] = False  # a slot needs a predicting position before it
        slot_hidden, positions, kinds, pred_rej = [], [], [], []
        for i in range(input_ids.shape[0]):
            pos = is_slot[i].nonzero().flatten()  # [n_i]
            kinds.append([self._kind(t) for t in input_ids[i, pos].tolist()])
            h = hidden[i, pos - 1]  # [n_i,H]: the position that predicts each slot token
            positions.append(pos)
            slot_hidden.append(h)
            if self.rej_token_id is not None:
                lg = logits[i, pos - 1] if logits_at is None else self.mllm.lm_logits(h)
                pred_rej.append(lg[:, self.rej_token_id] > lg[:, self.seg_token_id])
            else:
                pred_rej.append(torch.zeros(len(pos), dtype=torch.bool, device=input_ids.device))
        masks, seg_embeddings = self._slot_outputs(slot_hidden, images if decode_masks else None, kinds)
        return LisaOutput(
            logits=logits,
            hidden_states=hidden,
            seg_embeddings=seg_embeddings,
            slot_positions=positions,
            masks=masks,
            kinds=kinds,
            predicted_rej=pred_rej,
            logits_at=logits_at,
        )

    # ------------------------------------------------------------------------------------------ generate

    def _next_token(
        self,
        logits: torch.Tensor,
        do_sample: bool,
        temperature: float,
        top_p: float,
        gen: torch.Generator | None,
    ) -> torch.Tensor:
        """logits [B,V] -> token ids [B]."""
        if not do_sample:
            return _greedy(logits)
        logits = logits.float() / max(temperature, 1e-5)
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(dim=-1)
            drop = cum - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs.cpu(), 1, generator=gen).flatten().to(logits.device)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Sequence[torch.Tensor] | torch.Tensor,
        images: ImageFeatures | None = None,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        use_cache: bool = True,
        decode_masks: bool = True,
        prefix_cache: tuple[Any, int] | None = None,
        drafts: Sequence[Sequence[int]] | None = None,
        max_draft: int = 16,
        static_cache: bool | None = None,
    ) -> GenerateOutput:
        """Generate answers for a batch of prompts, then decode a mask per generated [SEG]/[REJ].

        Args:
            input_ids: B prompts, each a LongTensor [T_i] (lengths may differ: they are left-padded
                with correct position ids), or a [B,T] tensor without padding.
            images: their :class:`ImageFeatures` (row i for prompt i), or None for text-only prompts.
            max_new_tokens: per prompt.
            do_sample: sample (with ``temperature``, ``top_p``, and a ``seed`` for reproducibility)
                instead of greedy decoding.
            use_cache: KV-cached decoding (default). ``False`` re-runs the whole sequence every step:
                the slow reference the cached path is tested against.
            decode_masks: run the mask decoder on the captured slot embeddings.
            prefix_cache: ``(cache, P)``: the keys/values of a prefix of P tokens that every
                prompt starts with (e.g. system prompt + image tokens, from :meth:`prefix_cache`, or
                the text before the image alone: the image tokens then run with the rest); a
                ``transformers`` ``Cache``, left untouched (a copy is extended). Batch 1: one prefix
                shared by every prompt (repeated per prompt), computed once for the whole batch; batch
                B: row i is prompt i's own prefix (the same tokens on different images,
                :func:`stack_caches`). Each prompt's remaining tokens are left-padded after the prefix.
            drafts: token sequences the answer is likely to repeat (earlier answers, the answer
                templates; :meth:`answer_drafts`). Greedy cached decoding then guesses up to
                ``max_draft`` tokens at a time from them and checks the guess in one LM pass, keeping
                the longest prefix the model itself would have chosen (speculative decoding with a
                lookup draft). The answer is the greedy answer; only the number of LM passes changes
                (floating-point rounding of a wider pass could flip an exact tie). Ignored when
                sampling or without a cache.
            static_cache: decode over a KV cache allocated once for prompt + answer
                (:class:`~reasonseg.model.graph_decode.StaticDecoder`); on a GPU each one-token step is
                then replayed from a CUDA graph, recorded at the first call of a (batch, length) shape
                and kept for later calls. The eager step of a large LM on a GPU is bound by kernel
                launches (a 7B LLaMA: ~30 ms a token on an H100, against ~5 ms of kernels). ``None``
                (default): on where it applies (CUDA, a cache, ``sdpa``/``eager`` attention, no
                sliding-window layers; a ``prefix_cache`` is copied into the static cache). ``True``
                on a CPU, or with a bitsandbytes-quantised LM, runs the same steps eagerly (no gain;
                the tests compare it with the ordinary cache). Of ``drafts``, only the guess appended
                to the prompt is used on this path (it is checked in the prefill); the later steps
                are one token each.

        The mask embedding of a generated [SEG]/[REJ] is the last-layer hidden state that produced
        the logits it was chosen from (LISA's one-before rule), captured during decoding.
        """
        from transformers import DynamicCache

        prompts = [p.to(self.device) for p in input_ids]  # a [B,T] tensor iterates over its rows
        b = len(prompts)
        if b == 0:
            raise ValueError("generate needs at least one prompt")
        if images is not None and len(images) != b:
            raise ValueError(f"{len(images)} images for {b} prompts")
        plen = 0
        if prefix_cache is not None:
            if not use_cache:
                raise ValueError("prefix_cache needs use_cache=True")
            plen = int(prefix_cache[1])
            rows = _cache_rows(prefix_cache[0])
            if rows not in (1, b):
                raise ValueError(f"prefix_cache has {rows} rows for {b} prompts: give 1 (shared) or {b}")
            head = prompts[0][:plen]
            bad = [i for i, p in enumerate(prompts) if len(p) <= plen or not torch.equal(p[:plen], head)]
            if bad:
                raise ValueError(
                    f"prefix_cache holds {plen} tokens; prompts {bad} do not all start with the same "
                    f"{plen} tokens followed by at least one more"
                )
        # Layout [B, P + T]: the shared prefix, then each prompt's rest left-padded (the padding sits
        # between prefix and rest; the mask hides it and the position ids skip it).
        t = plen + max(len(p) - plen for p in prompts)
        # The mask is allocated for the whole answer once; step k uses a view of its first columns.
        ids = torch.full((b, t), self.pad_token_id, dtype=torch.long, device=self.device)
        full_mask = torch.zeros((b, t + max_new_tokens), dtype=torch.long, device=self.device)
        full_mask[:, t:] = 1
        full_mask[:, :plen] = 1
        for i, p in enumerate(prompts):
            ids[i, t - (len(p) - plen) :] = p[plen:]
            ids[i, :plen] = p[:plen]
            full_mask[i, t - (len(p) - plen) : t] = 1
        vision = images.vision_tokens if images is not None else None
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        embed_table = self.mllm.lm.get_input_embeddings()
        static = self._static_path(static_cache, use_cache)
        pool = [[int(x) for x in d] for d in drafts or () if len(d)] if use_cache and not do_sample else []

        out_tokens: list[list[int]] = [[] for _ in range(b)]
        slot_hidden: list[list[torch.Tensor]] = [[] for _ in range(b)]
        kinds: list[list[TargetKind]] = [[] for _ in range(b)]
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        stop = torch.tensor(self.stop_token_ids, device=self.device)
        slots = set(self.slot_token_ids())
        n_out = 0  # tokens emitted by every row still running

        def emit(tok_per_row: torch.Tensor, h: torch.Tensor) -> None:
            nonlocal n_out
            for i in (~finished).nonzero().flatten().tolist():
                tok = int(tok_per_row[i])
                out_tokens[i].append(tok)
                if tok in slots:
                    slot_hidden[i].append(h[i])
                    kinds[i].append(self._kind(tok))
            finished.logical_or_(torch.isin(tok_per_row, stop))
            n_out += 1

        def accept(hidden_tail: torch.Tensor, draft: list[int]) -> torch.Tensor:
            """hidden_tail [B,k+1,H]: position i predicts draft[i] (i < k) and the last one the token
            after the draft. Emits the longest draft prefix every running row agrees with, drops the
            rest from the cache, and returns the hidden state that predicts the next token."""
            nonlocal mask, last_pos
            k = len(draft)
            if k == 0:
                return hidden_tail[:, -1]
            d = torch.tensor(draft, device=self.device)
            agree = (_greedy(self.mllm.lm_logits(hidden_tail[:, :k])) == d).long().cumprod(1).sum(1)
            j = int(agree[~finished].min())
            for i in range(j):
                emit(d[i].expand(b), hidden_tail[:, i])
                if bool(finished.all()):
                    j = i + 1
                    break
            if static:
                decoder.drop_last(k - j)
            else:
                _drop_last_tokens(cache, k - j)
            mask = full_mask[:, : mask.shape[1] - (k - j)]
            last_pos = last_pos - (k - j)
            return hidden_tail[:, j]

        # Greedy decoding may append a guess of the whole answer to the prompt itself.
        lead = _propose_draft([], pool, min(max_draft, max_new_tokens - 1)) if pool else []
        mask = full_mask[:, : t + len(lead)]
        if lead:
            ids = torch.cat([ids, torch.tensor(lead, device=self.device).expand(b, -1)], dim=1)
        cache = None
        if use_cache:
            pos = positions_from_mask(mask)
            if static:
                decoder = self._static_decoder(b, t + max_new_tokens)
                decoder.reset(mask)
            if prefix_cache is not None:
                # Only the tokens after the prefix are embedded; they hold the image placeholders
                # when the prefix ends before the image (e.g. the system prompt alone).
                rest_ids = ids[:, plen:]
                has_image = bool((rest_ids == self.mllm.image_token_id).any())
                rest = self.mllm.embed(rest_ids, vision if has_image else None)
                if static:
                    decoder.load_prefix(prefix_cache[0])
                    hidden = decoder.prefill(rest, pos[:, plen:], start=plen)
                else:
                    cache = fork_cache(prefix_cache[0])
                    if b > 1 and _cache_rows(cache) == 1:
                        cache.batch_repeat_interleave(b)
                    hidden = self.mllm.run_decoder(rest, mask, pos[:, plen:], cache, True)
            elif static:
                hidden = decoder.prefill(self.mllm.embed(ids, vision), pos)
            else:
                cache = DynamicCache(config=self.mllm.lm.config)
                hidden = self.mllm.run_decoder(self.mllm.embed(ids, vision), mask, pos, cache, True)
            last_pos = pos[:, -1:]
            h_last = accept(hidden[:, hidden.shape[1] - len(lead) - 1 :], lead)  # [B,H]
        else:
            h_last = self._uncached_step(ids, mask, vision)[:, -1]

        while not bool(finished.all()) and n_out < max_new_tokens:
            logits = self.mllm.lm_logits(h_last)  # [B,V]
            nxt = self._next_token(logits, do_sample, temperature, top_p, gen)
            nxt = nxt.masked_fill(finished, self.pad_token_id)
            emit(nxt, h_last)
            if bool(finished.all()) or n_out >= max_new_tokens:  # no LM step for an unused token
                break
            history = out_tokens[int((~finished).nonzero()[0])]
            # On the static path only the lead guess (verified in the prefill) is used: its steps are
            # one token each, replayed from a CUDA graph.
            draft = (
                _propose_draft(history, pool, min(max_draft, max_new_tokens - n_out - 1))
                if pool and not static
                else []
            )
            feed = torch.cat(
                [nxt[:, None], torch.tensor(draft, device=self.device, dtype=nxt.dtype).expand(b, -1)], 1
            )
            mask = full_mask[:, : mask.shape[1] + feed.shape[1]]
            if use_cache:
                step_pos = last_pos + torch.arange(1, feed.shape[1] + 1, device=self.device)
                last_pos = step_pos[:, -1:]
                if static:
                    hidden = decoder.step(feed, step_pos)
                else:
                    hidden = self.mllm.run_decoder(embed_table(feed), mask, step_pos, cache, True)
                h_last = accept(hidden, draft)
            else:
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                h_last = self._uncached_step(ids, mask, vision)[:, -1]

        sequences = [torch.tensor(toks, dtype=torch.long) for toks in out_tokens]
        texts = [self._decode_answer(toks) for toks in out_tokens]
        hid_dim = self.mllm.hidden_size
        stacked = [
            torch.stack(hs) if hs else torch.zeros(0, hid_dim, device=self.device, dtype=h_last.dtype)
            for hs in slot_hidden
        ]
        masks, seg_embeddings = self._slot_outputs(stacked, images if decode_masks else None, kinds)
        conversation = None
        if use_cache and b == 1:
            cache = decoder.to_dynamic() if static else cache
            fed = int(cache.get_seq_length()) - t  # answer tokens in the cache: a prefix of the answer
            conversation = (cache, torch.cat([ids[0, :t].cpu(), sequences[0][:fed]]))
        return GenerateOutput(sequences, texts, seg_embeddings, kinds, masks, conversation)

    def _static_path(self, requested: bool | None, use_cache: bool) -> bool:
        """Whether :meth:`generate` decodes over a :class:`StaticDecoder` (see its ``static_cache``)."""
        config = self.mllm.lm.config
        attn = getattr(config, "_attn_implementation", None)
        # The static cache keeps every position for every layer: full attention only.
        sliding = getattr(config, "sliding_window", None) is not None and getattr(
            config, "use_sliding_window", True
        )
        sliding = sliding or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ())
        why = (
            "use_cache=False"
            if not use_cache
            else f"attn_implementation={attn!r} (sdpa or eager needed)"
            if attn not in ("sdpa", "eager")
            else "an LM with sliding-window layers"
            if sliding
            else None
        )
        if requested is None:
            return why is None and self.device.type == "cuda"
        if requested and why is not None:
            raise ValueError(f"static_cache=True cannot be used with {why}")
        return bool(requested)

    def _static_decoder(self, batch: int, length: int) -> Any:
        """A :class:`StaticDecoder` for ``batch`` rows of at least ``length`` positions, reused across
        calls (lengths are rounded up to a multiple of 64 so that nearby prompts share one). Each holds
        its keys/values (a 7B LLaMA in bf16: 0.5 MB a position and row) and its graph's memory, so only
        the two most recently used are kept."""
        from reasonseg.model.graph_decode import StaticDecoder

        length = -(-length // 64) * 64
        key = (batch, length, self.device, self.dtype)
        pool = static_decoders(self)
        decoder = pool.pop(key, None)
        if decoder is None:
            # bitsandbytes' 8-bit layers synchronise inside their matmul (outlier columns), which a
            # graph cannot record, and an aborted recording leaves CUDA's random generator unusable.
            quantized = any(type(m).__module__.startswith("bitsandbytes") for m in self.mllm.lm.modules())
            capture = self.device.type == "cuda" and not quantized
            decoder = StaticDecoder(self.mllm, batch, length, self.device, capture=capture)
        pool[key] = decoder  # most recent last
        while len(pool) > 2:
            pool.pop(next(iter(pool)))
        return decoder

    def answer_drafts(self, answers: Sequence[str] = ()) -> list[list[int]]:
        """Token sequences for :meth:`generate`'s ``drafts``: ``answers`` (e.g. this session's earlier
        answers, most likely first), then the answer templates the model was trained with, each ending
        with the stop token."""
        from reasonseg.data.templates import REJECT_ANSWERS, SINGLE_ANSWERS

        texts = list(answers) + list(SINGLE_ANSWERS) + (list(REJECT_ANSWERS) if self.config.use_rej else [])
        cache: dict[str, list[int]] = self.__dict__.setdefault("_draft_cache", {})
        out: list[list[int]] = []
        for text in dict.fromkeys(texts):
            if text not in cache:
                # The answer's tokens as training saw them: inside a conversation, up to the stop token.
                from reasonseg.data.conversation import Turn, encode_conversation

                enc = encode_conversation(
                    self.tokenizer, self.config.template, [Turn("user", "?"), Turn("assistant", text)], 0
                )
                ids = enc.input_ids[enc.labels != -100].tolist()
                stop = set(self.stop_token_ids)
                end = next((k + 1 for k, x in enumerate(ids) if x in stop), len(ids))
                cache[text] = [int(x) for x in ids[:end]]
            out.append(cache[text])
        return out

    def _uncached_step(
        self, ids: torch.Tensor, mask: torch.Tensor, vision: torch.Tensor | None
    ) -> torch.Tensor:
        embeds = self.mllm.embed(ids, vision)
        return self.mllm.run_decoder(embeds, mask, positions_from_mask(mask))

    def _decode_answer(self, tokens: list[int]) -> str:
        toks = [t for t in tokens if t not in self.stop_token_ids]
        return self.tokenizer.decode(toks, skip_special_tokens=False).strip()

    @torch.no_grad()
    def prefix_cache(
        self,
        prefix_ids: torch.Tensor,
        images: ImageFeatures | None,
        *,
        start: tuple[Any, int] | None = None,
    ) -> tuple[Any, int]:
        """Keys/values of a prompt prefix [P] (e.g. system prompt + image tokens) for one image,
        reusable by :meth:`generate` (``prefix_cache=``) for every prompt that starts with it.

        ``start``: ``(cache, S)`` of the prefix's first S tokens (e.g. the text before the image, the
        same for every image: :meth:`prefix_cache` of those tokens with ``images=None``); it is copied,
        not consumed, and only the remaining P - S tokens are run.
        """
        from transformers import DynamicCache

        ids = prefix_ids.to(self.device)[None]
        mask = torch.ones_like(ids)
        s = 0
        if start is not None:
            cache, s = fork_cache(start[0]), int(start[1])
            if not 0 < s < ids.shape[1]:
                raise ValueError(f"prefix_cache: start covers {s} tokens of a {ids.shape[1]}-token prefix")
        else:
            cache = DynamicCache(config=self.mllm.lm.config)
        embeds = self.mllm.embed(ids[:, s:], images.vision_tokens if images is not None else None)
        self.mllm.run_decoder(embeds, mask, positions_from_mask(mask)[:, s:], cache, True)
        return cache, int(ids.shape[1])

    # ----------------------------------------------------------------------------------- save and load

    def save_pretrained(
        self, directory: str | Path, *, delta: bool = False, dtype: torch.dtype | None = None
    ) -> Path:
        """Write ``config.json`` + weights + tokenizer files to ``directory``.

        ``delta=False``: every weight in ``model.safetensors`` (loadable with no other download).
        ``delta=True``: only what differs from the base weights named in the config (LM ``pretrained``,
        SAM ``checkpoint``, CLIP ``clip_pretrained``) goes to ``delta.safetensors``: parts with no base
        in full, changed rows of a base matrix (e.g. new token rows) as rows, and a changed base matrix
        whose difference has low rank (a merged LoRA) as two factors. ``dtype`` (e.g. ``torch.float16``)
        stores the tensors at lower precision. See :mod:`reasonseg.model.delta`.
        """
        from safetensors.torch import save_model

        from reasonseg.model.delta import compute_delta, save_delta

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"format": "delta" if delta else "full", "format_version": FORMAT_VERSION}
        if delta:
            base = LisaModel.from_config(self.config, load_base=True, tokenizer=copy.deepcopy(self.tokenizer))
            tensors = compute_delta(self, base, base_prefixes=_base_prefixes(self.config))
            save_delta(tensors, out / DELTA_NAME, dtype=dtype)
            (out / WEIGHTS_NAME).unlink(missing_ok=True)
        else:
            if dtype is not None:
                raise ValueError(
                    "dtype applies to delta checkpoints; cast the model before saving a full one"
                )
            save_model(self, str(out / WEIGHTS_NAME))
            (out / DELTA_NAME).unlink(missing_ok=True)
        data = {**meta, **self.config.to_dict()}
        (out / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        self.tokenizer.save_pretrained(str(out))
        return out

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        progress: Callable[[str], None] | None = None,
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
        device: torch.device | str | None = None,
    ) -> LisaModel:
        """Load a directory written by :meth:`save_pretrained` (full or delta), strictly; then apply
        ``dtype``, ``quantization``, ``device`` (see :meth:`apply_memory_options`).

        ``progress`` receives one-line status messages (building, loading weights).
        """
        _check_memory_options(quantization, device)
        say = progress or (lambda msg: None)
        from safetensors.torch import load_model
        from transformers import AutoTokenizer

        from reasonseg.model.delta import apply_delta, load_delta

        root = Path(directory)
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: no config.json (not a reasonseg model directory)")
        try:
            data = json.loads(cfg_path.read_text())
        except ValueError as err:
            raise ValueError(f"{cfg_path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object, found {type(data).__name__}")
        fmt = data.pop("format", "full")
        data.pop("format_version", None)
        config = LisaConfig.from_dict(data)
        if not (root / "tokenizer.json").is_file() and not (root / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"{root}: no tokenizer.json (save_pretrained writes the tokenizer beside the weights)"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(root))
        say(f"building {config.name} ({fmt} checkpoint)")
        if fmt == "full":
            model = cls.from_config(config, load_base=False, tokenizer=tokenizer)
            say(f"loading {WEIGHTS_NAME}")
            with readable_safetensors(root / WEIGHTS_NAME):
                missing, unexpected = load_model(model, str(root / WEIGHTS_NAME), strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"{root / WEIGHTS_NAME}: strict load failed; missing {sorted(missing)[:8]} "
                    f"({len(missing)}), unexpected {sorted(unexpected)[:8]} ({len(unexpected)})"
                )
        elif fmt == "delta":
            model = cls.from_config(config, load_base=True, tokenizer=tokenizer)
            say(f"applying {DELTA_NAME} to the base weights")
            with readable_safetensors(root / DELTA_NAME):
                delta = load_delta(root / DELTA_NAME)
            apply_delta(model, delta)
        else:
            raise ValueError(f"{cfg_path}: unknown format {fmt!r} (expected 'full' or 'delta')")
        return model.apply_memory_options(dtype=dtype, quantization=quantization, device=device).eval()


@contextlib.contextmanager
def readable_safetensors(path: Path) -> Iterator[None]:
    """Turn safetensors' errors on a missing, truncated or corrupt weights file into one that names it."""
    from safetensors import SafetensorError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the model directory is incomplete)")
    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _check_memory_options(quantization: str | None, device: torch.device | str | None) -> None:
    if quantization is None:
        return
    from reasonseg.model.lm import _check_quantization

    _check_quantization(quantization, device)


def _base_prefixes(config: LisaConfig) -> list[str]:
    prefixes = []
    if config.lm.pretrained:
        prefixes.append("mllm.lm.")
    if config.sam.checkpoint:
        prefixes.append("sam.")
    if config.vision.kind == "clip" and config.vision.clip_pretrained:
        prefixes.append("mllm.vision_tower.")
    return prefixes


def _build_lm(config: LisaConfig, n_tokens: int, load_base: bool, sources: dict[str, str]) -> nn.Module:
    from reasonseg.model.lm import build_causal_lm, load_smollm2

    if load_base and config.lm.pretrained:
        from transformers import AutoModelForCausalLM

        path = str(load_smollm2()) if config.lm.pretrained == "smollm2" else config.lm.pretrained
        lm = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=config.lm.attn_implementation
        )
        sources["lm"] = path
        old = lm.get_input_embeddings().num_embeddings
        if old < n_tokens:
            # New rows start at the mean of the old ones, so an untrained [SEG] is an ordinary-looking
            # token; deterministic (unlike transformers' sampled mean_resizing), so an untrained model
            # and its base agree and a delta checkpoint stores only rows that training changed.
            lm.resize_token_embeddings(n_tokens, mean_resizing=False)
            with torch.no_grad():
                emb = lm.get_input_embeddings().weight
                emb[old:] = emb[:old].mean(dim=0)
                head = lm.get_output_embeddings()
                if head is not None and head.weight.data_ptr() != emb.data_ptr():
                    head.weight[old:] = head.weight[:old].mean(dim=0)
    else:
        hf = dict(config.lm.hf_config)
        if not config.lm.vocab_resolved:
            hf["vocab_size"] = n_tokens
        lm = build_causal_lm(hf, attn_implementation=config.lm.attn_implementation)
    config.lm.hf_config = _clean_hf_config(lm.config)
    config.lm.vocab_resolved = True
    return lm


def _build_sam(config: LisaConfig, load_base: bool, sources: dict[str, str]) -> nn.Module:
    from reasonseg.model.sam import build_sam

    checkpoint = None
    if load_base and config.sam.checkpoint:
        ck = config.sam.checkpoint
        if Path(ck).is_file():
            checkpoint = Path(ck)
        else:
            from reasonseg.weights import fetch

            checkpoint = fetch(ck)
        sources["sam"] = str(checkpoint)
    return build_sam(config.sam.name, checkpoint=checkpoint)


def _propose_draft(history: Sequence[int], pool: Sequence[Sequence[int]], limit: int) -> list[int]:
    """The continuation a draft offers after the longest (up to 4 tokens) tail of ``history`` it
    contains; with an empty history, the first draft from its start. At most ``limit`` tokens."""
    if limit <= 0:
        return []
    if not history:
        return list(pool[0][:limit]) if pool else []
    for n in range(min(4, len(history)), 0, -1):
        tail = list(history[-n:])
        for seq in pool:
            for i in range(len(seq) - n):
                if list(seq[i : i + n]) == tail:
                    return list(seq[i + n : i + n + limit])
    return []


def _drop_last_tokens(cache: Any, n: int) -> None:
    """Remove the last ``n`` positions from a ``transformers`` cache (rejected draft tokens)."""
    if n > 0:
        cache.crop(-n)  # negative: "remove this many" (transformers 4.x and 5.x)
