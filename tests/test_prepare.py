"""Issue 14 items 1-2: `btd prepare`, checkpoint metadata, `btd scan` matching the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_medical import ct_phantom, write_ct_series, write_nifti

from btd.cli import main
from btd.data.dataset import (
    common_pixel_mm,
    load_patch_dataset,
    read_dataset_info,
    training_data_info,
)
from btd.data.prepare import prepare_dataset
from btd.data.preprocess import CT_HU_MAX, CT_HU_MIN
from btd.detect.scan import tile_starts
from btd.diffusion.checkpoint import read_checkpoint, read_checkpoint_metadata
from btd.diffusion.train import TrainConfig, train
from btd.errors import BTDInputError

P = 16
TINY = {"dim": 8, "dim_mults": (1, 2), "attn_heads": 1, "attn_dim_head": 8}
TINY_ARGS = ["--dim", "8", "--dim-mults", "1,2", "--attn-heads", "1", "--attn-dim-head", "8"]
CT_DATA = {"modality": "ct", "pixel_mm": 1.4, "patch_size": P, "intensity": None}


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_checkpoint(folder: Path, data: dict | None) -> Path:
    """A 2-step tiny model whose checkpoint records `data` (None: as before the metadata)."""
    x = np.random.default_rng(0).random((8, 1, P, P), dtype=np.float32)
    config = TrainConfig(image_size=P, steps=2, batch_size=4, seed=0, **TINY)
    return train(x, config, folder, progress=False, data=data).checkpoint


def lesion_volume(shape=(8, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A CT phantom with one bright ball (the tumour) and its label volume."""
    vol = ct_phantom(shape, seed=5).astype(np.int16)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    z0 = shape[0] // 2  # a ball of 3 slices' and 8 px (at 0.7 mm) radius
    ball = (zz - z0) ** 2 / 9 + (yy - 24) ** 2 / 64 + (xx - 40) ** 2 / 64 <= 1
    vol[ball] = 60
    return vol, ball.astype(np.uint8)


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory) -> Path:
    """A tiny checkpoint that says: CT, 1.4 mm pixels, 16 px patches."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ct_model"), CT_DATA)


# ----------------------------------------------------------------------------- checkpoint


def test_checkpoint_metadata_round_trip_and_training_unchanged(ct_model, tmp_path):
    meta = read_checkpoint_metadata(ct_model)
    assert meta == {**CT_DATA, "data_sha256": None, "step": 2}
    old = tiny_checkpoint(tmp_path / "old", None)
    assert read_checkpoint_metadata(old) == {
        "modality": None, "pixel_mm": None, "patch_size": P, "intensity": None,
        "data_sha256": None, "step": 2,
    }  # fmt: skip
    a, b = read_checkpoint(ct_model), read_checkpoint(old)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])  # training bit-identical


def test_checkpoint_without_data_key_still_loads(ct_model, tmp_path):
    state = read_checkpoint(ct_model)
    del state["data"]
    path = tmp_path / "legacy.pt"
    torch.save(state, path)
    assert read_checkpoint_metadata(path)["modality"] is None


# ----------------------------------------------------------------------------- scan


def test_scan_refuses_a_modality_mismatch(tmp_path, capsys):
    mri_model = tiny_checkpoint(tmp_path / "mri", {**CT_DATA, "modality": "mri"})
    series = tmp_path / "series"
    write_ct_series(series, ct_phantom((3, 32, 32)), spacing=(2.5, 1.4, 1.4))
    argv = ["scan", series, "--checkpoint", mri_model, "--out", tmp_path / "o"]
    code, _, err = run([*argv, "--threshold", "1", "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the input is CT but the model was trained on MRI" in err
    npy = tmp_path / "v.npy"
    np.save(npy, np.random.default_rng(0).random((2, 32, 32)).astype(np.float32))
    argv = ["scan", npy, "--checkpoint", mri_model, "--out", tmp_path / "o", "--modality", "ct"]
    code, _, err = run([*argv, "--threshold", "1", "--device", "cpu"], capsys)
    assert code == 2 and "trained on MRI" in err
    assert not (tmp_path / "o").exists()


def test_scan_resamples_to_the_checkpoint_spacing(ct_model, tmp_path, capsys):
    path = write_nifti(tmp_path / "v.nii.gz", ct_phantom((2, 64, 64)), spacing=(2.0, 0.7, 0.7))
    base = ["scan", path, "--checkpoint", ct_model, "--threshold", "1", "--device", "cpu"]
    base += ["--min-foreground", "0"]
    code, _, err = run([*base, "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    tiles = len(tile_starts(32, P, P // 2)) ** 2  # 64 px at 0.7 mm -> 32 px at 1.4 mm
    assert len(pd.read_csv(tmp_path / "r" / "scores.csv")) == 2 * tiles
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["resampling"] == {
        "applied": True, "source": "checkpoint", "from_mm": [0.7, 0.7], "to_mm": 1.4,
        "factors": [0.5, 0.5],
    }  # fmt: skip
    assert summary["model"] == {"modality": "ct", "pixel_mm": 1.4, "patch_size": P}
    assert "resampled from 0.7 x 0.7 mm to 1.4 mm" in (tmp_path / "r" / "summary.md").read_text()
    code, _, err = run([*base, "--out", tmp_path / "n", "--no-resample"], capsys)
    assert code == 0 and "--no-resample" in err and len(err.strip().splitlines()) == 1
    native = len(tile_starts(64, P, P // 2)) ** 2
    assert len(pd.read_csv(tmp_path / "n" / "scores.csv")) == 2 * native


def test_scan_warns_once_when_the_input_has_no_spacing(ct_model, tmp_path, capsys):
    npy = tmp_path / "v.npy"
    np.save(npy, ct_phantom((2, 32, 32)))
    argv = ["scan", npy, "--checkpoint", ct_model, "--out", tmp_path / "o", "--threshold", "1"]
    code, _, err = run([*argv, "--device", "cpu"], capsys)
    assert code == 0
    assert err.strip().splitlines() == [
        "btd scan: warning: the input volume stores no pixel spacing; scanned at its own pixels, "
        "assumed to be the model's 1.4 mm"
    ]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["resampling"]["applied"] is False and summary["resampling"]["from_mm"] is None


# ----------------------------------------------------------------------------- prepare


def test_prepare_nifti_with_label(tmp_path, capsys):
    vol, lab = lesion_volume()
    img = write_nifti(tmp_path / "ct.nii.gz", vol, spacing=(2.0, 0.7, 0.7))
    labels = write_nifti(tmp_path / "lab.nii.gz", lab, spacing=(2.0, 0.7, 0.7))
    out = tmp_path / "ds"
    argv = ["prepare", img, "--labels", labels, "--modality", "ct", "--out", out]
    code, stdout, err = run([*argv, "--pixel-mm", "1.4", "--patch-size", P], capsys)
    assert code == 0, err
    assert "split by slice" in err and "one patient" in err
    x, m = load_patch_dataset(out)
    assert x.shape[1:] == (1, P, P) and len(m) == len(x) and "wrote" in stdout
    assert {"TM", "TB"} <= set(m["label"]) and {"train", "val"} <= set(m["split"])
    assert x.min() >= 0 and x.max() <= 1
    lesion = lab.reshape(8, 32, 2, 32, 2).max(axis=(2, 4)) > 0  # at 1.4 mm, any overlap
    for row in m[m["label"] == "TB"].itertuples():
        y0, x0 = row.cy - row.py, row.cx - row.px
        assert not lesion[row.slice, y0 : y0 + P, x0 : x0 + P].any(), row
    tm = m[m["label"] == "TM"]
    assert set(tm["cy"]) == {12} and set(tm["cx"]) == {20}
    info = read_dataset_info(out)
    assert info["modality"] == "ct" and info["pixel_mm"] == 1.4 and info["patch_size"] == P
    assert info["intensity"] == {"method": "ct_hu_window", "hu_min": CT_HU_MIN, "hu_max": CT_HU_MAX}
    assert info["split"] == "slice"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prepare_errors_are_one_line(tmp_path, capsys):
    vol, lab = lesion_volume((4, 32, 32))
    img = write_nifti(tmp_path / "ct.nii.gz", vol)
    bad = write_nifti(tmp_path / "lab.nii.gz", lab[:, :16])
    code, _, err = run(["prepare", img, "--labels", bad, "--out", tmp_path / "o"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "modality not stored" in err  # checked before the label volume
    argv = ["prepare", img, "--labels", bad, "--modality", "ct", "--out", tmp_path / "o"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "label volume has shape" in err and str(tmp_path) not in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(BTDInputError, match="did not write"):
        prepare_dataset([img], tmp_path / "busy", modality="ct")
    assert not (tmp_path / "o").exists()


def test_prepare_sites_csv_and_patient_split(tmp_path):
    inputs, sites = [], []
    for i in range(3):
        vol, _ = lesion_volume((6, 48, 48))
        inputs.append(write_nifti(tmp_path / f"v{i}.nii.gz", vol, spacing=(2.0, 1.4, 1.4)))
        sites.append(tmp_path / f"s{i}.csv")
        sites[-1].write_text("slice,y,x,diameter_mm\n3,24,24,8\n")
    result = prepare_dataset(
        inputs, tmp_path / "ds", modality="ct", sites=sites, patch_size=P, pixel_mm=1.4
    )
    m = result.manifest
    assert result.split_by == "patient" and m.groupby("patient")["split"].nunique().max() == 1
    assert set(m["split"]) == {"train", "val", "holdout"}
    assert set(m.loc[m["label"] == "TM", "cy"]) == {24}


def test_prepare_dicom_series_takes_the_header_modality(tmp_path, capsys):
    vol, _ = lesion_volume((6, 32, 32))
    series = tmp_path / "Doe_Jane_PID-4711"
    write_ct_series(series, vol, spacing=(2.0, 1.4, 1.4))
    sites = tmp_path / "sites.csv"
    sites.write_text("slice,y,x,diameter_mm\n3,24,24,9\n")
    argv = ["prepare", series, "--sites", sites, "--out", tmp_path / "ds", "--patch-size", P]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert read_dataset_info(tmp_path / "ds")["modality"] == "ct"
    # the scanner is the header's Manufacturer + model: the key `btd scan` reads BTD+ references by
    _, manifest = load_patch_dataset(tmp_path / "ds")
    assert set(manifest["scanner"]) == {"Virtual Imaging Co VirtuCT 64"}
    sites.write_text("slice,y,x\n3,24,24\n")
    code, _, err = run([*argv[:-4], "--out", tmp_path / "ds2"], capsys)
    assert code == 2 and "need exactly the columns" in err and "Doe_Jane" not in err


def _burn_in(path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(path)


def test_prepare_skips_burned_in_slices_with_a_warning(tmp_path, capsys):
    vol, _ = lesion_volume((6, 32, 32))
    series = tmp_path / "Doe_Jane_PID-4711"
    files = write_ct_series(series, vol, spacing=(2.0, 1.4, 1.4))  # files[k] holds slice k
    _burn_in(files[5])
    sites = tmp_path / "sites.csv"
    sites.write_text("slice,y,x,diameter_mm\n3,24,24,9\n")
    argv = ["prepare", series, "--sites", sites, "--patch-size", P]
    code, _, err = run([*argv, "--out", tmp_path / "ds"], capsys)
    assert code == 0, err
    assert (
        "btd prepare: warning: skipped 1 of 6 DICOM slices marked BurnedInAnnotation = YES "
        "(their burned-in text would reach the heat maps)"
    ) in err.splitlines()
    assert "Doe_Jane" not in err
    _, manifest = load_patch_dataset(tmp_path / "ds")
    assert manifest["slice"].max() <= 4  # slice 5 was not stacked
    for path in files[:5]:
        _burn_in(path)
    code, _, err = run([*argv, "--out", tmp_path / "ds2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(
        "btd prepare: error: input 1 (DICOM folder): all 6 DICOM slices have burned-in "
        "annotations (BurnedInAnnotation = YES)"
    )
    assert "Doe_Jane" not in err and not (tmp_path / "ds2").exists()


@pytest.mark.parametrize(
    ("volume", "fragment"),
    [(np.full((4, 32, 32), -1000, np.int16), "constant volume: all 4,096 voxels are -1000"),
     (ct_phantom((4, 32, 32)).astype(np.float32) * 1000, "absurd CT values: "),  # milli-HU
     (ct_phantom((4, 32, 32)).astype(np.float32) - 6000, "absurd CT values: 4,096 voxel(s)"),
     (np.zeros((0, 32, 32), np.int16), "empty volume: the header declares 32 x 32 x 0 voxels")],
    ids=["constant", "milli-hu", "offset", "no-slices"],
)  # fmt: skip
def test_prepare_refuses_unusable_volumes(volume, fragment, tmp_path, capsys):
    img = write_nifti(tmp_path / "ct.nii.gz", volume, spacing=(2.0, 1.4, 1.4))
    argv = ["prepare", img, "--modality", "ct", "--out", tmp_path / "ds", "--patch-size", P]
    code, _, err = run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"btd prepare: error: input 1 (ct.nii.gz): {fragment}"), err
    assert str(tmp_path) not in err and not (tmp_path / "ds").exists()


# ----------------------------------------------------------------------------- end to end


def test_prepare_train_calibrate_scan_end_to_end(tmp_path, capsys):
    vol, lab = lesion_volume((20, 64, 64))  # enough slices for >= 10 benign val patches
    img = write_nifti(tmp_path / "ct.nii.gz", vol, spacing=(2.0, 0.7, 0.7))
    labels = write_nifti(tmp_path / "lab.nii.gz", lab, spacing=(2.0, 0.7, 0.7))
    ds, model = tmp_path / "ds", tmp_path / "model"
    steps = [
        ["prepare", img, "--labels", labels, "--modality", "ct", "--out", ds, "--patch-size", P,
         "--healthy-per-slice", "4"],
        ["train", "--patches", ds, "--out", model, "--steps", "2", "--batch-size", "4",
         "--device", "cpu", "--quiet", *TINY_ARGS],
        ["calibrate", "--checkpoint", model / "checkpoint.pt", "--patches", ds,
         "--device", "cpu", "--family", "empirical", "--task", "remove"],
        ["scan", img, "--checkpoint", model / "checkpoint.pt", "--out", tmp_path / "report",
         "--device", "cpu"],
    ]  # fmt: skip
    for argv in steps:
        code, _, err = run(argv, capsys)
        assert code == 0, (argv[0], err)
    meta = read_checkpoint_metadata(model / "checkpoint.pt")
    assert meta["modality"] == "ct" and meta["pixel_mm"] == 1.4 and meta["patch_size"] == P
    assert meta["data_sha256"] == training_data_info(ds)["data_sha256"]
    report = tmp_path / "report"
    assert len(pd.read_csv(report / "scores.csv")) > 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["complete"] and summary["resampling"]["applied"]
    assert summary["checkpoint"]["step"] == 2


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_preprocess_records_dataset_json(tmp_path, monkeypatch):
    from btd.data.records import ScanVolume, Tumour
    from btd.pipeline import preprocess as stage

    vol, _ = lesion_volume((4, 32, 32))
    scans = [
        ScanVolume(f"p{i}", "ct", "s", vol, (2.0, 1.4, 1.4), [Tumour(2, 12, 20, 8.0)])
        for i in range(3)
    ]
    monkeypatch.setattr(stage, "acquire", lambda *a, **k: scans)
    cfg = {"patch_size": P, "healthy_per_slice": 1}
    fractions = {"train": 0.4, "val": 0.3, "holdout": 0.3}
    stage.preprocess_modality(
        "ct", cfg, tmp_path, tmp_path / "scans", tmp_path / "p", fractions, 0, 4.0, 1
    )
    info = read_dataset_info(tmp_path / "p" / "ct")
    assert (info["modality"], info["pixel_mm"], info["patch_size"]) == ("ct", 1.4, P)
    data = training_data_info(tmp_path / "p" / "ct")
    assert data["pixel_mm"] == 1.4 and len(data["data_sha256"]) == 64
    scans[0].spacing = (2.0, 0.7, 0.7)
    assert common_pixel_mm(scans) is None  # mixed geometry: nothing to match
