"""Bad-input corpus for `btd scan` / `btd calibrate` / the volume readers (issue 14).

Every input is generated here (no patient data). Each case asserts the exact message fragment, a
non-zero exit code, one line on stderr in the form `btd <cmd>: error: <what>: <problem>`, and no
traceback; outputs must not be written (or must stay the previous complete ones).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_medical import ct_phantom, write_ct_series, write_nifti

from btd.cli import main
from btd.data.dataset import save_patch_dataset
from btd.data.io import MAX_VOXELS, check_scan_values, read_volume
from btd.detect import Calibration, calibration_path, fit_threshold
from btd.diffusion.checkpoint import checkpoint_sha256, read_checkpoint, save_checkpoint
from btd.diffusion.train import TrainConfig, train
from btd.errors import BTDInputError

P = 16
ROOT = Path(__file__).resolve().parents[1]
TINY = {"dim": 8, "dim_mults": (1, 2), "attn_heads": 1, "attn_dim_head": 8}
PATIENT_FOLDER = "Doe_Jane_PID-4711"  # hospital exports name folders after the patient


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny trained checkpoint, calibrated for both tasks (bound to it by `save`)."""
    out = tmp_path_factory.mktemp("model")
    x = np.random.default_rng(0).random((8, 1, P, P), dtype=np.float32)
    config = TrainConfig(image_size=P, steps=2, batch_size=4, seed=0, **TINY)
    path = train(x, config, out, val_patches=x[:4], progress=False).checkpoint
    rng = np.random.default_rng(1)
    for task in ("inject", "remove"):
        fit_threshold(rng.gamma(3.0, 1e-3, 200), 0.1).save(calibration_path(path, task))
    return path


@pytest.fixture
def other_ckpt(ckpt: Path, tmp_path: Path) -> Path:
    """The same model at another step (as after a resume): another file, another hash."""
    state = read_checkpoint(ckpt)
    path = tmp_path / "resumed" / "checkpoint.pt"
    path.parent.mkdir()
    save_checkpoint(path, {**state, "step": int(state["step"]) + 1})
    return path


@pytest.fixture
def nan_ckpt(ckpt: Path, tmp_path: Path) -> Path:
    """The checkpoint with NaN EMA weights (what the detector scores with)."""
    state = read_checkpoint(ckpt)
    ema = {
        k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["ema"].items()
    }
    path = tmp_path / "nan" / "checkpoint.pt"
    path.parent.mkdir()
    save_checkpoint(path, {**state, "ema": ema})
    return path


@pytest.fixture
def vol_npy(tmp_path: Path) -> Path:
    path = tmp_path / "vol.npy"
    np.save(path, ct_phantom((2, 32, 32), seed=3))
    return path


@pytest.fixture
def patch_folder(tmp_path: Path) -> Path:
    """24 val patches (12 TM + 12 TB) with site positions."""
    rng = np.random.default_rng(5)
    x = rng.random((24, 1, P, P), dtype=np.float32)
    manifest = pd.DataFrame(
        {
            "index": np.arange(24), "patient": "ct-0000", "scanner": "helion-16", "split": "val",
            "slice": 0, "cy": 20, "cx": 20, "py": rng.integers(0, P, 24),
            "px": rng.integers(0, P, 24), "diameter_mm": 0.0, "label": ["TM", "TB"] * 12,
        }
    )  # fmt: skip
    save_patch_dataset(tmp_path / "processed", x, manifest)
    return tmp_path / "processed"


def cli(argv: list, capsys) -> tuple[int, str, str]:
    """Run `btd` in-process; option errors exit through argparse's SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(code: int, err: str, command: str, *fragments: str) -> str:
    """One line `btd <command>: error: ...`, no traceback, exit code != 0, every fragment in it."""
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"btd {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def scan(path, ckpt, out, *extra) -> list:
    return ["scan", path, "--checkpoint", ckpt, "--out", out, "--device", "cpu", *extra]


def set_calibration(ckpt: Path, task: str, **fields) -> Path:
    """Rewrite fields of the calibration JSON beside `ckpt` (None removes a field)."""
    path = calibration_path(ckpt, task)
    data = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def calibrated_copy(ckpt: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint with its own (editable) calibration files."""
    folder = tmp_path / "copy"
    folder.mkdir()
    path = folder / "checkpoint.pt"
    path.write_bytes(ckpt.read_bytes())
    for task in ("inject", "remove"):
        calibration_path(path, task).write_bytes(calibration_path(ckpt, task).read_bytes())
    return path


# ----------------------------------------------------------------------------- 1. non-finite scores


def test_nan_weights_are_an_error_not_authentic(nan_ckpt, vol_npy, tmp_path, capsys):
    code, _, err = cli(scan(vol_npy, nan_ckpt, tmp_path / "o", "--threshold", "0.01"), capsys)
    assert_error(code, err, "scan", "non-finite (NaN/inf) score", "weights are probably corrupt")
    assert not (tmp_path / "o").exists()


def test_nan_weights_refused_by_calibrate(nan_ckpt, patch_folder, capsys):
    argv = ["calibrate", "--checkpoint", nan_ckpt, "--patches", patch_folder, "--device", "cpu"]
    code, _, err = cli(argv, capsys)
    assert_error(code, err, "calibrate", "non-finite (NaN/inf) score")
    assert not calibration_path(nan_ckpt, "inject").exists()


# ----------------------------------------------------------------------------- 2. thresholds


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("-1", "must be a finite number >= 0"), ("nan", "must be a finite number >= 0"),
     ("inf", "must be a finite number >= 0"), ("abc", "not a number: 'abc'")],
)  # fmt: skip
def test_bad_threshold_option(value, fragment, ckpt, vol_npy, tmp_path, capsys):
    code, _, err = cli(scan(vol_npy, ckpt, tmp_path / "o", f"--threshold={value}"), capsys)
    assert_error(code, err, "scan", "argument --threshold", fragment)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [({"threshold": -1.0}, "threshold must be a finite number >= 0, got -1.0"),
     ({"threshold": float("nan")}, "threshold must be a finite number >= 0, got nan"),
     ({"threshold": "0.01"}, "threshold must be a finite number >= 0, got '0.01'"),
     ({"target_fpr": 1.5}, "target_fpr must be in (0, 1), got 1.5"),
     ({"target_fpr": 0}, "target_fpr must be in (0, 1), got 0"),
     ({"n": "many"}, "n must be a positive integer, got 'many'"),
     ({"family": "normal"}, "family must be one of"),
     ({"params": {"shape": "x"}}, "params must map names to numbers")],
)  # fmt: skip
def test_bad_calibration_fields(fields, fragment, calibrated_copy, vol_npy, tmp_path, capsys):
    set_calibration(calibrated_copy, "remove", **fields)
    code, _, err = cli(scan(vol_npy, calibrated_copy, tmp_path / "o"), capsys)
    assert_error(code, err, "scan", "calibration_remove.json", fragment)
    with pytest.raises(BTDInputError, match="calibration_remove.json"):
        Calibration.load(calibration_path(calibrated_copy, "remove"))


def test_calibrate_target_fpr_outside_unit_interval(ckpt, patch_folder, capsys):
    for value in ("0", "1", "1.5", "nan"):
        argv = ["calibrate", "--checkpoint", ckpt, "--patches", patch_folder, "--target-fpr", value]
        code, _, err = cli(argv, capsys)
        assert_error(code, err, "calibrate", "argument --target-fpr", "(0, 1)")


# ----------------------------------------------------------------------------- 3. binding


def test_calibration_records_checkpoint_hash_and_step(ckpt):
    cal = Calibration.load(calibration_path(ckpt, "remove"))
    assert cal.checkpoint_sha256 == checkpoint_sha256(ckpt)
    assert cal.checkpoint_step == int(read_checkpoint(ckpt)["step"]) == 2


def test_pipeline_stage_writes_the_binding(ckpt, patch_folder, tmp_path):
    from btd.data.dataset import load_patch_dataset
    from btd.diffusion.checkpoint import load_detector
    from btd.pipeline.train_ddpm import calibrate

    folder = tmp_path / "stage"
    folder.mkdir()
    copy = folder / "checkpoint.pt"
    copy.write_bytes(ckpt.read_bytes())
    x, manifest = load_patch_dataset(patch_folder, "val")
    calibrate(load_detector(copy)[0], x, manifest, 8, 0.1, copy)
    for task in ("inject", "remove"):
        cal = Calibration.load(calibration_path(copy, task))
        assert cal.checkpoint_sha256 == checkpoint_sha256(copy) and cal.checkpoint_step == 2
        cal.check_checkpoint(copy, "calibration")


def test_calibration_of_another_checkpoint_refused(ckpt, other_ckpt, vol_npy, tmp_path, capsys):
    for task in ("inject", "remove"):  # the old calibration copied beside the resumed model
        calibration_path(other_ckpt, task).write_bytes(calibration_path(ckpt, task).read_bytes())
    code, _, err = cli(scan(vol_npy, other_ckpt, tmp_path / "o"), capsys)
    assert_error(
        code, err, "scan", "made for another checkpoint (step 2", "(step 3", "btd calibrate"
    )
    assert not (tmp_path / "o").exists()


def test_old_calibration_without_hash_refused(calibrated_copy, vol_npy, tmp_path, capsys):
    set_calibration(calibrated_copy, "remove", checkpoint_sha256=None, checkpoint_step=None)
    Calibration.load(calibration_path(calibrated_copy, "remove"))  # still readable (evaluate stage)
    code, _, err = cli(scan(vol_npy, calibrated_copy, tmp_path / "o"), capsys)
    assert_error(
        code, err, "scan", "does not record which checkpoint", "re-run `btd calibrate --checkpoint"
    )


# ----------------------------------------------------------------------------- 4. coords CSV


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("slice,y,x,note\n0,5,5,a\n", "extra columns ['note']"),
     ("slice,y,x\n0,5,5,7\n", "row 1: 4 fields, the header has 3"),
     ("slice,y,x\n0,5\n", "row 1: 2 fields, the header has 3"),
     ("slice,y\n0,5\n", "missing columns ['x']")],
)  # fmt: skip
def test_coords_columns_are_strict(text, fragment, ckpt, vol_npy, tmp_path, capsys):
    coords = tmp_path / "coords.csv"
    coords.write_text(text)
    code, _, err = cli(scan(vol_npy, ckpt, tmp_path / "o", "--coords", coords), capsys)
    assert_error(code, err, "scan", "coords.csv", fragment)


def test_score_centres_columns_are_strict(ckpt, tmp_path, capsys):
    patches = tmp_path / "p.npy"
    np.save(patches, np.random.default_rng(0).random((2, 1, P, P), dtype=np.float32))
    centres = tmp_path / "centres.csv"
    argv = ["score", "--checkpoint", ckpt, "--patches", patches, "--window", "8",
            "--centres", centres, "--out", tmp_path / "s.csv", "--device", "cpu"]  # fmt: skip
    for text, fragment in [
        ("py,px\n1,2,3\n4,5,6\n", "row 1: 3 fields, the header has 2"),  # pandas: shifted
        ("py,px,note\n1,2,a\n4,5,b\n", "need exactly the columns py,px"),
    ]:
        centres.write_text(text)
        code, _, err = cli(argv, capsys)
        assert_error(code, err, "score", "centres.csv", fragment)
    assert not (tmp_path / "s.csv").exists()


def test_score_output_that_is_a_folder(ckpt, tmp_path, capsys):
    patches = tmp_path / "p.npy"
    np.save(patches, np.zeros((2, 1, P, P), dtype=np.float32))
    argv = ["score", "--checkpoint", ckpt, "--patches", patches, "--out", tmp_path]
    code, _, err = cli(argv, capsys)
    assert_error(code, err, "score", "output path is a folder")


# ----------------------------------------------------------------------------- 5. NRRD data file


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.raw"])
def test_detached_nrrd_data_file_confined(target, tmp_path):
    (tmp_path / "outside.raw").write_bytes(b"\0" * 8)
    header = tmp_path / "inner" / "vol.nhdr"
    header.parent.mkdir()
    header.write_text(
        f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: {target}\n\n"
    )
    with pytest.raises(BTDInputError, match="points outside the header's folder"):
        read_volume(header)


# ----------------------------------------------------------------------------- 6. DICOM series


@pytest.mark.parametrize(
    ("keyword", "value", "fragment"),
    [("PixelSpacing", [0.9, 0.9], ("pixel spacing", "0.7/0.7", "0.9/0.9")),
     ("ImageOrientationPatient", [0, 1, 0, 0, 0, -1], ("orientation", "1/0/0/0/1/0", "0/1/0/0/0/-1")),
     ("Modality", "MR", ("modality", "CT", "MR")),
     ("RescaleIntercept", -1000, ("rescale intercept", "-1024", "-1000")),
     ("RescaleSlope", 2, ("rescale slope", "1", "2"))],
)  # fmt: skip
def test_dicom_series_must_be_consistent(keyword, value, fragment, ckpt, tmp_path, capsys):
    """One altered slice: the message names the field, both values and the odd file."""
    import pydicom

    folder = tmp_path / PATIENT_FOLDER
    files = write_ct_series(folder, ct_phantom((3, 32, 32)))
    ds = pydicom.dcmread(files[1])
    setattr(ds, keyword, value)
    ds.save_as(files[1])
    with pytest.raises(BTDInputError, match="mixed series"):
        read_volume(folder)
    code, _, err = cli(scan(folder, ckpt, tmp_path / "o", "--threshold", "0"), capsys)
    what, usual, odd = fragment
    line = assert_error(code, err, "scan", f"input folder: mixed series: {what} ", files[1].name)
    assert f" {usual} in " in line and f" {odd} in {files[1].name}" in line
    assert PATIENT_FOLDER not in line and "Doe" not in line


# ----------------------------------------------------------------------------- 7. bounded reads


def test_fifo_refused_without_hanging(tmp_path):
    fifo = tmp_path / "volume.npy"
    os.mkfifo(fifo)
    code = (
        "import sys; from btd.cli import main; "
        f"sys.exit(main(['scan', {str(fifo)!r}, '--checkpoint', 'none.pt', '--threshold', '0', "
        f"'--out', {str(tmp_path / 'o')!r}]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    with pytest.raises(BTDInputError, match="not a regular file"):
        read_volume(fifo)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "none.pt: checkpoint file not found" in proc.stderr  # the checkpoint comes first


def _huge_npy(path: Path) -> None:
    with open(path, "wb") as f:
        header = {"descr": "<i2", "fortran_order": False, "shape": (1024, 1024, 1024)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 1024)


def _huge_nifti(path: Path) -> None:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((1024, 1024, 1024))
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 2 * 1024 * 1024)


def _huge_nrrd(path: Path) -> None:
    text = "NRRD0004\ntype: short\ndimension: 3\nsizes: 1024 1024 1024\nencoding: raw\n\n"
    path.write_bytes(text.encode() + b"\0" * 1024)


@pytest.mark.parametrize(
    ("name", "write"),
    [("huge.npy", _huge_npy), ("huge.nii.gz", _huge_nifti), ("huge.nrrd", _huge_nrrd)],
)
def test_huge_declared_volume_refused_before_reading(name, write, ckpt, tmp_path, capsys):
    path = tmp_path / PATIENT_FOLDER / name
    path.parent.mkdir()
    write(path)
    assert 1024**3 > MAX_VOXELS
    code, _, err = cli(scan(path, ckpt, tmp_path / "o", "--threshold", "0"), capsys)
    line = assert_error(code, err, "scan", f"{name}: header declares 1024 x 1024 x 1024")
    assert "MAX_VOXELS" in line and PATIENT_FOLDER not in line


def test_batch_size_capped_by_the_sites(ckpt, vol_npy, tmp_path, monkeypatch, capsys):
    from btd.detect import fast

    seen = []
    real_init = fast.FastScorer.__init__

    def spy(self, diffusion, options=None):
        seen.append(options.batch_size)
        real_init(self, diffusion, options)

    monkeypatch.setattr(fast.FastScorer, "__init__", spy)
    argv = scan(vol_npy, ckpt, tmp_path / "o", "--threshold", "0", "--batch-size", "100000")
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    n = len(pd.read_csv(tmp_path / "o" / "scores.csv"))
    assert seen == [n] and n < 100000


# ----------------------------------------------------------------------------- 8. outputs


def test_output_path_that_is_a_file_fails_before_any_work(vol_npy, tmp_path, capsys):
    out = tmp_path / "report"
    out.write_text("not a folder")
    missing_ckpt = tmp_path / "none.pt"  # checked later: the output path is refused first
    code, _, err = cli(scan(vol_npy, missing_ckpt, out, "--threshold", "0"), capsys)
    assert_error(code, err, "scan", "output path exists and is not a folder")


def test_output_folder_with_foreign_files_refused(ckpt, vol_npy, tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.docx").write_text("mine")
    code, _, err = cli(scan(vol_npy, ckpt, out, "--threshold", "0"), capsys)
    assert_error(code, err, "scan", "holds files `btd scan` did not write (thesis.docx")
    assert (out / "thesis.docx").read_text() == "mine"


def test_killed_scan_leaves_the_previous_complete_report(
    ckpt, vol_npy, tmp_path, monkeypatch, capsys
):
    from btd.detect import scan as scan_module

    out = tmp_path / "report"
    code, _, err = cli(scan(vol_npy, ckpt, out, "--threshold", "0", "--max-figures", "3"), capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["checkpoint"]["sha256"] == checkpoint_sha256(ckpt)
    assert summary["counts"]["heat_maps"] == 3 and summary["input"]["sha256_12"]
    assert summary["counts"]["patches_scored"] == len(pd.read_csv(out / "scores.csv"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_module, "write_heatmaps", interrupted)
    code, _, err = cli(scan(vol_npy, ckpt, out, "--threshold", "1", "--max-figures", "1"), capsys)
    assert code == 130
    assert_error(code, err, "scan", "interrupted (Ctrl-C)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old run, whole
    monkeypatch.undo()
    code, _, err = cli(scan(vol_npy, ckpt, out, "--threshold", "1e9", "--max-figures", "1"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["scores.csv", "summary.json", "summary.md"]
    assert not list(tmp_path.glob(".report.btd-*"))  # no staging folder left


# ----------------------------------------------------------------------------- 9. messages


def test_unexpected_error_is_one_line(ckpt, vol_npy, tmp_path, monkeypatch, capsys):
    from btd.detect import scan as scan_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(scan_module, "site_table", broken)
    code, _, err = cli(scan(vol_npy, ckpt, tmp_path / "o", "--threshold", "0"), capsys)
    assert code == 1
    assert_error(
        code, err, "scan", "unexpected RuntimeError: disk on fire second line", "BTD_DEBUG"
    )


def test_input_paths_shown_relative_to_the_input_root(ckpt, tmp_path, capsys):
    folder = tmp_path / PATIENT_FOLDER / "series"
    files = write_ct_series(folder, ct_phantom((3, 32, 32)))
    files[2].write_bytes(files[2].read_bytes()[:300])  # truncated slice
    code, _, err = cli(scan(folder, ckpt, tmp_path / "o", "--threshold", "0"), capsys)
    line = assert_error(code, err, "scan", f"error: {files[2].name}: ")
    assert PATIENT_FOLDER not in line and str(tmp_path) not in line
    volume = tmp_path / PATIENT_FOLDER / "scan.npy"
    volume.write_bytes(b"garbage")
    code, _, err = cli(scan(volume, ckpt, tmp_path / "o", "--threshold", "0"), capsys)
    line = assert_error(code, err, "scan", "error: scan.npy: truncated or corrupt .npy file")
    assert PATIENT_FOLDER not in line


def test_one_line_via_subprocess_for_a_usage_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "btd.cli", "scan", "x.npy", "--checkpoint", "c.pt",
         "--threshold", "-1"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert_error(proc.returncode, proc.stderr, "scan", "argument --threshold: must be")


# ----------------------------------------------------------------------------- 10. pickle


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_pickle_checkpoint_refusal_says_it_holds_code(vol_npy, tmp_path, capsys):
    evil = tmp_path / "checkpoint.pt"
    torch.save({"format": "btd-ddpm", "model": _Payload()}, evil)
    code, out, err = cli(scan(vol_npy, evil, tmp_path / "o", "--threshold", "0"), capsys)
    assert_error(code, err, "scan", "holds pickled Python code", "it was not loaded")
    assert "weights_only" not in err and "owned" not in out


# ----------------------------------------------------------------------------- 11. small slices


def test_slices_smaller_than_the_patch(ckpt, tmp_path, capsys):
    small = tmp_path / "small.npy"
    np.save(small, ct_phantom((2, 8, 12)))
    code, _, err = cli(scan(small, ckpt, tmp_path / "o", "--threshold", "0"), capsys)
    assert_error(code, err, "scan", "slices are 8x12 pixels, smaller than the model's 16x16")
    coords = tmp_path / "c.csv"
    coords.write_text("slice,y,x\n0,4,4\n")
    code, _, err = cli(scan(small, ckpt, tmp_path / "o", "--threshold", "0", "--coords", coords),
                       capsys)  # fmt: skip
    assert_error(code, err, "scan", "smaller than the model's 16x16 patches")


# ----------------------------------------------------------------------------- 12. burned-in text


SKIPPED_ONE_OF_4 = (
    "skipped 1 of 4 DICOM slices marked BurnedInAnnotation = YES (their burned-in text would "
    "reach the heat maps)"
)


def _burn_in(path: Path) -> None:
    """Mark a DICOM file BurnedInAnnotation = YES (names or dates are part of its pixels)."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(path)


def test_burned_in_slices_are_skipped_with_a_warning(ckpt, tmp_path, capsys, caplog):
    folder = tmp_path / PATIENT_FOLDER
    volume = ct_phantom((4, 32, 32))
    files = write_ct_series(folder, volume)  # files[k] holds slice k (names are shuffled)
    _burn_in(files[1])
    with caplog.at_level(logging.WARNING, logger="btd"):
        out, _, meta = read_volume(folder)
    np.testing.assert_array_equal(out, np.delete(volume, 1, axis=0))  # not stacked
    assert meta["n_slices"] == 3
    assert [r.getMessage() for r in caplog.records if r.name.startswith("btd")] == [
        SKIPPED_ONE_OF_4
    ]
    code, _, err = cli(scan(folder, ckpt, tmp_path / "o", "--threshold", "0"), capsys)
    assert code == 0, err
    assert f"btd scan: warning: {SKIPPED_ONE_OF_4}" in err.splitlines()
    assert PATIENT_FOLDER not in err and str(tmp_path) not in err
    assert pd.read_csv(tmp_path / "o" / "scores.csv")["slice"].max() == 2


def test_all_slices_burned_in_is_one_line_error(ckpt, tmp_path, capsys):
    folder = tmp_path / PATIENT_FOLDER
    files = write_ct_series(folder, ct_phantom((3, 32, 32)))
    for path in files:
        _burn_in(path)
    code, _, err = cli(scan(folder, ckpt, tmp_path / "o", "--threshold", "0"), capsys)
    line = assert_error(
        code,
        err,
        "scan",
        "error: input folder: all 3 DICOM slices have burned-in annotations "
        "(BurnedInAnnotation = YES): their text would reach the heat maps",
    )
    assert PATIENT_FOLDER not in line and not (tmp_path / "o").exists()
    code, _, err = cli(scan(files[0], ckpt, tmp_path / "o", "--threshold", "0"), capsys)
    assert_error(code, err, "scan", f"error: {files[0].name}: the DICOM image has burned-in")


# ----------------------------------------------------------------------------- 13. unusable volumes


HIGH_CT = (
    "absurd CT values: 2,048 voxel(s) outside the plausible -4000..40000 HU "
    "(range 43976..46198 after rescale)"
)


def test_check_scan_values_known_answers():
    """The helper `btd scan` and `btd prepare` share, one case at a time."""
    ct = ct_phantom((2, 32, 32))
    check_scan_values("v", ct, "ct")  # a plausible CT passes
    padded = ct.copy()
    padded[:, :4] = -32768  # one fill value outside the field of view: the window clips it to air
    check_scan_values("v", padded, "ct")
    check_scan_values("v", ct.astype(np.float32) + 45000, "mri")  # MRI units have no HU range
    check_scan_values("v", ct.astype(np.float32) + 45000, None)  # nor an unknown (normalised) one
    with_nan = ct.astype(np.float32)
    with_nan[1, 5, 5] = np.nan
    two_fills = padded.copy()
    two_fills[0, 10, 10] = -5000  # a second value below the range is not padding
    cases = [
        (np.zeros((0, 32, 32), np.int16), "ct", "empty volume"),
        (np.zeros((2, 0, 32), np.float32), None, "empty volume"),
        (with_nan, "ct", "1 NaN/inf voxel(s)"),
        (np.full((2, 8, 8), -1000, np.int16), "ct", "constant volume: all 128 voxels are -1000"),
        (np.full((2, 8, 8), 0.25, np.float32), None, "constant volume: all 128 voxels are 0.25"),
        (ct.astype(np.float32) * 1000, "ct", "absurd CT values"),  # milli-HU
        (ct.astype(np.float32) + 45000, "ct", HIGH_CT),
        (two_fills, "ct", "absurd CT values: 257 voxel(s) outside"),
    ]
    for volume, modality, fragment in cases:
        with pytest.raises(BTDInputError, match=re.escape(f"input: {fragment}")):
            check_scan_values("input", volume, modality)


def _blank(path: Path) -> list:
    np.save(path, np.full((2, 32, 32), -1000, np.int16))
    return []


def _milli_hu(path: Path) -> list:
    write_nifti(path, ct_phantom((2, 32, 32)).astype(np.float32) * 1000)
    return ["--modality", "ct"]


def _no_slices(path: Path) -> list:
    write_nifti(path, np.zeros((0, 32, 32), np.int16))
    return ["--modality", "ct"]


@pytest.mark.parametrize(
    ("name", "write", "fragment"),
    [("blank.npy", _blank, "constant volume: all 2,048 voxels are -1000"),
     ("milli_hu.nii.gz", _milli_hu, "absurd CT values: "),
     ("no_slices.nii.gz", _no_slices, "empty volume: the header declares 32 x 32 x 0 voxels")],
)  # fmt: skip
def test_unusable_volumes_refused_by_scan(name, write, fragment, ckpt, tmp_path, capsys):
    path = tmp_path / PATIENT_FOLDER / name
    path.parent.mkdir()
    extra = write(path)
    code, _, err = cli(scan(path, ckpt, tmp_path / "o", "--threshold", "0", *extra), capsys)
    line = assert_error(code, err, "scan", f"error: {name}: {fragment}")
    assert PATIENT_FOLDER not in line and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 14. stale temp files


def test_resume_removes_stale_temporary_checkpoints(tmp_path, caplog):
    x = np.random.default_rng(0).random((8, 1, P, P), dtype=np.float32)
    out = tmp_path / "model"
    train(x, TrainConfig(image_size=P, steps=2, batch_size=4, seed=0, **TINY), out, progress=False)

    def killed_save(folder: Path) -> Path:
        """What a save killed mid-write leaves: atomic_path's temporary file, never renamed."""
        folder.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint.pt.", suffix=".tmp.pt", dir=folder)
        os.write(fd, b"half a checkpoint")
        os.close(fd)
        return Path(tmp)

    stale = killed_save(out)
    kept = [
        out / ".loss_log.csv.abcd1234.tmp.csv",  # another file's temporary
        out / ".checkpoint.pt.tmp.pt",  # no random part
        out / "checkpoint.pt.abcd1234.tmp.pt",  # no leading dot
        out / ".checkpoint.pt.abcd1234.tmp.pt.bak",
        out / ".checkpoint.pt.ABCD-1234.tmp.pt",  # not mkstemp's characters
        out / ".old-checkpoint.pt.abcd1234.tmp.pt",
    ]
    for path in kept:
        path.write_bytes(b"mine")
    (out / ".checkpoint.pt.folder12.tmp.pt").mkdir()  # a folder, not a file
    config = TrainConfig(image_size=P, steps=3, batch_size=4, seed=0, **TINY)
    with caplog.at_level(logging.WARNING, logger="btd"):
        result = train(x, config, out, progress=False)
    assert (result.start_step, result.end_step) == (2, 3)
    assert not stale.exists()
    assert all(path.read_bytes() == b"mine" for path in kept)
    assert (out / ".checkpoint.pt.folder12.tmp.pt").is_dir()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("btd")]
    assert messages == [
        f"removed 1 stale temporary checkpoint file(s) left by an interrupted save: {stale.name}"
    ]
    # killed during the very first save: no checkpoint yet, the leftover still goes
    fresh = tmp_path / "fresh"
    first = killed_save(fresh)
    result = train(x, config, fresh, progress=False)
    assert result.start_step == 0 and not first.exists()
    assert sorted(p.name for p in fresh.iterdir()) == ["checkpoint.pt", "loss_log.csv"]
