"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Parameter names match Meta's ``segment_anything``; attention is ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
from torch import nn

from reasonseg.model.sam.common import MLPBlock, attention, fusable, linear

__all__ = ["Attention", "TwoWayAttentionBlock", "TwoWayTransformer"]


class Attention(nn.Module):
    """Multi-head attention whose inner width may be ``embedding_dim / downsample_rate``.

    q: [B, Nq, C], k/v: [B, Nk, C] -> [B, Nq, C].
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(
                f"Attention: num_heads {num_heads} must divide the inner width {self.internal_dim}"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, heads, N, d]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention output (+ ``residual``, [B, Nq, C], added inside the output projection)."""
        few = self.num_heads * min(q.shape[1], k.shape[1])
        if (
            q.dtype == torch.float32
            and fusable(q, self.q_proj.weight)
            and 2 * few <= self.internal_dim
            and max(q.shape[1], k.shape[1]) >= 256
        ):
            if k.shape[1] < q.shape[1]:
                return self._few_keys(q, k, v, residual)
            return self._few_queries(q, k, v, residual)
        q_, k_, v_ = (
            self._heads(linear(t, proj)) for t, proj in ((q, self.q_proj), (k, self.k_proj), (v, self.v_proj))
        )
        out = attention(q_, k_, v_)
        b, _, n, _ = out.shape
        return linear(out.transpose(1, 2).reshape(b, n, self.internal_dim), self.out_proj, residual=residual)

    # The mask decoder's cross attentions join a few prompt tokens (T: 6 for one prompt) and h*w image
    # tokens (4096). Per head the scores and the output are bilinear in the image tokens, so the two
    # projections on the image side can be folded into the T tokens' side: products of width
    # heads * T (48) instead of the inner width (128) on the 4096 rows. Equal in exact arithmetic; in
    # float32 within rounding (tests/test_sam_model.py). CPU inference in float32 only (``fusable``),
    # where the 4096-row products are most of a follow-up query's mask decoding; bf16 keeps the plain
    # form, whose accuracy the bf16 tests measured (the folded form was timed and checked on an
    # AVX2-only CPU, which has no fast bf16).

    def _few_keys(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """Many queries (image tokens) attend to few keys (prompt tokens): the query projection is
        folded into the keys, the output projection into the values."""
        b, nk, c = k.shape
        h, d = self.num_heads, self.internal_dim // self.num_heads
        scale = d**-0.5
        keys = linear(k, self.k_proj).view(b, nk, h, d) * scale
        values = linear(v, self.v_proj).view(b, nk, h, d)
        # scores[b, n, (h, j)] = q[b, n] . (Wq_h^T keys[b, j, h]) + bq_h . keys[b, j, h]
        fold_q = torch.einsum("hdc,bjhd->bchj", self.q_proj.weight.view(h, d, c), keys).reshape(b, c, h * nk)
        bias_q = torch.einsum("hd,bjhd->bhj", self.q_proj.bias.view(h, d), keys).reshape(b, 1, h * nk)
        probs = _softmax_short(torch.baddbmm(bias_q, q, fold_q).view(b, -1, h, nk))
        # out[b, n] = sum_(h, j) probs[b, n, h, j] (Wo_h values[b, j, h] + bo / h): each head's
        # probabilities sum to 1, so the output bias rides along as bo / heads per head.
        fold_o = torch.einsum("bjhd,chd->bhjc", values, self.out_proj.weight.view(c, h, d))
        fold_o = (fold_o + self.out_proj.bias / h).reshape(b, h * nk, c)
        probs = probs.view(b, -1, h * nk)
        return torch.bmm(probs, fold_o) if residual is None else torch.baddbmm(residual, probs, fold_o)

    def _few_queries(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """Few queries (prompt tokens) attend to many keys (image tokens): the key projection is folded
        into the queries and the value projection applied after the weighted sum."""
        b, nq, c = q.shape
        h, d = self.num_heads, self.internal_dim // self.num_heads
        queries = linear(q, self.q_proj).view(b, nq, h, d) * d**-0.5
        # scores[b, (h, n), j] = (Wk_h^T queries[b, n, h]) . k[b, j] + queries . bk_h; the last term is
        # the same for every key j, and softmax over j drops it.
        fold_k = torch.einsum("bnhd,hdc->bhnc", queries, self.k_proj.weight.view(h, d, c)).reshape(
            b, h * nq, c
        )
        # Scores as [B, keys, (h, n)]: the 4096-row product runs faster in this orientation.
        probs = torch.bmm(k, fold_k.transpose(1, 2)).softmax(1)
        mixed = torch.bmm(probs.transpose(1, 2), v).view(b, h, nq, c)  # sum_j probs v[b, j], per head, query
        out = torch.einsum("bhnc,hdc->bnhd", mixed, self.v_proj.weight.view(h, d, c)) + self.v_proj.bias.view(
            h, d
        )
        return linear(out.reshape(b, nq, self.internal_dim), self.out_proj, residual=residual)


def _softmax_short(x: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dimension (a few prompt tokens): [..., T] -> [..., T].

    ``torch.softmax`` over a last dimension of 6 on 32,768 rows took 2.8 ms on a 2-core CPU, these
    four element-wise passes 0.8 ms."""
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention.

    Post-norm after each of the four steps; positional encodings are re-added before every attention
    (the first block's self-attention skips them, as in the original).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Nq, C], keys [B, Nk, C] (+ their PEs) -> updated (queries, keys)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = self.self_attn(q, q, queries, residual=queries)
        queries = self.norm1(queries)

        # ``keys`` does not change until the last step, so keys + key_pe serves both cross attentions.
        k = keys + key_pe
        queries = self.norm2(self.cross_attn_token_to_image(queries + query_pe, k, keys, residual=queries))
        queries = self.norm3(self.mlp(queries, residual=queries))

        keys = self.norm4(self.cross_attn_image_to_token(k, queries + query_pe, queries, residual=keys))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of two-way blocks plus a final token->image attention.

    forward(image_embedding [B, C, h, w], image_pe [B, C, h, w], point_embedding [B, N, C])
    -> (queries [B, N, C], keys [B, h*w, C]).
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, C, h, w] -> [B, h*w, C], made contiguous once: transposed views would otherwise be copied
        # again by every projection and propagate their strides through every add.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        return self.forward_tokens(keys, key_pe, point_embedding)

    def forward_tokens(
        self, keys: torch.Tensor, key_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` on image tokens already laid out as keys [B, h*w, C] and key_pe [B|1, h*w, C]."""
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(self.final_attn_token_to_image(q, k, keys, residual=queries))
        return queries, keys
