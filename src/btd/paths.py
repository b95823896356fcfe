"""Repository-root-relative paths, so notebooks work whatever their working directory."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("BTD_ROOT", Path(__file__).resolve().parents[2]))
DATA = ROOT / "data"
RAW = DATA / "raw"
SCANS = DATA / "scans"
PROCESSED = DATA / "processed"
MODELS = ROOT / "models"
REPORTS = ROOT / "reports"
FIGURES = REPORTS / "figures"
METRICS = ROOT / "metrics"


def resolve(path: str | Path) -> Path:
    """Absolute path for `path`, taken relative to the repository root when relative."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p
