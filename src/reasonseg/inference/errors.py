"""Errors of the inference API that the serving layer maps to client errors (kept free of torch, so
that importing the web app does not import it)."""

from __future__ import annotations

__all__ = ["PromptTooLongError"]


class PromptTooLongError(ValueError):
    """The prompt and the answer's token budget do not fit the LM's context (``max_position_embeddings``)."""
