"""Round-trips and bad-input handling of btd.data.io (DICOM, NIfTI, NRRD, npy, images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures_medical import (
    IDENTIFIERS,
    ct_phantom,
    mr_phantom,
    write_ct_series,
    write_dicom_series,
    write_nifti,
    write_nrrd,
    write_png,
)

from btd.data.io import (
    deidentify_name,
    pseudonym_map,
    read_dicom_file,
    read_dicom_series,
    read_volume,
)
from btd.errors import BTDInputError

FORBIDDEN_KEYS = ("patient", "name", "id", "date", "uid", "birth", "institution")


def assert_no_identifiers(meta: dict, extra: tuple[str, ...] = ()) -> None:
    """No identifying key and no identifying value anywhere in the metadata."""
    text = repr(meta).lower()
    for ident in IDENTIFIERS + extra:
        assert ident.lower() not in text, f"identifier {ident!r} leaked into {meta}"
    for key in meta:
        assert not any(word in key.lower() for word in FORBIDDEN_KEYS), key


# ----------------------------------------------------------------------------- DICOM


def test_ct_series_round_trip_values_spacing_order(tmp_path: Path) -> None:
    vol = ct_phantom((6, 32, 32), seed=3)
    paths = write_ct_series(tmp_path / "s", vol, spacing=(2.5, 0.7, 0.6), seed=3)
    assert [p.name for p in paths] != sorted(p.name for p in paths)  # file names not in z order
    out, spacing, meta = read_dicom_series(tmp_path / "s")
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, vol)  # HU restored through RescaleIntercept -1024
    assert spacing == (2.5, 0.7, 0.6)
    assert meta["modality"] == "CT" and meta["scanner"] == "VirtuCT 64"
    assert meta["kvp"] == 120 and meta["kernel"] == "STANDARD"
    assert (meta["rows"], meta["cols"], meta["n_slices"]) == (32, 32, 6)


def test_dicom_metadata_has_no_identifiers(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "s", series_uid="1.2.826.0.1.3680043.8.498.999")
    _, _, meta = read_volume(tmp_path / "s")
    assert_no_identifiers(meta, extra=("1.2.826.0.1.3680043.8.498.999",))


def test_mr_series_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    vol = mr_phantom((7, 16, 16))
    write_dicom_series(tmp_path / "m", vol, (1.5, 0.9, 0.9), modality="MR", reverse_instances=True)
    out, spacing, meta = read_volume(tmp_path / "m")
    assert out.dtype == np.float32 and meta["modality"] == "MR"
    np.testing.assert_array_equal(out, vol.astype(np.float32))
    assert spacing == (1.5, 0.9, 0.9)


def test_instance_number_fallback_without_positions(tmp_path: Path) -> None:
    vol = ct_phantom((4, 16, 16))
    vol += np.arange(4, dtype=np.int16)[:, None, None] * 100  # slice order visible in values
    for path in write_ct_series(tmp_path / "s", vol, spacing=(3.0, 1.0, 1.0)):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    out, spacing, _ = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(out, vol)
    assert spacing[0] == 3.0  # from SliceThickness


def test_read_single_dicom_file(tmp_path: Path) -> None:
    vol = ct_phantom((3, 16, 16))
    paths = write_ct_series(tmp_path / "s", vol, spacing=(2.0, 0.5, 0.5))
    out, spacing, _ = read_dicom_file(paths[0])
    assert out.shape == (1, 16, 16)
    assert any(np.array_equal(out[0], vol[k]) for k in range(3))
    assert spacing == (2.0, 0.5, 0.5)


def test_pydicom_real_ct_small_reads_plausible_hu() -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    vol, spacing, meta = read_volume(path)
    assert vol.shape == (1, 128, 128) and vol.dtype == np.int16
    p1, median, top = np.percentile(vol, [1, 50, 100])
    assert -1100 < p1 < -700  # air / lung (raw stored values are >= 128: rescale must be applied)
    assert -200 < median < 200  # soft tissue around 0 HU
    assert top > 500  # bone
    assert spacing == (5.0, 0.66147, 0.66147)
    assert meta["scanner"] == "RHAPSODE"
    header = pydicom.dcmread(path)
    assert_no_identifiers(meta, extra=(str(header.PatientName), str(header.PatientID)))


# ----------------------------------------------------------------------------- other formats


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_orientation(tmp_path: Path, orientation: str, suffix: str) -> None:
    vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # every voxel distinct
    path = write_nifti(tmp_path / f"v{suffix}", vol, (2.0, 0.8, 0.6), orientation)
    out, spacing, meta = read_volume(path)
    np.testing.assert_array_equal(out, vol)
    assert spacing == (2.0, 0.8, 0.6) and meta["format"] == "nifti"


def test_nrrd_round_trip_orientation(tmp_path: Path) -> None:
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    out, spacing, meta = read_volume(write_nrrd(tmp_path / "v.nrrd", vol, (2.0, 0.8, 0.6)))
    np.testing.assert_array_equal(out, vol)
    assert spacing == (2.0, 0.8, 0.6) and meta["format"] == "nrrd"


def test_npy_2d_is_one_slice_and_3d_kept(tmp_path: Path) -> None:
    slice_ = np.arange(12, dtype=np.int16).reshape(3, 4)
    np.save(tmp_path / "a.npy", slice_)
    out, spacing, meta = read_volume(tmp_path / "a.npy")
    np.testing.assert_array_equal(out, slice_[None])
    assert spacing == (1.0, 1.0, 1.0) and meta["spacing_known"] is False
    vol = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.save(tmp_path / "b.npy", vol)
    np.testing.assert_array_equal(read_volume(tmp_path / "b.npy")[0], vol)


def test_png_grayscale_and_rgb(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out, _, meta = read_volume(write_png(tmp_path / "g.png", gray))
    assert out.dtype == np.uint8 and meta["format"] == "image"
    np.testing.assert_array_equal(out, gray[None])
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(read_volume(write_png(tmp_path / "c.png", rgb))[0], gray[None])


# ----------------------------------------------------------------------------- bad input


def _raises_naming(path: Path, match: str) -> None:
    with pytest.raises(BTDInputError, match=match) as info:
        read_volume(path)
    assert path.name in str(info.value)


def test_corrupt_dicom_file(tmp_path: Path) -> None:
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    _raises_naming(bad, "DICOM")


def test_non_dicom_file_in_series_folder_is_named(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "s", ct_phantom((3, 16, 16)))
    (tmp_path / "s" / "notes.dcm").write_text("this is not DICOM")
    with pytest.raises(BTDInputError, match="notes.dcm"):
        read_volume(tmp_path / "s")


def test_truncated_dicom_pixel_data(tmp_path: Path) -> None:
    path = write_ct_series(tmp_path / "s", ct_phantom((1, 32, 32)))[0]
    path.write_bytes(path.read_bytes()[:-500])
    _raises_naming(path, "DICOM|pixel")


def test_truncated_npy(tmp_path: Path) -> None:
    path = tmp_path / "slice.npy"
    np.save(path, np.zeros((64, 64), np.int16))
    path.write_bytes(path.read_bytes()[:1000])
    _raises_naming(path, "truncated")


def test_nan_volume(tmp_path: Path) -> None:
    vol = np.zeros((2, 4, 4), np.float32)
    vol[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", vol)
    _raises_naming(tmp_path / "nan.npy", "NaN")
    _raises_naming(write_nifti(tmp_path / "nan.nii.gz", vol), "NaN")


@pytest.mark.parametrize("shape", [(5,), (2, 2, 2, 2)])
def test_wrong_ndim(tmp_path: Path, shape: tuple[int, ...]) -> None:
    np.save(tmp_path / "v.npy", np.zeros(shape, np.float32))
    _raises_naming(tmp_path / "v.npy", "shape")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _raises_naming(tmp_path / "empty", "empty folder")


def test_mixed_series_rows_columns(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "s", ct_phantom((2, 16, 16)), z0=0.0, seed=0)
    other = write_ct_series(tmp_path / "o", ct_phantom((1, 20, 16)), z0=50.0, seed=1)
    other[0].rename(tmp_path / "s" / "other.dcm")
    _raises_naming(tmp_path / "s", "mixed series")


def test_unsupported_extension_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "scan.txt").write_text("1 2 3")
    _raises_naming(tmp_path / "scan.txt", "unsupported")
    _raises_naming(tmp_path / "nope.nii.gz", "not found")


def test_corrupt_png_and_nifti(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _raises_naming(tmp_path / "x.png", "corrupt")
    (tmp_path / "x.nii.gz").write_bytes(b"not gzip at all")
    _raises_naming(tmp_path / "x.nii.gz", "corrupt")


# ----------------------------------------------------------------------------- pseudonyms


def test_pseudonyms_stable_and_free_of_names() -> None:
    mapping = pseudonym_map(["LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0002"], "lidc")
    assert mapping == {"LIDC-IDRI-0002": "lidc-0000", "LIDC-IDRI-0007": "lidc-0001"}
    a = deidentify_name("Doe^Jane", "duke")
    assert a == deidentify_name("Doe^Jane", "duke") and a.startswith("duke-")
    assert a != deidentify_name("Doe^Jane", "duke", salt="other")
    assert a != deidentify_name("Doe^John", "duke") and "doe" not in a.lower()
