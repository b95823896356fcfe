"""Repository-root-relative paths, so notebooks work whatever their working directory."""

from __future__ import annotations

import os
from pathlib import Path


def find_root() -> Path:
    """The project root: $BTD_ROOT, else the nearest folder above the cwd holding dvc.yaml, else the source tree.

    Looking from the cwd first means a copy of the repository (a DVC experiment workspace, a test's temporary
    clone) writes into itself even when the package was installed from another checkout.
    """
    if os.environ.get("BTD_ROOT"):
        return Path(os.environ["BTD_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return Path(__file__).resolve().parents[2]


ROOT = find_root()


def resolve(path: str | Path) -> Path:
    """Absolute path for `path`, taken relative to the project root when relative."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p
