"""Loader for the BTD Kaggle test sets ("btd-mri-and-ct-deepfake-test-sets").

Layout (as the BTD demo notebook reads it): `CT/injection/CT_injection.csv`,
`CT/removal/CT_removal.csv` with 0/1 indicator columns `CTGAN-CT-injection`, `SD-CT-injection`,
`CTGAN-CT-removal`, `SD-CT-removal`; `MRI/MRI_injection.csv`, `MRI/MRI_removal.csv` (SD only).
Every CSV has `path, x, y, type`: CT rows point at 2-D HU `.npy` slices, MRI rows at 8-bit images,
`x` is the column and `y` the row of the (real or fake) tumour, `type` is TM/TB/FM/FB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from btd import scenarios
from btd.data.io import read_image
from btd.errors import BTDConfigError, BTDInputError
from btd.scenarios import ATTACKS, BENIGN_LABEL, FAKE_LABEL

#: TM, TB, FM, FB: true/fake malicious/benign (CT-GAN convention), from btd.scenarios.
LABELS = tuple(BENIGN_LABEL[a] for a in ATTACKS) + tuple(FAKE_LABEL[a] for a in ATTACKS)
TAMPERS = {"ct": ("CTGAN", "SD"), "mri": ("SD",)}
#: btd.scenarios attack -> the Kaggle set's word for it (its folders, CSVs and indicator columns).
KAGGLE_ATTACK = dict(zip(ATTACKS, ("injection", "removal"), strict=True))
_ATTACK_OF = {word: attack for attack, word in KAGGLE_ATTACK.items()}
#: what `attack` may be (either vocabulary) -> the Kaggle word.
_ATTACKS = {**{word: word for word in _ATTACK_OF}, **KAGGLE_ATTACK}
_SCANNER_COLUMNS = ("scanner", "Scanner", "ManufacturerModelName", "scanner_model", "model")
_REQUIRED = ("path", "x", "y", "type")


def scenario_name(tamper: str, modality: str, attack: str) -> str:
    """'CTGAN-CT-Inject', 'SD-MRI-Remove', ...: `btd.scenarios.scenario_name` of a Kaggle attack
    word ('injection' or 'removal')."""
    return scenarios.scenario_name(tamper, modality, _ATTACK_OF[attack])


def _normalise_args(modality: str, attack: str, tamper: str | None) -> tuple[str, str, list[str]]:
    mod = str(modality).lower()
    if mod not in TAMPERS:
        raise BTDConfigError("modality", f"'{modality}' is not 'ct' or 'mri'")
    att = _ATTACKS.get(str(attack).lower())
    if att is None:
        raise BTDConfigError("attack", f"'{attack}' is not 'injection' or 'removal'")
    if tamper is None:
        return mod, att, list(TAMPERS[mod])
    by_upper = {t.upper(): t for t in TAMPERS[mod]}
    if str(tamper).upper() not in by_upper:
        raise BTDConfigError("tamper", f"'{tamper}' is not one of {TAMPERS[mod]} for {mod}")
    return mod, att, [by_upper[str(tamper).upper()]]


def csv_path(root: Path, modality: str, attack: str) -> Path:
    """Where the demo notebook expects the CSV of one modality and attack."""
    if modality == "ct":
        return root / "CT" / attack / f"CT_{attack}.csv"
    return root / "MRI" / f"MRI_{attack}.csv"


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise BTDInputError(path, "BTD Kaggle CSV not found (expected the unzipped Kaggle layout)")
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise BTDInputError(path, f"not a readable CSV ({exc.__class__.__name__}: {exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise BTDInputError(path, f"missing column(s) {missing}; expected {list(_REQUIRED)}")
    df["_line"] = np.arange(len(df)) + 2  # file line of each row (header is line 1)
    return df


def _resolve(root: Path, csv: Path, stored: str, line: int) -> Path:
    """Find a stored path: relative to the unzip root or the CSV, or minus leading folders."""
    parts = [p for p in str(stored).replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise BTDInputError(csv, f"line {line}: empty 'path'")
    candidates = [Path(str(stored))] if Path(str(stored)).is_absolute() else []
    for base in (root, csv.parent):
        candidates += [base.joinpath(*parts[k:]) for k in range(len(parts))]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise BTDInputError(csv, f"line {line}: image file '{stored}' not found under {root}")


def _image_shape(path: Path, modality: str, csv: Path, line: int) -> tuple[int, ...]:
    """Image size without decoding pixels (npy header / image header)."""
    try:
        if modality == "ct":
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        from PIL import Image

        with Image.open(path) as img:
            return (img.height, img.width)
    except Exception as exc:
        raise BTDInputError(csv, f"line {line}: cannot read '{path.name}' ({exc})") from None


def _load_image(path: Path, modality: str, csv: Path, line: int) -> np.ndarray:
    """CT: 2-D HU slice from .npy (finite); MRI: 8-bit grayscale image."""
    if modality == "mri":
        return read_image(path)
    try:
        image = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BTDInputError(
            csv, f"line {line}: truncated or corrupt '{path.name}' ({exc})"
        ) from None
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2 or not np.issubdtype(image.dtype, np.number):
        raise BTDInputError(
            csv, f"line {line}: '{path.name}' is not a 2-D numeric slice ({image.shape})"
        )
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise BTDInputError(csv, f"line {line}: '{path.name}' has NaN/inf pixels")
    return image


def _coords(row: pd.Series, shape: tuple[int, ...], csv: Path) -> tuple[int, int]:
    line = int(row["_line"])
    try:
        x, y = float(row["x"]), float(row["y"])
    except (TypeError, ValueError):
        raise BTDInputError(
            csv, f"line {line}: x={row['x']!r}, y={row['y']!r} are not numbers"
        ) from None
    if not (np.isfinite(x) and np.isfinite(y)):
        raise BTDInputError(csv, f"line {line}: x/y are empty or not finite")
    height, width = shape[-2], shape[-1]
    if not (0 <= x < width and 0 <= y < height):
        raise BTDInputError(
            csv,
            f"line {line}: x={x:g}, y={y:g} is outside the {width}x{height} image '{row['path']}'",
        )
    return int(x), int(y)


def _label(row: pd.Series, csv: Path) -> str:
    label = str(row["type"]).strip().upper()
    if label not in LABELS:
        raise BTDInputError(
            csv, f"line {int(row['_line'])}: type={row['type']!r} is not one of {LABELS}"
        )
    return label


def _rows_for(df: pd.DataFrame, modality: str, attack: str, tamper: str, csv: Path) -> pd.DataFrame:
    """CT: rows flagged 1 in the tamper's indicator column; MRI: every row (SD only)."""
    if modality == "mri":
        return df
    column = f"{tamper}-CT-{attack}"
    if column not in df.columns:
        raise BTDInputError(csv, f"missing indicator column '{column}'")
    flags = pd.to_numeric(df[column], errors="coerce")
    return df[flags == 1]


def _scanner_column(df: pd.DataFrame) -> str | None:
    return next((c for c in _SCANNER_COLUMNS if c in df.columns), None)


def load_btd_kaggle(
    root: str | Path,
    modality: str,
    attack: str,
    tamper: str | None = None,
    load_images: bool = True,
) -> pd.DataFrame:
    """One row per test sample of one scenario (or all tampers of the attack when `tamper` is None).

    Columns: scenario, tamper, modality, attack, label (TM/TB/FM/FB), is_fake, x, y,
    path (resolved), line (CSV line), scanner (when the CSV has a scanner column), and
    image (the array) when `load_images`; otherwise images stay on disk and only their
    size is checked against x, y.
    """
    root = Path(root)
    modality, attack, tampers = _normalise_args(modality, attack, tamper)
    csv = csv_path(root, modality, attack)
    df = _read_csv(csv)
    scanner_col = _scanner_column(df)
    records: list[dict[str, Any]] = []
    for tamp in tampers:
        for _, row in _rows_for(df, modality, attack, tamp, csv).iterrows():
            line = int(row["_line"])
            path = _resolve(root, csv, row["path"], line)
            image = _load_image(path, modality, csv, line) if load_images else None
            shape = image.shape if image is not None else _image_shape(path, modality, csv, line)
            x, y = _coords(row, shape, csv)
            label = _label(row, csv)
            record = {
                "scenario": scenario_name(tamp, modality, attack),
                "tamper": tamp,
                "modality": modality,
                "attack": attack,
                "label": label,
                "is_fake": label in FAKE_LABEL.values(),
                "x": x,
                "y": y,
                "path": str(path),
                "line": line,
            }
            if scanner_col is not None:
                record["scanner"] = (
                    str(row[scanner_col]) if pd.notna(row[scanner_col]) else "unknown"
                )
            if load_images:
                record["image"] = image
            records.append(record)
    if not records:
        raise BTDInputError(csv, f"no rows for {modality}/{attack} with tamper {tampers}")
    return pd.DataFrame.from_records(records)
