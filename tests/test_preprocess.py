"""Preprocessing: normalisation, patches, patient splits, dataset files and their error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import toy_scan

from btd.atomic import write_atomic
from btd.data.dataset import build_patch_dataset, load_patch_dataset, save_patch_dataset
from btd.data.patches import extract_patch, healthy_sites, patch_origin, tumour_sites
from btd.data.preprocess import normalize_ct, normalize_mri_patient
from btd.data.records import Tumour
from btd.data.scans import load_scan, save_scan
from btd.data.simulate.protocols import load_protocols, select_scanners
from btd.data.splits import split_patients
from btd.errors import BTDConfigError, BTDInputError

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = {"train": 0.5, "val": 0.2, "holdout": 0.3}


def test_normalize_ct_known_values() -> None:
    hu = np.array([-1000, -700, 650, 2000, 3000])
    np.testing.assert_allclose(normalize_ct(hu), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_normalize_mri_is_per_patient_and_gain_invariant() -> None:
    rng = np.random.default_rng(1)
    vol = rng.gamma(2.0, 30.0, (4, 32, 32))
    a = normalize_mri_patient(vol)
    b = normalize_mri_patient(3.7 * vol + 12.0)  # another scanner gain/offset
    assert a.min() == 0.0 and a.max() == 1.0
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_patch_origin_shifts_inside_image() -> None:
    assert patch_origin(2, 2, 10, (50, 60)) == (0, 0)
    assert patch_origin(48, 58, 10, (50, 60)) == (40, 50)
    assert patch_origin(25, 30, 10, (50, 60)) == (20, 25)
    img = np.arange(50 * 60).reshape(50, 60)
    patch, py, px = extract_patch(img, 48, 58, 10)
    assert patch.shape == (10, 10) and patch[py, px] == img[48, 58]


def test_tumour_and_healthy_sites() -> None:
    scan = toy_scan("p1", "s", shape=(9, 64, 64), tumours=[Tumour(4, 32, 32, 8.0)])
    tm = tumour_sites(scan)
    assert {s.z for s in tm} == {3, 4, 5} or {s.z for s in tm} == {4}
    assert all(s.label == "TM" and (s.cy, s.cx) == (32, 32) for s in tm)
    pool = np.array([[32.0, 32.0], [10.0, 10.0], [50.0, 12.0]])
    tb = healthy_sites(scan, pool, per_slice=2, rng=np.random.default_rng(0), margin_mm=10)
    assert tb and all(s.label == "TB" for s in tb)
    for s in tb:  # never on the real tumour
        assert np.hypot((s.z - 4) * 2.0, np.hypot(s.cy - 32, s.cx - 32)) >= 4 + 10


def _cohort(n_per_scanner: int = 5, scanners=("a", "b", "c")):
    return [
        toy_scan(
            f"{sc}-{i}",
            sc,
            shape=(6, 64, 64),
            tumours=[Tumour(3, 20 + 3 * i, 40 - 2 * i, 6.0 + i)],
            seed=i,
        )
        for sc in scanners
        for i in range(n_per_scanner)
    ]


def test_split_patients_is_disjoint_and_covers_every_scanner() -> None:
    scans = _cohort(6)
    df = pd.DataFrame(
        {"patient": [s.patient for s in scans], "scanner": [s.scanner for s in scans]}
    )
    split = split_patients(df, FRACTIONS, seed=3)
    assert set(split) == set(df["patient"])  # every patient exactly one split (dict keys)
    df["split"] = df["patient"].map(split)
    assert (df.groupby("scanner")["split"].nunique() == 3).all()
    assert split == split_patients(df[["patient", "scanner"]], FRACTIONS, seed=3)


@pytest.mark.parametrize(
    "bad",
    [
        {"train": 0.5, "val": 0.5},
        {"train": 0.5, "val": 0.2, "holdout": 0.2},
        {"train": -1, "val": 1, "holdout": 1},
    ],
)
def test_bad_split_fractions_name_the_field(bad) -> None:
    df = pd.DataFrame({"patient": ["a"], "scanner": ["s"]})
    with pytest.raises(BTDConfigError, match="data.split"):
        split_patients(df, bad, 0)


def test_build_patch_dataset_round_trip(tmp_path: Path) -> None:
    scans = _cohort(4)
    patches, manifest = build_patch_dataset(scans, 16, 2, FRACTIONS, seed=0, margin_mm=4.0)
    assert patches.shape[1:] == (1, 16, 16) and patches.dtype == np.float32
    assert 0.0 <= patches.min() and patches.max() <= 1.0
    assert len(manifest) == len(patches) and (manifest["index"] == np.arange(len(patches))).all()
    assert set(manifest["label"]) == {"TM", "TB"}
    # no patient in two splits
    assert (manifest.groupby("patient")["split"].nunique() == 1).all()
    # TM rows carry the tumour's position inside the patch
    tm = manifest[manifest["label"] == "TM"].iloc[0]
    scan = next(s for s in scans if s.patient == tm["patient"])
    assert (tm["cy"], tm["cx"]) == (round(scan.tumours[0].y), round(scan.tumours[0].x))
    save_patch_dataset(tmp_path, patches, manifest)
    p2, m2 = load_patch_dataset(tmp_path, split="val")
    assert len(p2) == (manifest["split"] == "val").sum()
    np.testing.assert_array_equal(p2, patches[manifest.index[manifest["split"] == "val"]])


def test_annotation_outside_image_is_a_clear_error() -> None:
    scan = toy_scan("p9", "s", tumours=[Tumour(3, 80, 10, 5.0)])
    with pytest.raises(BTDInputError, match=r"p9.*outside the volume"):
        build_patch_dataset([scan], 16, 1, FRACTIONS, 0)


def test_unknown_scanner_in_params_names_the_field() -> None:
    protos = load_protocols(ROOT / "data/raw/virtual_scanners/ct.yaml", "ct")
    assert len(protos) == 5
    with pytest.raises(BTDConfigError, match=r"data.ct.scanners.*'nope-99'"):
        select_scanners(protos, ["helion-16", "nope-99"], "data.ct.scanners")
    assert len(load_protocols(ROOT / "data/raw/virtual_scanners/mri.yaml", "mri")) == 4


def test_bad_protocol_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "ct.yaml"
    p.write_text("scanners:\n  x:\n    dose_photons: 1\n")
    with pytest.raises(BTDInputError, match=r"ct.yaml.*missing"):
        load_protocols(p, "ct")
    p.write_text("scanners: [unclosed")
    with pytest.raises(BTDInputError, match="not valid YAML"):
        load_protocols(p, "ct")


def test_scan_file_round_trip_and_corruption(tmp_path: Path) -> None:
    scan = toy_scan("p1", "helion-16")
    path = save_scan(scan, tmp_path)
    back = load_scan(path)
    np.testing.assert_array_equal(back.volume, scan.volume)
    assert back.tumours == scan.tumours and back.spacing == scan.spacing
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BTDInputError, match="p1.npz"):
        load_scan(path)


def test_missing_patch_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BTDInputError, match="patches.npy.*preprocess"):
        load_patch_dataset(tmp_path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")

    def boom(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomic(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
