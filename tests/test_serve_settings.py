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


def _serve_args(argv: list[str]):  # type: ignore[no-untyped-def]
    from reasonseg.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_serve_flags_win_over_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults, then REASONSEG_SERVE_* variables, then the flags given on the command line."""
    from reasonseg.serving.commands import serve_settings

    monkeypatch.setenv("REASONSEG_SERVE_PORT", "8771")
    monkeypatch.setenv("REASONSEG_SERVE_TOKEN", "env-token-1234")
    monkeypatch.setenv("REASONSEG_SERVE_MAX_PIXELS", "1000")
    s = serve_settings(_serve_args(["--port", "8770", "--token", "cli-token-1234", "--cache-mb", "0"]))
    assert (s.port, s.token, s.max_pixels, s.cache_bytes) == (8770, "cli-token-1234", 1000, 0)
    s = serve_settings(_serve_args([]))  # nothing given: the variables, else the defaults
    assert (s.port, s.token, s.max_pixels, s.host, s.enable_page) == (
        8771,
        "env-token-1234",
        1000,
        "127.0.0.1",
        True,
    )
    assert not serve_settings(_serve_args(["--no-page"])).enable_page
    with pytest.raises(ValueError, match=r"^--token \*\*\*: must be at least 8 characters"):
        serve_settings(_serve_args(["--token", "short"]))
    monkeypatch.setenv("REASONSEG_SERVE_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match=r"environment variables.*max_batch_size"):
        serve_settings(_serve_args([]))
    assert serve_settings(_serve_args(["--max-batch-size", "4"])).max_batch_size == 4  # the flag wins
