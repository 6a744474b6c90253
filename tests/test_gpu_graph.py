"""CUDA only (skipped elsewhere; run on a lent GPU): generate's CUDA-graph path gives the same tokens as
the eager DynamicCache path, plain, with drafts and from a prefix cache, and records its graph once."""

from __future__ import annotations

import pytest
import torch

from lisa_tiny_helpers import prompt_ids, random_pixels, tiny_model, train_to_answer
from reasonseg.model.lisa import static_decoders

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_graph_generate_equals_the_eager_cache() -> None:
    from reasonseg.model.lisa import stack_caches

    model = tiny_model("gsva-7b")
    feats = model.encode_images(random_pixels(model, n=2, seed=1), original_hw=[(40, 56), (37, 29)])
    train_to_answer(model, feats.select([0]))
    model = model.to("cuda").eval()
    feats = model.encode_images(random_pixels(model, n=2, seed=1).cuda(), original_hw=[(40, 56), (37, 29)])
    prompts = [prompt_ids(model, "Segment the cat."), prompt_ids(model, "Where is the dog, if any?")]
    plen = int((prompts[0] == model.image_token_id).nonzero().max()) + 1
    prefixes = {
        "shared": (model.prefix_cache(prompts[0][:plen], feats.select([0])), feats.select([0, 0])),
        "per row": (
            (
                stack_caches([model.prefix_cache(prompts[0][:plen], feats.select([i]))[0] for i in (0, 1)]),
                plen,
            ),
            feats,
        ),
    }
    runs = [("plain", {}, feats), ("drafts", {"drafts": model.answer_drafts()}, feats)]
    runs += [
        (f"prefix {k}", {"prefix_cache": p, "drafts": model.answer_drafts()}, f)
        for k, (p, f) in prefixes.items()
    ]
    for name, kw, images in runs:
        eager = model.generate(prompts, images, max_new_tokens=20, static_cache=False, **kw)
        for _ in range(2):  # the second call replays the graph recorded by the first
            graph = model.generate(prompts, images, max_new_tokens=20, static_cache=True, **kw)
            assert [s.tolist() for s in graph.sequences] == [s.tolist() for s in eager.sequences], name
            for a, b in zip(graph.seg_embeddings, eager.seg_embeddings, strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    decoders = static_decoders(model)
    assert decoders and all(d.graph is not None for d in decoders.values())  # recorded, not eager
    assert model._static_path(None, True) is True  # the default on CUDA
