"""Known-answer tests of the real-data loaders: LIDC-IDRI, Duke breast MRI, BTD Kaggle test sets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_medical import (
    DUKE_HEADER,
    IDENTIFIERS,
    circle_points,
    write_csv,
    write_duke_case,
    write_kaggle_tree,
    write_lidc_case,
    write_lidc_xml,
)

from btd.data.btd_kaggle import load_btd_kaggle
from btd.data.duke import load_duke
from btd.data.lidc import ReaderMark, load_lidc, merge_marks
from btd.data.records import ScanVolume
from btd.errors import BTDConfigError, BTDInputError


def assert_tumours(scan: ScanVolume, expected: list[dict]) -> None:
    assert len(scan.tumours) == len(expected)
    for got, want in zip(scan.tumours, expected, strict=True):
        for key in ("z", "y", "x", "diameter_mm"):
            assert getattr(got, key) == pytest.approx(want[key], abs=1e-6), (key, got, want)
        if "kind" in want:
            assert got.kind == want["kind"]


def assert_anonymous(scan: ScanVolume, folder_name: str) -> None:
    text = f"{scan.patient} {scan.scanner} {scan.source}".lower()
    assert folder_name.lower() not in text
    assert not any(ident.lower() in text for ident in IDENTIFIERS)


# ----------------------------------------------------------------------------- LIDC


def test_lidc_xml_known_answer_centre_diameter_and_merge(tmp_path: Path) -> None:
    case = write_lidc_case(tmp_path / "lidc")
    (scan,) = list(load_lidc(tmp_path / "lidc"))
    assert scan.patient == "lidc-0000" and scan.modality == "ct" and scan.source == "lidc"
    assert scan.scanner == "Sensation 16"
    assert scan.volume.dtype == np.int16 and scan.volume.shape == (8, 48, 48)
    assert scan.spacing == (2.5, 0.7, 0.7)
    # two readers at x=20 and x=22 -> one nodule at x=21; lone GGO; point nodule -> 3 mm
    assert_tumours(scan, case["expected"])
    assert_anonymous(scan, "LIDC-IDRI-0001")


def test_lidc_xml_folder_matched_by_series_uid(tmp_path: Path) -> None:
    first = write_lidc_case(tmp_path / "lidc", "LIDC-IDRI-0009", seed=1)
    second = write_lidc_case(tmp_path / "lidc", "LIDC-IDRI-0002", seed=2, scanner=None)
    xml_dir = tmp_path / "xml"
    for i, case in enumerate((first, second)):
        xml_dir.mkdir(exist_ok=True)
        shutil.move(case["xml"], xml_dir / f"{i:03d}.xml")
    scans = list(load_lidc(tmp_path / "lidc", xml_dir))
    assert [s.patient for s in scans] == ["lidc-0000", "lidc-0001"]  # sorted folder names
    assert scans[0].scanner == "unknown"  # LIDC-IDRI-0002 has no ManufacturerModelName
    for scan in scans:
        assert_tumours(scan, first["expected"])


def test_lidc_exclusion_roi_ignored_and_no_namespace(tmp_path: Path) -> None:
    case = write_lidc_case(tmp_path / "lidc", with_xml=False)
    z = case["z_mm"]
    nodule = {
        "id": "N1",
        "rois": [(z[5], circle_points(30, 30, 4)), (z[5], circle_points(10, 10, 6), "FALSE")],
    }
    write_lidc_xml(case["xml"], case["series_uid"], [[nodule]], namespace="")
    (scan,) = list(load_lidc(tmp_path / "lidc"))
    assert_tumours(scan, [{"z": 5, "y": 30, "x": 30, "diameter_mm": 8 * 0.7}])


def test_lidc_same_reader_marks_never_merged() -> None:
    a = ReaderMark(session=0, z=5, y=20, x=20, diameter_mm=6, kind="solid")
    b = ReaderMark(session=0, z=5, y=20, x=23, diameter_mm=6, kind="solid")
    c = ReaderMark(session=1, z=5, y=20, x=21, diameter_mm=6, kind="solid")
    far = ReaderMark(session=1, z=5, y=20, x=60, diameter_mm=6, kind="solid")
    tumours = merge_marks([a, b, c, far], spacing=(1.0, 1.0, 1.0))
    assert [round(t.x, 3) for t in tumours] == [20.5, 23.0, 60.0]


def test_lidc_xml_outside_image_names_file_and_field(tmp_path: Path) -> None:
    case = write_lidc_case(tmp_path / "lidc", with_xml=False)
    nodule = {"id": "N1", "rois": [(case["z_mm"][2], [(10, 10), (60, 12)])]}  # 48 columns
    write_lidc_xml(case["xml"], case["series_uid"], [[nodule]])
    with pytest.raises(BTDInputError, match=r"069\.xml.*xCoord=60") as info:
        list(load_lidc(tmp_path / "lidc"))
    assert "outside the image" in str(info.value)
    nodule = {"id": "N1", "rois": [(500.0, [(10, 10)])]}
    write_lidc_xml(case["xml"], case["series_uid"], [[nodule]])
    with pytest.raises(BTDInputError, match=r"069\.xml.*imageZposition=500"):
        list(load_lidc(tmp_path / "lidc"))


def test_lidc_csv_annotations_and_bad_row(tmp_path: Path) -> None:
    write_lidc_case(tmp_path / "lidc", with_xml=False)
    rows = [("LIDC-IDRI-0001", 3, 24.5, 21, 7.0), ("LIDC-IDRI-0001", 6, 10, 38, 5.6)]
    csv = write_csv(tmp_path / "ann.csv", ("patient", "z", "y", "x", "diameter_mm"), rows)
    (scan,) = list(load_lidc(tmp_path / "lidc", csv))
    assert_tumours(
        scan,
        [
            {"z": 3, "y": 24.5, "x": 21, "diameter_mm": 7.0},
            {"z": 6, "y": 10, "x": 38, "diameter_mm": 5.6},
        ],
    )
    rows.append(("LIDC-IDRI-0001", 3, 24, 48, 7.0))  # x = 48 in a 48-column image
    write_csv(csv, ("patient", "z", "y", "x", "diameter_mm"), rows)
    with pytest.raises(BTDInputError, match=r"ann\.csv.*line 4.*x=48.*outside the image"):
        list(load_lidc(tmp_path / "lidc", csv))
    write_csv(csv, ("patient", "z", "y", "x"), [r[:4] for r in rows])
    with pytest.raises(BTDInputError, match="diameter_mm"):
        list(load_lidc(tmp_path / "lidc", csv))


# ----------------------------------------------------------------------------- Duke


@pytest.mark.parametrize("reverse", [True, False])
def test_duke_box_centre_known_answer(tmp_path: Path, reverse: bool) -> None:
    case = write_duke_case(tmp_path / "duke", reverse_instances=reverse)
    boxes = write_csv(tmp_path / "Annotation_Boxes.csv", DUKE_HEADER, [case["row"]])
    (scan,) = list(load_duke(tmp_path / "duke", boxes))
    assert scan.patient == "duke-0000" and scan.modality == "mri" and scan.source == "duke"
    assert scan.volume.dtype == np.float32 and scan.spacing == (1.2, 0.8, 0.8)
    np.testing.assert_array_equal(scan.volume, case["volume"].astype(np.float32))
    assert_tumours(scan, [case["expected"]])
    # box (rows 11..20, cols 5..14, slices 3..6 of 10): centre row 14.5, col 8.5 (0-based)
    assert (scan.tumours[0].y, scan.tumours[0].x) == (14.5, 8.5)
    assert scan.tumours[0].z == (5.5 if reverse else 3.5)
    assert_anonymous(scan, "Breast_MRI_001")


def test_duke_patients_without_box_and_series_choice(tmp_path: Path) -> None:
    case = write_duke_case(tmp_path / "duke", descriptions=("ax dyn pre", "ax dyn 1st pass"))
    write_duke_case(tmp_path / "duke", "Breast_MRI_002", descriptions=("ax dyn 1st pass",))
    boxes = write_csv(tmp_path / "boxes.csv", DUKE_HEADER, [case["row"]])
    with pytest.raises(BTDInputError, match="Breast_MRI_001.*2 series found.*pass series="):
        list(load_duke(tmp_path / "duke", boxes))
    scans = list(load_duke(tmp_path / "duke", boxes, series="1st"))
    assert [s.patient for s in scans] == ["duke-0000", "duke-0001"]
    assert len(scans[0].tumours) == 1 and scans[1].tumours == []


def test_duke_box_outside_image_names_csv_and_line(tmp_path: Path) -> None:
    case = write_duke_case(tmp_path / "duke")
    bad = (case["row"][0], 11, 20, 5, 14, 3, 11)  # 10 slices only
    boxes = write_csv(tmp_path / "boxes.csv", DUKE_HEADER, [bad])
    with pytest.raises(BTDInputError, match=r"boxes\.csv.*line 2.*slices 3\.\.11.*outside"):
        list(load_duke(tmp_path / "duke", boxes))
    write_csv(boxes, DUKE_HEADER[:-1], [bad[:-1]])
    with pytest.raises(BTDInputError, match="End Slice"):
        list(load_duke(tmp_path / "duke", boxes))


# ----------------------------------------------------------------------------- BTD Kaggle

SCENARIOS = [
    ("ct", "injection", "CTGAN", "CTGAN-CT-Inject"),
    ("ct", "injection", "SD", "SD-CT-Inject"),
    ("ct", "removal", "CTGAN", "CTGAN-CT-Remove"),
    ("ct", "removal", "SD", "SD-CT-Remove"),
    ("mri", "injection", None, "SD-MRI-Inject"),
    ("mri", "removal", "SD", "SD-MRI-Remove"),
]


@pytest.mark.parametrize(("modality", "attack", "tamper", "scenario"), SCENARIOS)
def test_kaggle_labels_and_scenarios(
    tmp_path: Path, modality: str, attack: str, tamper: str | None, scenario: str
) -> None:
    counts = write_kaggle_tree(tmp_path / "k")
    df = load_btd_kaggle(tmp_path / "k", modality, attack, tamper)
    assert set(df["scenario"]) == {scenario}
    assert df["label"].value_counts().to_dict() == counts[scenario]
    assert (df["is_fake"] == df["label"].str.startswith("F")).all()
    for _, row in df.iterrows():
        image = row["image"]
        assert image.ndim == 2 and 0 <= row["x"] < image.shape[1] and 0 <= row["y"] < image.shape[0]
        if modality == "ct":
            assert image.dtype == np.int16
            np.testing.assert_array_equal(image, np.load(row["path"]))
        else:
            assert image.dtype == np.uint8
    assert ("scanner" in df.columns) == (modality == "ct")


def test_kaggle_all_tampers_and_lazy_images(tmp_path: Path) -> None:
    write_kaggle_tree(tmp_path / "k")
    df = load_btd_kaggle(tmp_path / "k", "CT", "inject", load_images=False)
    assert "image" not in df.columns and all(Path(p).is_file() for p in df["path"])
    assert df.groupby("scenario").size().to_dict() == {"CTGAN-CT-Inject": 4, "SD-CT-Inject": 4}
    assert set(df["scanner"]) == {"LightSpeed16", "Sensation 16"}


def test_kaggle_paths_with_leading_folder_resolve(tmp_path: Path) -> None:
    write_kaggle_tree(tmp_path / "k")
    csv = tmp_path / "k" / "MRI" / "MRI_injection.csv"
    df = pd.read_csv(csv)
    df["path"] = "btd-mri-and-ct-deepfake-test-sets/" + df["path"]
    df.to_csv(csv, index=False)
    assert len(load_btd_kaggle(tmp_path / "k", "mri", "injection")) == 4


def _edit_csv(csv: Path, line: int, column: str, value: object) -> None:
    df = pd.read_csv(csv)
    df[column] = df[column].astype(object)
    df.loc[line - 2, column] = value
    df.to_csv(csv, index=False)


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("path", "CT/injection/missing.npy", "line 3.*missing.npy.*not found"),
        ("x", 64, "line 3.*x=64.*outside"),
        ("y", -1, "line 3.*y=-1.*outside"),
        ("type", "XX", "line 3.*type='XX'"),
    ],
)
def test_kaggle_bad_rows_name_csv_and_line(
    tmp_path: Path, column: str, value: object, match: str
) -> None:
    write_kaggle_tree(tmp_path / "k")
    csv = tmp_path / "k" / "CT" / "injection" / "CT_injection.csv"
    _edit_csv(csv, 3, column, value)
    with pytest.raises(BTDInputError, match=r"CT_injection\.csv.*" + match):
        load_btd_kaggle(tmp_path / "k", "ct", "injection", "CTGAN")


def test_kaggle_bad_arguments_and_missing_indicator(tmp_path: Path) -> None:
    write_kaggle_tree(tmp_path / "k")
    with pytest.raises(BTDConfigError, match="modality"):
        load_btd_kaggle(tmp_path / "k", "pet", "injection")
    with pytest.raises(BTDConfigError, match="tamper"):
        load_btd_kaggle(tmp_path / "k", "mri", "injection", "CTGAN")
    with pytest.raises(BTDConfigError, match="attack"):
        load_btd_kaggle(tmp_path / "k", "ct", "swap")
    csv = tmp_path / "k" / "CT" / "removal" / "CT_removal.csv"
    pd.read_csv(csv).drop(columns="SD-CT-removal").to_csv(csv, index=False)
    with pytest.raises(BTDInputError, match="CT_removal.csv.*SD-CT-removal"):
        load_btd_kaggle(tmp_path / "k", "ct", "removal", "SD")
    with pytest.raises(BTDInputError, match="not found"):
        load_btd_kaggle(tmp_path / "nowhere", "ct", "removal", "SD")
