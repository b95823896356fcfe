"""LIDC-IDRI loader: one CT series per patient folder plus nodule annotations (XML or CSV).

Annotations come either as the LIDC-IDRI reader XML files (the format pylidc reads: one
`readingSession` per radiologist, `unblindedReadNodule/roi` with `imageZposition` and
`edgeMap/xCoord,yCoord` outlines) or as a simple CSV `patient, z, y, x, diameter_mm` in voxel
coordinates of the patient's series. Patients are returned under pseudonyms ('lidc-0000', ...).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
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
from btd.data.records import ScanVolume, Tumour
from btd.errors import BTDInputError

CSV_COLUMNS = ("patient", "z", "y", "x", "diameter_mm")
SMALL_NODULE_MM = 3.0  # LIDC marks nodules < 3 mm by a single point: no outline, so no extent
DEFAULT_MERGE_MM = 5.0  # marks closer than this (or overlapping) are one nodule seen by two readers
_TEXTURE_KIND = {1: "ground-glass", 2: "ground-glass", 3: "part-solid", 4: "part-solid", 5: "solid"}


@dataclass
class ReaderMark:
    """One radiologist's outline of one nodule, reduced to centre (voxels) and diameter (mm)."""

    session: int
    z: float
    y: float
    x: float
    diameter_mm: float
    kind: str


# ----------------------------------------------------------------------------- XML parsing


def _local(tag: str) -> str:
    """Tag name without its XML namespace ('{http://www.nih.gov}roi' -> 'roi')."""
    return tag.rsplit("}", 1)[-1]


def _children(node: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in node if _local(c.tag) == name]


def _child_text(node: ET.Element, name: str) -> str | None:
    found = _children(node, name)
    return found[0].text.strip() if found and found[0].text else None


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise BTDInputError(path, f"not a readable LIDC XML file ({exc})") from None


def xml_series_uid(root: ET.Element) -> str | None:
    """SeriesInstanceUid of the ResponseHeader (used only to match the XML to its series)."""
    for node in root.iter():
        if _local(node.tag).lower() == "seriesinstanceuid" and node.text:
            return node.text.strip()
    return None


def _slice_index(z_mm: float, positions: np.ndarray, tol: float, where: str, path: Path) -> int:
    """Nearest slice to an imageZposition; an annotation between or beyond slices is an error."""
    i = int(np.argmin(np.abs(positions - z_mm)))
    if abs(positions[i] - z_mm) > tol:
        raise BTDInputError(
            path,
            f"{where}: imageZposition={z_mm:g} mm is outside the image "
            f"(slices at {positions.min():g}..{positions.max():g} mm)",
        )
    return i


def _roi_points(roi: ET.Element, shape: tuple[int, int, int], where: str, path: Path) -> np.ndarray:
    """Edge-map points (x, y) of one ROI, checked against the image matrix."""
    points = []
    for edge in _children(roi, "edgeMap"):
        x, y = _child_text(edge, "xCoord"), _child_text(edge, "yCoord")
        try:
            points.append((float(x), float(y)))
        except (TypeError, ValueError):
            raise BTDInputError(path, f"{where}: edgeMap has a non-numeric xCoord/yCoord") from None
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    bad = (pts[:, 0] < 0) | (pts[:, 0] >= shape[2]) | (pts[:, 1] < 0) | (pts[:, 1] >= shape[1])
    if bad.any():
        x, y = pts[bad][0]
        raise BTDInputError(
            path,
            f"{where}: edgeMap xCoord={x:g}, yCoord={y:g} is outside the image "
            f"({shape[2]} columns x {shape[1]} rows)",
        )
    return pts


def _kind(nodule: ET.Element) -> str:
    for chars in _children(nodule, "characteristics"):
        texture = _child_text(chars, "texture")
        if texture and texture.isdigit():
            return _TEXTURE_KIND.get(int(texture), "solid")
    return "solid"


def _reader_mark(
    nodule: ET.Element, session: int, series: DicomSeries, path: Path
) -> ReaderMark | None:
    """Centroid of all included edge-map points of one nodule; diameter = widest in-plane extent."""
    positions = np.asarray(series.positions, dtype=float)
    tol = max(series.spacing[0] / 2, 0.01)
    name = _child_text(nodule, "noduleID") or "?"
    xs, ys, zs, extents = [], [], [], []
    for r, roi in enumerate(_children(nodule, "roi")):
        if (_child_text(roi, "inclusion") or "TRUE").upper() == "FALSE":
            continue  # exclusion outlines mark holes, not the nodule
        where = f"readingSession {session + 1}, nodule '{name}', roi {r + 1}"
        z_text = _child_text(roi, "imageZposition")
        try:
            z_mm = float(z_text)
        except (TypeError, ValueError):
            raise BTDInputError(path, f"{where}: missing or non-numeric imageZposition") from None
        k = _slice_index(z_mm, positions, tol, where, path)
        pts = _roi_points(roi, series.volume.shape, where, path)
        if len(pts) == 0:
            continue
        xs.extend(pts[:, 0])
        ys.extend(pts[:, 1])
        zs.extend([k] * len(pts))
        dy, dx = series.spacing[1], series.spacing[2]
        extents.append(max(np.ptp(pts[:, 0]) * dx, np.ptp(pts[:, 1]) * dy))
    if not xs:
        return None
    diameter = max(extents) if max(extents) > 0 else SMALL_NODULE_MM
    kind = _kind(nodule)
    return ReaderMark(
        session, float(np.mean(zs)), float(np.mean(ys)), float(np.mean(xs)), diameter, kind
    )


def parse_lidc_xml(path: Path, series: DicomSeries) -> list[ReaderMark]:
    """Every reader's nodule marks in one LIDC XML file, in voxel coordinates of `series`."""
    root = _parse_xml(path)
    marks = []
    sessions = [n for n in root.iter() if _local(n.tag) == "readingSession"]
    for s, session in enumerate(sessions):
        for nodule in _children(session, "unblindedReadNodule"):
            mark = _reader_mark(nodule, s, series, path)
            if mark is not None:
                marks.append(mark)
    return marks


# ----------------------------------------------------------------------------- merging readers


def _distance_mm(a: ReaderMark, b: ReaderMark, spacing: tuple[float, float, float]) -> float:
    d = np.array([a.z - b.z, a.y - b.y, a.x - b.x]) * np.asarray(spacing)
    return float(np.linalg.norm(d))


def merge_marks(
    marks: list[ReaderMark], spacing: tuple[float, float, float], merge_mm: float = DEFAULT_MERGE_MM
) -> list[Tumour]:
    """Group marks of the same nodule by different readers (closest pairs first), then average.

    Two groups join when some pair of their marks overlaps (centre distance below the sum of the
    radii, or below `merge_mm`) and no reader is in both: one reader's two marks stay two nodules.
    """
    groups: list[list[ReaderMark]] = [[m] for m in marks]
    pairs = sorted(
        (_distance_mm(a, b, spacing), i, j)
        for i, a in enumerate(marks)
        for j, b in enumerate(marks)
        if i < j and a.session != b.session
    )
    owner = list(range(len(marks)))
    for dist, i, j in pairs:
        a, b = marks[i], marks[j]
        if dist > max((a.diameter_mm + b.diameter_mm) / 2, merge_mm):
            continue
        gi, gj = owner[i], owner[j]
        if gi == gj or {m.session for m in groups[gi]} & {m.session for m in groups[gj]}:
            continue
        groups[gi].extend(groups[gj])
        for k, g in enumerate(owner):
            if g == gj:
                owner[k] = gi
        groups[gj] = []
    return [_average(g) for g in groups if g]


def _average(group: list[ReaderMark]) -> Tumour:
    kinds = sorted(m.kind for m in group)
    kind = max(kinds, key=kinds.count)
    return Tumour(
        z=float(np.mean([m.z for m in group])),
        y=float(np.mean([m.y for m in group])),
        x=float(np.mean([m.x for m in group])),
        diameter_mm=float(np.mean([m.diameter_mm for m in group])),
        kind=kind,
    )


# ----------------------------------------------------------------------------- CSV annotations


def read_annotation_csv(path: Path, columns: tuple[str, ...] = CSV_COLUMNS) -> pd.DataFrame:
    """A CSV with the required columns; readable error when the file or a column is missing."""
    if not path.is_file():
        raise BTDInputError(path, "annotation file not found")
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise BTDInputError(path, f"not a readable CSV ({exc.__class__.__name__}: {exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise BTDInputError(path, f"missing column(s) {missing}; expected {list(columns)}")
    return df


def _csv_tumour(row: pd.Series, line: int, shape: tuple[int, ...], path: Path) -> Tumour:
    """One CSV row as a Tumour, checked to lie inside the image."""
    values = {}
    for col in ("z", "y", "x", "diameter_mm"):
        try:
            values[col] = float(row[col])
        except (TypeError, ValueError):
            raise BTDInputError(path, f"line {line}: {col}={row[col]!r} is not a number") from None
        if not np.isfinite(values[col]):
            raise BTDInputError(path, f"line {line}: {col} is empty or not finite")
    for col, size in zip(("z", "y", "x"), shape, strict=True):
        if not 0 <= values[col] <= size - 1:
            raise BTDInputError(
                path,
                f"line {line} (patient {row['patient']}): {col}={values[col]:g} is outside the "
                f"image (0..{size - 1})",
            )
    if values["diameter_mm"] <= 0:
        raise BTDInputError(path, f"line {line}: diameter_mm must be > 0")
    kind = str(row["kind"]) if "kind" in row.index and pd.notna(row["kind"]) else "solid"
    return Tumour(values["z"], values["y"], values["x"], values["diameter_mm"], kind)


# ----------------------------------------------------------------------------- loader


def _patient_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise BTDInputError(root, "LIDC root folder not found")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise BTDInputError(root, "no patient folders")
    return dirs


def _ct_series_dir(patient_dir: Path) -> Path:
    """The patient's CT series: the CT folder with most slices (LIDC also holds CR/DX studies)."""
    candidates = find_series_folders(patient_dir)
    if not candidates:
        raise BTDInputError(patient_dir, "no DICOM (.dcm) files in this patient folder")
    ct = [d for d in candidates if str(series_header(d).get("Modality", "CT")) == "CT"]
    if not ct:
        raise BTDInputError(patient_dir, "no CT series in this patient folder")
    return max(ct, key=lambda d: (sum(1 for p in d.glob("*.dcm")), str(d)))


def _xml_index(annotations: Path) -> dict[str, list[Path]]:
    """XML files of a folder (or one file) keyed by the series they annotate."""
    files = [annotations] if annotations.is_file() else sorted(annotations.rglob("*.xml"))
    index: dict[str, list[Path]] = {}
    for path in files:
        root = _parse_xml(path)
        if not any(_local(n.tag) == "readingSession" for n in root.iter()):
            continue  # radiograph (IdriReadMessage) files carry no CT nodules
        uid = xml_series_uid(root)
        if uid is None:
            raise BTDInputError(
                path, "no SeriesInstanceUid in the ResponseHeader: cannot match a series"
            )
        index.setdefault(uid, []).append(path)
    return index


def _own_xml_files(patient_dir: Path, series_uid: str) -> list[Path]:
    """XML files in the patient folder that annotate this CT series (or name no series at all)."""
    files = []
    for path in sorted(patient_dir.rglob("*.xml")):
        uid = xml_series_uid(_parse_xml(path))
        if uid is None or uid == series_uid:
            files.append(path)
    return files


def _tumours_from_xml(files: list[Path], series: DicomSeries, merge_mm: float) -> list[Tumour]:
    marks: list[ReaderMark] = []
    for f_index, path in enumerate(files):
        for mark in parse_lidc_xml(path, series):
            mark.session += 1000 * f_index  # sessions of different files are different readers
            marks.append(mark)
    return merge_marks(marks, series.spacing, merge_mm)


def load_lidc(
    root: str | Path, annotations: str | Path | None = None, merge_mm: float = DEFAULT_MERGE_MM
) -> Iterator[ScanVolume]:
    """Yield each patient's CT (int16 HU) with its nodules, patients named 'lidc-NNNN'.

    `annotations`: None = LIDC XML files inside each patient folder; a folder or .xml file = XML
    matched to series by SeriesInstanceUid; a .csv = rows `patient, z, y, x, diameter_mm` where
    `patient` is the folder name and coordinates are voxels of that series.
    """
    root = Path(root)
    patients = _patient_dirs(root)
    names = pseudonym_map([p.name for p in patients], "lidc")
    csv_rows = xml_index = None
    if annotations is not None:
        annotations = Path(annotations)
        if annotations.suffix.lower() == ".csv":
            csv_rows = read_annotation_csv(annotations)
            csv_rows["patient"] = csv_rows["patient"].astype(str).str.strip()
            unknown = sorted(set(csv_rows["patient"]) - set(names))
            if unknown:
                raise BTDInputError(
                    annotations, f"patient(s) {unknown[:5]} have no folder under {root}"
                )
        elif annotations.exists():
            xml_index = _xml_index(annotations)
        else:
            raise BTDInputError(annotations, "annotation file or folder not found")
    for patient_dir in patients:
        series = load_dicom_series(_ct_series_dir(patient_dir))
        if series.meta["modality"] not in (None, "CT"):
            raise BTDInputError(patient_dir, f"expected a CT series, got {series.meta['modality']}")
        if csv_rows is not None:
            rows = csv_rows[csv_rows["patient"] == patient_dir.name]
            tumours = [
                _csv_tumour(row, int(i) + 2, series.volume.shape, annotations)
                for i, row in rows.iterrows()
            ]
        elif xml_index is not None:
            tumours = _tumours_from_xml(xml_index.get(series.series_uid, []), series, merge_mm)
        else:
            files = _own_xml_files(patient_dir, series.series_uid)
            tumours = _tumours_from_xml(files, series, merge_mm)
        yield ScanVolume(
            patient=names[patient_dir.name],
            modality="ct",
            scanner=series.meta["scanner"],
            volume=series.volume,
            spacing=series.spacing,
            tumours=tumours,
            source="lidc",
        )
