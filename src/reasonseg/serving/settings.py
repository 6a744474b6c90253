"""Typed settings of the HTTP server, with safe defaults.

Everything a client can make expensive is bounded here: upload bytes, decoded pixels, instruction length,
conversation length, queue depth and the time a request may wait. The server listens on loopback unless the
operator names another host, and it never reads a file path sent by a client: images arrive as bytes only.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Collection
from dataclasses import dataclass, fields, replace

__all__ = ["ServeSettings"]

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """Server configuration; validated on construction (a bad value raises ``ValueError`` naming the field).

    Attributes:
        host: interface to bind; loopback by default. Binding anything else without a token logs a warning.
        port: TCP port (0 lets the OS choose, useful in tests).
        token: optional bearer token; when set, every ``/v1/*`` request needs ``Authorization: Bearer <token>``.
        max_upload_bytes: largest accepted request body (multipart file or base64 JSON, after decoding).
        max_pixels: largest accepted decoded image, width x height (decompression bombs stop here).
        max_side: largest accepted width or height in pixels.
        max_instruction_chars: longest accepted instruction, in characters (after stripping).
        max_history_turns: most previous turns kept per conversation (older ones are dropped).
        max_conversations: conversations remembered at once (least recently used ones are forgotten).
        request_timeout_s: a request that has not been answered after this many seconds gets a 504.
        max_batch_size: most requests run through the model together.
        max_wait_ms: how long the first request of a batch waits for others to join it.
        max_queue: requests waiting at once; beyond this new ones get a 503 (back-pressure, not a backlog).
        cache_bytes: memory budget of the image-encoder cache shared across requests (LRU by bytes).
        enable_page: serve the web page at ``/``.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 24_000_000
    max_side: int = 8192
    max_instruction_chars: int = 2000
    max_history_turns: int = 8
    max_conversations: int = 256
    request_timeout_s: float = 120.0
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 256
    cache_bytes: int = 512 * 1024 * 1024
    enable_page: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ValueError(f"ServeSettings.{name}={getattr(self, name)!r}: {why}")

        need(bool(self.host.strip()), "host", "must be a host name or address")
        need(0 <= self.port <= 65535, "port", "must be in 0..65535")
        need(self.token is None or len(self.token) >= 8, "token", "must be at least 8 characters when set")
        for name in (
            "max_upload_bytes",
            "max_pixels",
            "max_side",
            "max_instruction_chars",
            "max_conversations",
        ):
            need(getattr(self, name) > 0, name, "must be positive")
        need(self.max_history_turns >= 0, "max_history_turns", "must be >= 0")
        need(self.request_timeout_s > 0, "request_timeout_s", "must be positive")
        need(1 <= self.max_batch_size <= 256, "max_batch_size", "must be in 1..256")
        need(0 <= self.max_wait_ms <= 10_000, "max_wait_ms", "must be in 0..10000")
        need(self.max_queue >= 1, "max_queue", "must be >= 1")
        need(self.cache_bytes >= 0, "cache_bytes", "must be >= 0 (0 disables the cache)")

    @property
    def is_loopback(self) -> bool:
        """True when ``host`` only accepts connections from this machine."""
        if self.host in _LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def with_env(self, prefix: str = "REASONSEG_SERVE_", *, keep: Collection[str] = ()) -> ServeSettings:
        """A copy overridden by environment variables, e.g. ``REASONSEG_SERVE_TOKEN`` or ``..._MAX_PIXELS``;
        the fields named in ``keep`` (set on the command line) are not read from the environment."""
        changes: dict[str, object] = {}
        for f in fields(self):
            raw = os.environ.get(prefix + f.name.upper())
            if raw is None or f.name in keep:
                continue
            kind = type(getattr(self, f.name)) if getattr(self, f.name) is not None else str
            try:
                if kind is bool:
                    changes[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                else:
                    changes[f.name] = kind(raw)
            except ValueError as exc:
                raise ValueError(f"environment variable {prefix + f.name.upper()}={raw!r}: {exc}") from None
        return replace(self, **changes) if changes else self
