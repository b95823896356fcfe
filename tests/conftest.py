"""Shared test helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from btd.data.records import ScanVolume, Tumour

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """A fresh clone has no data/raw (it is DVC-tracked): pull it from the bundled store, offline."""
    if not (ROOT / "data/raw/virtual_scanners").is_dir():
        subprocess.run(
            [sys.executable, "-m", "dvc", "pull", "-q", "data.dvc"], cwd=ROOT, check=True
        )


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def toy_scan(
    patient: str, scanner: str, modality: str = "ct", shape=(6, 64, 64), tumours=None, seed: int = 0
) -> ScanVolume:
    """A small synthetic scan with known tumours (for preprocessing tests)."""
    rng = np.random.default_rng(seed)
    if modality == "ct":
        vol = rng.normal(0, 20, shape).astype(np.int16)
    else:
        vol = rng.integers(0, 200, shape).astype(np.uint8)
    if tumours is None:
        tumours = [Tumour(z=shape[0] // 2, y=shape[1] // 2, x=shape[2] // 2, diameter_mm=8.0)]
    return ScanVolume(patient, modality, scanner, vol, (2.0, 1.0, 1.0), tumours)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test models gain nothing from threads, and oversubscribing 2 cores slows them 10x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
