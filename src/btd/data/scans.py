"""Store scanned volumes on disk (one .npz per patient) and read them back, with no patient identifiers."""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from btd.atomic import write_atomic
from btd.data.records import ScanVolume, Tumour
from btd.errors import BTDInputError


def save_scan(scan: ScanVolume, folder: str | Path) -> Path:
    """Write `<folder>/<patient>.npz` atomically: volume, spacing and tumour list."""
    path = Path(folder) / f"{scan.patient}.npz"
    meta = {
        "patient": scan.patient,
        "modality": scan.modality,
        "scanner": scan.scanner,
        "source": scan.source,
        "spacing": list(scan.spacing),
        "tumours": [asdict(t) for t in scan.tumours],
    }

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, volume=scan.volume, meta=np.array(json.dumps(meta)))

    return write_atomic(path, _write)


def load_scan(path: str | Path) -> ScanVolume:
    """Read one stored scan; a damaged file is a clear error naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            volume = z["volume"]
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise BTDInputError(
            path, f"not a readable BTD scan file ({exc.__class__.__name__}: {exc})"
        ) from None
    return ScanVolume(
        patient=meta["patient"],
        modality=meta["modality"],
        scanner=meta["scanner"],
        volume=volume,
        spacing=tuple(meta["spacing"]),
        tumours=[Tumour(**t) for t in meta["tumours"]],
        source=meta["source"],
    )


def load_scans(folder: str | Path) -> list[ScanVolume]:
    """Every stored scan in a folder, in patient order."""
    files = sorted(Path(folder).glob("*.npz"))
    if not files:
        raise BTDInputError(folder, "no scans (*.npz) found; run the preprocess stage first")
    return [load_scan(f) for f in files]
