"""Duke-Breast-Cancer-MRI loader: one MRI series per patient folder plus `Annotation_Boxes.csv`.

The boxes (`Patient ID, Start Row, End Row, Start Column, End Column, Start Slice, End Slice`)
are 1-based and inclusive. Duke counts slices in InstanceNumber order, which in some series runs
against the slice positions, so slice numbers are mapped through InstanceNumber to our
position-sorted volume. Intensities stay float32; standardisation happens in preprocessing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from btd.data.io import (
    DicomSeries,
    find_series_folders,
    load_dicom_series,
    pseudonym_map,
    series_header,
)
from btd.data.lidc import read_annotation_csv
from btd.data.records import ScanVolume, Tumour
from btd.errors import BTDInputError

BOX_COLUMNS = (
    "Patient ID",
    "Start Row",
    "End Row",
    "Start Column",
    "End Column",
    "Start Slice",
    "End Slice",
)


def _box_ints(row: pd.Series, line: int, path: Path) -> dict[str, int]:
    values = {}
    for col in BOX_COLUMNS[1:]:
        try:
            value = float(row[col])
        except (TypeError, ValueError):
            raise BTDInputError(
                path, f"line {line}: '{col}'={row[col]!r} is not a number"
            ) from None
        if not np.isfinite(value) or not value.is_integer():
            raise BTDInputError(path, f"line {line}: '{col}'={row[col]!r} is not a whole number")
        values[col] = int(value)
    return values


def _check_range(
    box: dict[str, int], name: str, size: int, line: int, path: Path, pid: str
) -> None:
    start, end = box[f"Start {name}"], box[f"End {name}"]
    if not 1 <= start <= end <= size:
        raise BTDInputError(
            path,
            f"line {line} (patient {pid}): {name.lower()}s {start}..{end} are outside the image "
            f"(1..{size}, 1-based) or reversed",
        )


def _slice_to_index(series: DicomSeries, slice_1based: int) -> int:
    """Volume index of the n-th slice in InstanceNumber order (Duke's slice numbering)."""
    by_instance = sorted(
        range(len(series.instance_numbers)), key=lambda i: (series.instance_numbers[i], i)
    )
    return by_instance[slice_1based - 1]


def box_tumour(row: pd.Series, line: int, series: DicomSeries, path: Path) -> Tumour:
    """Tumour at the box centre (0-based voxels); diameter = mean of the three box extents in mm."""
    pid = str(row["Patient ID"])
    box = _box_ints(row, line, path)
    n_z, n_y, n_x = series.volume.shape
    for name, size in (("Row", n_y), ("Column", n_x), ("Slice", n_z)):
        _check_range(box, name, size, line, path, pid)
    z0 = _slice_to_index(series, box["Start Slice"])
    z1 = _slice_to_index(series, box["End Slice"])
    dz, dy, dx = series.spacing
    extents_mm = (
        (box["End Row"] - box["Start Row"] + 1) * dy,
        (box["End Column"] - box["Start Column"] + 1) * dx,
        (box["End Slice"] - box["Start Slice"] + 1) * dz,
    )
    return Tumour(
        z=(z0 + z1) / 2,
        y=(box["Start Row"] + box["End Row"]) / 2 - 1,
        x=(box["Start Column"] + box["End Column"]) / 2 - 1,
        diameter_mm=float(np.mean(extents_mm)),
        kind="mass",
    )


def _choose_series(patient_dir: Path, series: str | None) -> Path:
    """The patient's series folder: the only one, or the one whose name/description matches."""
    folders = find_series_folders(patient_dir)
    if not folders:
        raise BTDInputError(patient_dir, "no DICOM (.dcm) files in this patient folder")
    if len(folders) == 1 and series is None:
        return folders[0]
    labels = {f: f"{f.name} ({series_header(f).get('SeriesDescription', '')})" for f in folders}
    if series is None:
        raise BTDInputError(
            patient_dir,
            f"{len(folders)} series found, pass series= to choose one of: "
            f"{sorted(labels.values())}",
        )
    key = series.lower()
    chosen = [f for f, label in labels.items() if key in label.lower()]
    if len(chosen) != 1:
        raise BTDInputError(
            patient_dir,
            f"series='{series}' matches {len(chosen)} of the series "
            f"{sorted(labels.values())}; need exactly 1",
        )
    return chosen[0]


def load_duke(
    root: str | Path, boxes_csv: str | Path, series: str | None = None
) -> Iterator[ScanVolume]:
    """Yield each patient's MRI (float32) with its box tumour(s), patients named 'duke-NNNN'.

    `root/<Patient ID>/` holds the DICOM files (any depth). When a patient has several series,
    `series` picks one by a case-insensitive substring of its folder name or SeriesDescription.
    Patients without a box are yielded with no tumours.
    """
    root, boxes_csv = Path(root), Path(boxes_csv)
    if not root.is_dir():
        raise BTDInputError(root, "Duke root folder not found")
    boxes = read_annotation_csv(boxes_csv, BOX_COLUMNS)
    boxes["Patient ID"] = boxes["Patient ID"].astype(str).str.strip()
    patients = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not patients:
        raise BTDInputError(root, "no patient folders")
    names = pseudonym_map([p.name for p in patients], "duke")
    unknown = sorted(set(boxes["Patient ID"]) - set(names))
    if unknown:
        raise BTDInputError(boxes_csv, f"patient(s) {unknown[:5]} have no folder under {root}")
    for patient_dir in patients:
        data = load_dicom_series(_choose_series(patient_dir, series))
        if data.meta["modality"] not in (None, "MR"):
            raise BTDInputError(patient_dir, f"expected an MR series, got {data.meta['modality']}")
        rows = boxes[boxes["Patient ID"] == patient_dir.name]
        tumours = [box_tumour(row, int(i) + 2, data, boxes_csv) for i, row in rows.iterrows()]
        yield ScanVolume(
            patient=names[patient_dir.name],
            modality="mri",
            scanner=data.meta["scanner"],
            volume=data.volume.astype(np.float32, copy=False),
            spacing=data.spacing,
            tumours=tumours,
            source="duke",
        )
