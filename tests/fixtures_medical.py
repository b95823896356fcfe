"""Writers of small medical files for tests: DICOM series, LIDC/Duke/Kaggle-like trees, NIfTI, NRRD.

Importable helpers (not pytest fixtures) so any test can build the files it needs in tmp_path.
DICOM files carry deliberately identifying headers (PatientName, PatientID, dates, UIDs) so tests
can check that nothing of them leaks into the loaders' output.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-SECRET-4711"
BIRTH_DATE = "19610203"
STUDY_DATE = "20200415"
INSTITUTION = "Secret General Hospital"
IDENTIFIERS = (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE, INSTITUTION, "Doe", "Jane")


# ----------------------------------------------------------------------------- volumes


def ct_phantom(shape: tuple[int, int, int] = (6, 32, 32), seed: int = 0) -> np.ndarray:
    """Small int16 HU volume: air outside, a water-like body, a lung region and a bright 'bone'."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.mgrid[:y, :x]
    body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
    lung = ((yy - y / 2) / (0.2 * y)) ** 2 + ((xx - x / 3) / (0.12 * x)) ** 2 <= 1
    slice_ = np.full((y, x), -1000.0)
    slice_[body] = 40.0
    slice_[lung] = -850.0
    slice_[int(0.75 * y), x // 2] = 1200.0
    vol = np.repeat(slice_[None], z, axis=0) + rng.normal(0, 10, size=shape)
    return np.clip(np.round(vol), -1024, 3000).astype(np.int16)


def mr_phantom(shape: tuple[int, int, int] = (10, 40, 40), seed: int = 0) -> np.ndarray:
    """Small uint16 MR-like magnitude volume with a gradient so slice order is recognisable."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(50, 150, size=shape).astype(np.uint16)
    vol += (np.arange(shape[0]) * 100).astype(np.uint16)[:, None, None]
    return vol


# ----------------------------------------------------------------------------- DICOM


def _write_dataset(path: Path, ds: Any) -> None:
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:  # pydicom 2.4
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    spacing: tuple[float, float, float] = (2.5, 0.7, 0.7),
    *,
    modality: str = "CT",
    scanner: str | None = "VirtuCT 64",
    z0: float = -100.0,
    reverse_instances: bool = False,
    description: str = "",
    series_uid: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """One series, uncompressed explicit-VR little endian, file names in shuffled (not z) order.

    CT stores HU + 1024 as unsigned 16 bit with RescaleIntercept -1024 (as scanners do); MR stores
    the magnitude with no rescale. `reverse_instances` numbers slices against z (Duke-style).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        MRImageStorage,
        generate_uid,
    )

    folder.mkdir(parents=True, exist_ok=True)
    n_z, rows, cols = volume.shape
    dz, dy, dx = spacing
    intercept = -1024 if modality == "CT" else 0
    stored = (volume.astype(np.int64) - intercept).astype(np.uint16)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(n_z)
    paths = []
    for k in range(n_z):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"IM{order[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = STUDY_DATE
        ds.InstitutionName = INSTITUTION
        ds.Modality, ds.Manufacturer = modality, "Virtual Imaging Co"
        if scanner is not None:
            ds.ManufacturerModelName = scanner
        if modality == "CT":
            ds.KVP, ds.ConvolutionKernel = 120, "STANDARD"
        else:
            ds.MagneticFieldStrength = 1.5
        ds.SeriesDescription = description
        ds.InstanceNumber = n_z - k if reverse_instances else k + 1
        ds.ImagePositionPatient = [-0.5 * cols * dx, -0.5 * rows * dy, z0 + k * dz]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        _write_dataset(path, ds)
        paths.append(path)
    return paths


def write_ct_series(folder: Path, volume: np.ndarray | None = None, **kwargs: Any) -> list[Path]:
    """A CT series of `volume` (default: `ct_phantom()`) with identifying headers set."""
    return write_dicom_series(folder, ct_phantom() if volume is None else volume, **kwargs)


# ----------------------------------------------------------------------------- LIDC


def circle_points(cx: float, cy: float, r: int, n: int = 16) -> list[tuple[int, int]]:
    """Integer outline points symmetric about (cx, cy): centroid exactly (cx, cy), extent 2r."""
    angles = np.arange(n) * 2 * np.pi / n
    return [(int(cx + round(r * np.cos(a))), int(cy + round(r * np.sin(a)))) for a in angles]


def write_lidc_xml(
    path: Path,
    series_uid: str,
    readers: Sequence[Sequence[dict[str, Any]]],
    namespace: str = "http://www.nih.gov",
) -> Path:
    """LIDC reader XML: `readers[s]` = nodules of session s, each {'id', 'rois': [(z_mm, points)]},
    optional 'texture' (1..5) and per-roi inclusion via (z_mm, points, 'FALSE')."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<LidcReadMessage xmlns="{namespace}" uid="1.3.6.1.4.1.14519.5.2.1.6279.6001.1">',
        "  <ResponseHeader>",
        "    <Version>1.8.1</Version>",
        "    <StudyInstanceUID>1.3.6.1.4.1.14519.5.2.1.6279.6001.2</StudyInstanceUID>",
        f"    <SeriesInstanceUid>{series_uid}</SeriesInstanceUid>",
        "    <DateService>2000-01-01</DateService>",
        "  </ResponseHeader>",
    ]
    for s, nodules in enumerate(readers):
        lines += [
            "  <readingSession>",
            f"    <servicingRadiologistID>{s + 100}</servicingRadiologistID>",
        ]
        for nodule in nodules:
            lines += ["    <unblindedReadNodule>", f"      <noduleID>{nodule['id']}</noduleID>"]
            if "texture" in nodule:
                lines += [
                    "      <characteristics>",
                    f"        <texture>{nodule['texture']}</texture>",
                    "      </characteristics>",
                ]
            for roi in nodule["rois"]:
                z_mm, points = roi[0], roi[1]
                inclusion = roi[2] if len(roi) > 2 else "TRUE"
                lines += [
                    "      <roi>",
                    f"        <imageZposition>{z_mm:.6f}</imageZposition>",
                    "        <imageSOP_UID>1.2.3.4</imageSOP_UID>",
                    f"        <inclusion>{inclusion}</inclusion>",
                ]
                for x, y in points:
                    lines.append(
                        f"        <edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                    )
                lines.append("      </roi>")
            lines.append("    </unblindedReadNodule>")
        lines.append("  </readingSession>")
    lines.append("</LidcReadMessage>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def write_lidc_case(
    root: Path,
    patient: str = "LIDC-IDRI-0001",
    shape: tuple[int, int, int] = (8, 48, 48),
    spacing: tuple[float, float, float] = (2.5, 0.7, 0.7),
    z0: float = -100.0,
    scanner: str | None = "Sensation 16",
    with_xml: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """TCIA-like `root/<patient>/<study>/<series>/*.dcm` + XML with two readers of one nodule,
    one nodule seen by reader 1 only and a < 3 mm point nodule. Returns the expected nodules."""
    from pydicom.uid import generate_uid

    uid = generate_uid()
    series_dir = root / patient / "01-01-2000-study" / "3000566-series"
    write_dicom_series(
        series_dir,
        ct_phantom(shape, seed),
        spacing,
        z0=z0,
        scanner=scanner,
        series_uid=uid,
        seed=seed,
    )
    z_mm = [z0 + k * spacing[0] for k in range(shape[0])]
    radii = {2: 3, 3: 5, 4: 3}  # slice index -> outline radius in pixels
    reader_a = {
        "id": "Nodule 001",
        "texture": 5,
        "rois": [(z_mm[k], circle_points(20, 24, r)) for k, r in radii.items()],
    }
    reader_b = {
        "id": "IL057_1",
        "texture": 5,
        "rois": [(z_mm[k], circle_points(22, 24, r)) for k, r in radii.items()],
    }
    lone = {"id": "Nodule 002", "texture": 1, "rois": [(z_mm[6], circle_points(38, 10, 4))]}
    point = {"id": "small 1", "rois": [(z_mm[1], [(8, 40)])]}
    xml = series_dir / "069.xml"
    if with_xml:
        write_lidc_xml(xml, uid, [[reader_a, lone], [reader_b, point]])
    expected = [
        {"z": 3.0, "y": 24.0, "x": 21.0, "diameter_mm": 10 * spacing[2], "kind": "solid"},
        {"z": 6.0, "y": 10.0, "x": 38.0, "diameter_mm": 8 * spacing[2], "kind": "ground-glass"},
        {"z": 1.0, "y": 40.0, "x": 8.0, "diameter_mm": 3.0, "kind": "solid"},
    ]
    return {
        "series_dir": series_dir,
        "xml": xml,
        "series_uid": uid,
        "z_mm": z_mm,
        "expected": expected,
    }


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- Duke


DUKE_HEADER = (
    "Patient ID",
    "Start Row",
    "End Row",
    "Start Column",
    "End Column",
    "Start Slice",
    "End Slice",
)


def write_duke_case(
    root: Path,
    patient: str = "Breast_MRI_001",
    shape: tuple[int, int, int] = (10, 40, 40),
    spacing: tuple[float, float, float] = (1.2, 0.8, 0.8),
    box: tuple[int, int, int, int, int, int] = (11, 20, 5, 14, 3, 6),
    reverse_instances: bool = True,
    descriptions: Sequence[str] = ("ax dyn 1st pass",),
    seed: int = 0,
) -> dict[str, Any]:
    """Duke-like `root/<patient>/<study>/<series>/*.dcm` (slices numbered against z) + its box row.

    `box` = (start row, end row, start col, end col, start slice, end slice), 1-based inclusive,
    slices counted in InstanceNumber order."""
    volume = mr_phantom(shape, seed)
    dirs = []
    for s, desc in enumerate(descriptions):
        d = root / patient / "01-01-1990-MRI BREAST" / f"{s + 3}.000000-{desc.replace(' ', '_')}"
        write_dicom_series(
            d,
            volume,
            spacing,
            modality="MR",
            scanner="Optima MR450w",
            z0=-40.0,
            reverse_instances=reverse_instances,
            description=desc,
            seed=seed + s,
        )
        dirs.append(d)
    r0, r1, c0, c1, s0, s1 = box
    n_z = shape[0]
    if reverse_instances:  # InstanceNumber k sits at volume index n_z - k
        z_centre = ((n_z - s0) + (n_z - s1)) / 2
    else:
        z_centre = (s0 + s1) / 2 - 1
    expected = {
        "z": z_centre,
        "y": (r0 + r1) / 2 - 1,
        "x": (c0 + c1) / 2 - 1,
        "diameter_mm": (
            (r1 - r0 + 1) * spacing[1] + (c1 - c0 + 1) * spacing[2] + (s1 - s0 + 1) * spacing[0]
        )
        / 3,
    }
    return {"dirs": dirs, "row": (patient, *box), "expected": expected, "volume": volume}


# ----------------------------------------------------------------------------- BTD Kaggle


CT_INDICATORS = {
    "injection": ("CTGAN-CT-injection", "SD-CT-injection"),
    "removal": ("CTGAN-CT-removal", "SD-CT-removal"),
}


def write_kaggle_tree(root: Path, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """A miniature BTD Kaggle tree. CT injection: 2 FM per tamper + 2 TB shared by both tampers;
    removal: 2 FB per tamper + 2 TM shared. MRI (SD only): 2 fakes + 2 reals per attack.
    Stored paths are relative to `root`, as in the Kaggle CSVs.
    Returns the label counts of each scenario."""
    rng = np.random.default_rng(seed)
    fake_label = {"injection": "FM", "removal": "FB"}
    real_label = {"injection": "TB", "removal": "TM"}
    counts: dict[str, dict[str, int]] = {}
    for attack in ("injection", "removal"):
        ind_gan, ind_sd = CT_INDICATORS[attack]
        rows = []
        plan = [(fake_label[attack], 1, 0)] * 2 + [(fake_label[attack], 0, 1)] * 2
        plan += [(real_label[attack], 1, 1)] * 2
        for i, (label, gan, sd) in enumerate(plan):
            rel = f"CT/{attack}/{label.lower()}_{i:03d}.npy"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / rel, rng.integers(-1000, 1500, size=(size, size)).astype(np.int16))
            x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
            rows.append((rel, x, y, label, gan, sd, "LightSpeed16" if i % 2 else "Sensation 16"))
        write_csv(
            root / "CT" / attack / f"CT_{attack}.csv",
            ("path", "x", "y", "type", ind_gan, ind_sd, "scanner"),
            rows,
        )
        verb = "Inject" if attack == "injection" else "Remove"
        for tamper in ("CTGAN", "SD"):
            counts[f"{tamper}-CT-{verb}"] = {fake_label[attack]: 2, real_label[attack]: 2}
        rows = []
        for i, label in enumerate([fake_label[attack]] * 2 + [real_label[attack]] * 2):
            rel = f"MRI/{attack}/{label.lower()}_{i:03d}.png"
            write_png(root / rel, rng.integers(0, 256, size=(size, size)).astype(np.uint8))
            rows.append((rel, int(rng.integers(0, size)), int(rng.integers(0, size)), label))
        write_csv(root / "MRI" / f"MRI_{attack}.csv", ("path", "x", "y", "type"), rows)
        counts[f"SD-MRI-{verb}"] = {fake_label[attack]: 2, real_label[attack]: 2}
    return counts


# ----------------------------------------------------------------------------- other formats


def write_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_nifti(
    path: Path,
    volume: np.ndarray,
    spacing: tuple[float, float, float] = (2.0, 0.8, 0.6),
    orientation: str = "RAS",
) -> Path:
    """NIfTI of a (Z, Y, X) volume in DICOM display order (X -> patient left, Y -> posterior).

    'RAS' stores the array flipped to the canonical RAS+ layout; 'LPS' stores it as is with a
    negative-diagonal affine. Both must read back to the same `volume`."""
    import nibabel as nib

    dz, dy, dx = spacing
    if orientation == "RAS":
        data = volume[:, ::-1, ::-1].transpose(2, 1, 0)
        affine = np.diag([dx, dy, dz, 1.0])
    else:
        data = volume.transpose(2, 1, 0)
        affine = np.diag([-dx, -dy, dz, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    return path


def write_nrrd(
    path: Path, volume: np.ndarray, spacing: tuple[float, float, float] = (2.0, 0.8, 0.6)
) -> Path:
    """NRRD (LPS space, Fortran axis order x, y, z as ITK/Slicer write it) of a (Z, Y, X) volume."""
    import nrrd

    dz, dy, dx = spacing
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([dx, dy, dz]),
        "space origin": np.zeros(3),
    }
    nrrd.write(str(path), np.ascontiguousarray(volume.transpose(2, 1, 0)), header)
    return path
