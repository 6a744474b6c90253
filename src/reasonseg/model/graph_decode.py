"""One-token LM steps over a preallocated KV cache, replayed from a CUDA graph.

On a GPU an eager decoding step of a 7B LLaMA is bound by the host, not the device: some 500 kernel
launches and the Python around them take ~30 ms, while the kernels need ~5 ms (the weights streamed
once). :class:`StaticDecoder` removes the host from the loop: the KV cache is allocated once for the
whole answer (:class:`StaticKVCache`, written in place at a position held in a device tensor), the
attention mask is built on the device from that position, and one step (embedding lookup, every
decoder layer, the final norm) is captured in a ``torch.cuda.CUDAGraph`` and replayed per token.

The same code runs without the graph (``capture=False``, and on a CPU): that path is what the tests
compare with the ordinary ``DynamicCache`` decoding, token for token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class StaticKVCache:
    """Keys/values of every layer in tensors sized ``max_len`` from the start, written in place.

    ``length`` (a 0-d device tensor) is the number of positions written; a call of :meth:`update` with
    ``n`` new positions writes columns ``length .. length+n-1`` and, at the last layer, advances it. The
    attention layers get the whole ``max_len`` columns back, so the mask must hide the unwritten ones.
    Implements the part of the ``transformers`` cache interface the decoder layers call (``update``,
    ``get_seq_length``).
    """

    def __init__(self, num_layers: int, max_len: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def _allocate(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, batch: int) -> None:
        """Layer ``layer_idx``'s tensors [batch, heads, max_len, d], shaped and typed like ``key`` /
        ``value`` [*, heads, n, d], on first use."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = key.new_zeros(batch, key.shape[1], self.max_len, key.shape[-1])
            self.values[layer_idx] = value.new_zeros(batch, value.shape[1], self.max_len, value.shape[-1])

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key``/``value`` [B, heads, n, d] at columns ``length .. length+n-1`` of layer
        ``layer_idx``; returns its whole [B, heads, max_len, d] keys and values."""
        self._allocate(layer_idx, key, value, key.shape[0])  # first call: the prefill
        n = key.shape[-2]
        where = torch.arange(n, device=key.device) + self.length
        self.keys[layer_idx].index_copy_(2, where, key)
        self.values[layer_idx].index_copy_(2, where, value)
        if layer_idx == self.num_layers - 1:
            self.length.add_(n)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions written (a host sync)."""
        return int(self.length)

    def load(self, cache: Any, batch: int) -> int:
        """Copy a ``transformers`` cache (1 row, shared by every row, or ``batch`` rows) into columns
        ``0 .. n-1`` and set ``length`` to ``n``; returns ``n``."""
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != self.num_layers:
            raise ValueError(
                f"StaticKVCache.load: expected a transformers cache with {self.num_layers} layers, "
                f"got {type(cache).__name__}"
            )
        n = 0
        for i, layer in enumerate(layers):
            k, v = layer.keys, layer.values
            if k.shape[0] not in (1, batch):
                raise ValueError(f"StaticKVCache.load: the cache has {k.shape[0]} rows for {batch} prompts")
            n = k.shape[-2]
            if n > self.max_len:
                raise ValueError(f"StaticKVCache.load: {n} positions do not fit in {self.max_len}")
            self._allocate(i, k, v, batch)
            self.keys[i][:, :, :n] = k
            self.values[i][:, :, :n] = v
        self.length.fill_(n)
        return n

    def to_dynamic(self, config: Any) -> Any:
        """A ``transformers`` ``DynamicCache`` holding copies of the written positions."""
        from transformers import DynamicCache

        n = int(self.length)
        out = DynamicCache(config=config)
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is None or v is None:
                raise RuntimeError("StaticKVCache.to_dynamic: the cache was never filled")
            out.update(k[:, :, :n].clone(), v[:, :, :n].clone(), i)
        return out


class StaticDecoder:
    """Greedy/sampled decoding support for :meth:`LisaModel.generate`: a prefill over the prompt, then
    one-token steps, all over one :class:`StaticKVCache` of ``max_len`` positions.

    One decoder serves many calls of the same batch size and ``max_len`` (:meth:`reset` between them):
    its cache tensors and the recorded graph are reused, so the graph is recorded once.
    Its tensors are made and changed in inference mode whatever mode the caller is in (a decoder
    first used under ``torch.inference_mode`` may be used again under ``torch.no_grad``); what it
    returns can be read anywhere, but not trained through.

    Args:
        mllm: the :class:`~reasonseg.model.mllm.MultimodalLM` (its ``decoder`` and embedding table).
        batch, max_len: rows, and cache positions per row (prompt + answer).
        device: where the cache lives.
        capture: record the one-token step in a CUDA graph at the first :meth:`step` and replay it
            afterwards (CUDA only). ``False``: run the same step eagerly.
    """

    def __init__(
        self, mllm: nn.Module, batch: int, max_len: int, device: torch.device, *, capture: bool
    ) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"StaticDecoder(capture=True) needs a CUDA device, got {device}")
        self.mllm = mllm
        self.valid = torch.ones((batch, max_len), dtype=torch.bool, device=device)
        n_layers = int(mllm.lm.config.num_hidden_layers)
        self.cache = StaticKVCache(n_layers, max_len, device)
        self.kv_index = torch.arange(max_len, device=device)
        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tok = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.out: torch.Tensor | None = None

    @torch.inference_mode()
    def reset(self, prompt_mask: torch.Tensor) -> None:
        """Start a new batch: ``prompt_mask`` [B,t] (1 at real tokens, 0 at left padding)."""
        t = prompt_mask.shape[1]
        if prompt_mask.shape[0] != self.valid.shape[0] or t >= self.valid.shape[1]:
            raise ValueError(
                f"StaticDecoder.reset: a prompt mask of shape {tuple(prompt_mask.shape)} does not fit a "
                f"cache of {self.valid.shape[0]} rows x {self.valid.shape[1]} positions"
            )
        self.valid.fill_(True)
        self.valid[:, :t] = prompt_mask.bool()
        self.cache.length.zero_()

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, start: int = 0) -> torch.Tensor:
        """embeds [B,t,H] at cache columns start..start+t-1, positions [B,t] -> hidden [B,t,H] (after
        :meth:`reset`, and :meth:`load_prefix` when ``start`` > 0)."""
        t = embeds.shape[1]
        query = torch.arange(start, start + t, device=embeds.device)
        causal = self.kv_index[None, :] <= query[:, None]  # [t, L]
        # A padding query attends to itself as well, so that no row of the mask is empty (an empty row
        # gives NaN, which would reach the masked keys of that column and from there every row).
        own = self.kv_index[None, :] == query[:, None]
        mask = (causal[None] & self.valid[:, None, :]) | own[None]  # [B, t, L]
        return self._run(embeds, mask[:, None], positions)

    @torch.inference_mode()
    def load_prefix(self, cache: Any) -> int:
        """Start from a prompt prefix's keys/values (a ``transformers`` cache of 1 or B rows, left as
        it is); returns its length. Call after :meth:`reset`."""
        return self.cache.load(cache, self.valid.shape[0])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B,1] at the next cache column, positions [B,1] -> hidden [B,1,H] (a new tensor)."""
        self.tok.copy_(tokens)
        self.pos.copy_(positions)
        if not self.capture:
            return self._one_token()
        if self.graph is None:
            self._record()
            if self.graph is None:  # recording failed: eager from now on
                return self._one_token()
        assert self.out is not None
        with torch.cuda.device(self.valid.device):
            self.graph.replay()
        return self.out.clone()

    def to_dynamic(self) -> Any:
        """A ``transformers`` ``DynamicCache`` [B, heads, written, d] of ordinary tensors (copies)."""
        with torch.inference_mode(False):  # ordinary tensors: the caller may extend them anywhere
            return self.cache.to_dynamic(self.mllm.lm.config)

    @torch.inference_mode()
    def drop_last(self, n: int) -> None:
        """Forget the last ``n`` written positions (a rejected draft); later steps overwrite them."""
        if n:
            self.cache.length.sub_(n)

    def _one_token(self) -> torch.Tensor:
        embeds = self.mllm.lm.get_input_embeddings()(self.tok)
        mask = self.valid & (self.kv_index <= self.cache.length)  # [B, L]: written columns + this one
        return self._run(embeds, mask[:, None, None, :], self.pos)

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # An additive mask (0 / most negative) is read the same by the sdpa and eager attentions.
        bias = torch.zeros(mask.shape, dtype=embeds.dtype, device=embeds.device)
        bias.masked_fill_(~mask, torch.finfo(embeds.dtype).min)
        return self.mllm.run_decoder(embeds, bias, positions, self.cache, True)

    def _record(self) -> None:
        """Record the step's graph; on failure warn and go on eagerly. The cache length is as before
        either way (the warm-up steps write the next column, which the real step overwrites)."""
        start = self.cache.length.clone()
        try:
            self._capture()
        except RuntimeError as err:  # e.g. an operation that synchronises, inside the LM's code
            import warnings

            warnings.warn(
                f"StaticDecoder: recording the CUDA graph failed ({str(err).splitlines()[0]}); "
                "decoding continues eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            self.capture, self.graph, self.out = False, None, None
        finally:
            self.cache.length.copy_(start)

    def _capture(self) -> None:
        # Warm-up on a side stream (lazy initialisations, library handles), as torch's graph capture
        # asks; each warm-up step is undone by moving the length back.
        start = self.cache.length.clone()
        with torch.cuda.device(self.valid.device):  # the model's GPU, not necessarily the current one
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._one_token()
                    self.cache.length.copy_(start)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self._one_token()
        self.graph = graph
