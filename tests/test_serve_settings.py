"""Serving settings: safe defaults and validation that names the field."""

from __future__ import annotations

import pytest

from reasonseg.serving.settings import ServeSettings


def test_defaults_are_safe() -> None:
    s = ServeSettings()
    assert s.host == "127.0.0.1" and s.is_loopback and s.token is None
    assert s.max_upload_bytes <= 16 * 2**20 and s.max_pixels <= 50_000_000 and s.request_timeout_s > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"port": 70000}, "port"),
        ({"token": "short"}, "token"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"cache_bytes": -1}, "cache_bytes"),
        ({"host": " "}, "host"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"ServeSettings.{field}="):
        ServeSettings(**kwargs)  # type: ignore[arg-type]


def test_loopback_detection_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServeSettings(host="::1").is_loopback and ServeSettings(host="127.0.0.2").is_loopback
    assert not ServeSettings(host="0.0.0.0").is_loopback
    monkeypatch.setenv("REASONSEG_SERVE_MAX_PIXELS", "1000")
    monkeypatch.setenv("REASONSEG_SERVE_TOKEN", "a-long-token")
    monkeypatch.setenv("REASONSEG_SERVE_ENABLE_PAGE", "false")
    s = ServeSettings().with_env()
    assert (s.max_pixels, s.token, s.enable_page) == (1000, "a-long-token", False)
    monkeypatch.setenv("REASONSEG_SERVE_PORT", "eighty")
    with pytest.raises(ValueError, match="REASONSEG_SERVE_PORT"):
        ServeSettings().with_env()
