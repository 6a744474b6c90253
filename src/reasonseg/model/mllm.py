"""A LLaVA-style multimodal LM built from parts: vision tower + projector + any HF causal LM.

Image tokens enter the LM as input embeddings: every position whose id is the image token id is
overwritten by the next projected image feature, row by row. The placeholder positions are found by
id (never by offset), and a row whose count differs from the tower's token count is an error.
"""

from __future__ import annotations

import torch
from torch import nn

from reasonseg.model.cpu_linear import use_cpu_linears

__all__ = ["MultimodalLM", "positions_from_mask"]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B,T] for (left-)padded rows: 0 at each row's first real token, counting up;
    padding positions get 0 (they are masked out anyway)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


class MultimodalLM(nn.Module):
    """Vision tower + projector + causal LM.

    Args:
        vision_tower: maps the tower's input (CLIP pixels [B,3,S,S], or SAM embeddings [B,256,h,w])
            to features [B,N,C].
        projector: [B,N,C] -> [B,N,H].
        lm: a Hugging Face causal LM (``AutoModelForCausalLM``); its decoder is ``lm.get_decoder()`` and
            its head ``lm.get_output_embeddings()``.
        image_token_id: the id of ``<image>``. It may lie outside the embedding table (official LISA
            checkpoints have no row for it): those positions are never looked up.
        num_image_tokens: N, image tokens per image.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        projector: nn.Module,
        lm: nn.Module,
        image_token_id: int,
        num_image_tokens: int,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.lm = lm
        use_cpu_linears(lm)  # faster CPU inference products (reasonseg.model.cpu_linear)
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)

    @property
    def decoder(self) -> nn.Module:
        return self.lm.get_decoder()

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    def image_tokens(self, tower_input: torch.Tensor) -> torch.Tensor:
        """Tower input -> projected image tokens [B,N,H]."""
        feats = self.vision_tower(tower_input)  # [B,N,C]
        if feats.shape[1] != self.num_image_tokens:
            raise ValueError(
                f"vision tower gave {feats.shape[1]} tokens per image, the config says {self.num_image_tokens}"
            )
        return self.projector(feats)

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B,T] + image_tokens [B,N,H] (row i for sample i) -> inputs_embeds [B,T,H].

        Raises:
            ValueError: a row holds a number of image-token ids other than N (or any, without images).
        """
        is_image = input_ids == self.image_token_id  # [B,T]
        counts = is_image.sum(dim=1)
        table = self.lm.get_input_embeddings()
        embeds = table(input_ids.masked_fill(is_image, 0))  # [B,T,H]
        if image_tokens is None:
            if bool(counts.any()):
                raise ValueError(
                    f"input_ids hold image token id {self.image_token_id} at {int(counts.sum())} positions "
                    "but no image features were given"
                )
            return embeds
        if image_tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{image_tokens.shape[0]} images for {input_ids.shape[0]} sequences")
        n = image_tokens.shape[1]
        bad = (counts != n).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"image placeholder count mismatch: rows {bad} hold {[int(counts[i]) for i in bad]} "
                f"image tokens (id {self.image_token_id}), each image gives {n}; expand <image> with "
                "encode_conversation(..., num_image_tokens=model.config.num_image_tokens)"
            )
        # Row-major order of the True positions matches image_tokens.reshape(B*N, H).
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_tokens.to(embeds.dtype).reshape(-1))
        return embeds

    def run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: object | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """The LM body: inputs_embeds [B,t,H] -> last-layer hidden states after the final norm [B,t,H].

        ``attention_mask`` [B,past+t] covers the cached positions too; ``past_key_values`` (a
        ``transformers`` ``Cache``) is updated in place when ``use_cache``.
        """
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [...,H] -> logits [...,V]."""
        return self.lm.get_output_embeddings()(hidden)
