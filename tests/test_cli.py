"""The `btd` detector commands (train, score, calibrate, scan) on a tiny real checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_medical import (
    IDENTIFIERS,
    ct_phantom,
    mr_phantom,
    write_ct_series,
    write_dicom_series,
    write_nifti,
)

from btd.cli import main
from btd.data.dataset import save_patch_dataset
from btd.data.patches import extract_patch
from btd.data.preprocess import normalize_ct, normalize_volume
from btd.detect import Calibration, calibration_path, fit_threshold, score
from btd.detect.scan import infer_modality, read_coords, run_scan, tile_sites, tile_starts
from btd.diffusion.checkpoint import load_detector
from btd.diffusion.model import build_diffusion
from btd.diffusion.train import TrainConfig, train
from btd.errors import BTDInputError

P = 16
ROOT = Path(__file__).resolve().parents[1]
TINY = {"dim": 8, "dim_mults": (1, 2), "attn_heads": 1, "attn_dim_head": 8}
#: The DICOM folder name itself identifies the patient: it must not leak either.
SECRET_FOLDER = "Doe_Jane_PID-SECRET-4711"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real checkpoint as `train` writes it: the tiny model trained for 2 steps."""
    out = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(0)
    x = rng.random((8, 1, P, P), dtype=np.float32)
    config = TrainConfig(image_size=P, steps=2, batch_size=4, seed=0, **TINY)
    train(x, config, out, val_patches=x[:4], progress=False)
    return out


@pytest.fixture(scope="module")
def ckpt(model_dir: Path) -> Path:
    """The checkpoint, calibrated on random scores for both tasks."""
    path = model_dir / "checkpoint.pt"
    rng = np.random.default_rng(1)
    for task in ("inject", "remove"):
        fit_threshold(rng.gamma(3.0, 1e-3, 200), 0.1).save(calibration_path(path, task))
    return path


@pytest.fixture(scope="module")
def detector(ckpt: Path):
    return load_detector(ckpt)[0]


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return ct_phantom((4, 32, 32), seed=3)


def uncalibrated(ckpt: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint without calibration files."""
    (tmp_path / "bare").mkdir()
    return Path(shutil.copy(ckpt, tmp_path / "bare" / "checkpoint.pt"))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])


def direct_scores(detector, norm: np.ndarray, sites, window=None) -> np.ndarray:
    """Hand-made reference: cut each patch with extract_patch and score it with btd.detect.score."""
    cut = [extract_patch(norm[z], y, x, P) for z, y, x in sites]
    patches = np.stack([c[0] for c in cut])[:, None]
    centres = np.array([(c[1], c[2]) for c in cut], dtype=float)
    kw = {"window": window, "centres": centres} if window else {}
    return score(detector, patches, **kw)[0]


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command", [[], ["prepare"], ["train"], ["score"], ["calibrate"], ["scan"]]
)
def test_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: btd" in out
    if command:
        assert "examples:" in out


def test_module_entry_point_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "btd.cli", "scan", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "slice,y,x" in proc.stdout and "--checkpoint" in proc.stdout


def test_checkpoint_is_the_tiny_model(detector):
    reference = build_diffusion(image_size=P, seed=0, **TINY)
    have, want = detector.state_dict(), reference.state_dict()
    assert have.keys() == want.keys()
    assert all(have[k].shape == want[k].shape for k in want)


# ----------------------------------------------------------------------------- scan


def test_scan_dicom_series_writes_outputs_without_identifiers(ckpt, volume, tmp_path, capsys):
    series = tmp_path / SECRET_FOLDER
    write_ct_series(series, volume)
    out = tmp_path / "report"
    argv = ["scan", series, "--checkpoint", ckpt, "--out", out, "--threshold", "0.0"]
    code, stdout, err = run(
        [*argv, "--stride", "8", "--max-figures", "3", "--device", "cpu"], capsys
    )
    assert code == 0, err

    table = pd.read_csv(out / "scores.csv")
    assert list(table.columns) == ["slice", "y", "x", "score", "flagged"]
    # 32 px slices, 16 px tiles every 8 px: 3 x 3 tiles a slice, all with enough body
    assert len(table) == 4 * 9
    assert sorted(set(table["y"])) == [8, 16, 24] and sorted(set(table["slice"])) == [0, 1, 2, 3]
    assert (table["score"] > 0).all() and table["flagged"].all()
    expected = direct_scores(
        load_detector(ckpt)[0], normalize_ct(volume), table[["slice", "y", "x"]].to_numpy()
    )
    # float32 conv kernels sum in a CPU-dependent order (AVX-512 vs AVX2): a few 1e-6 relative
    np.testing.assert_allclose(table["score"], expected, rtol=2e-5)

    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    summary = (out / "summary.md").read_text()
    assert "DICOM series" in summary and "input volume" in summary
    assert "patches scored: 36" in summary and "flagged: 36" in summary
    assert "## Top 10" in summary and summary.count("| yes |") == 10

    secrets = [*IDENTIFIERS, SECRET_FOLDER, "PID-SECRET", "SECRET"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 6  # scores.csv, summary.md, summary.json, 3 heat maps
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} leaked into {path.name}"
            assert secret not in path.name
    for secret in secrets:
        assert secret not in stdout


def test_scan_coords_scores_exactly_those_sites(ckpt, detector, volume, tmp_path, capsys):
    np.save(tmp_path / "vol.npy", volume)
    sites = [(0, 5, 5), (2, 16, 20), (3, 31, 0)]
    pd.DataFrame(sites, columns=["slice", "y", "x"]).to_csv(tmp_path / "c.csv", index=False)
    out = tmp_path / "r"
    argv = ["scan", tmp_path / "vol.npy", "--checkpoint", ckpt, "--coords", tmp_path / "c.csv"]
    code, _, err = run([*argv, "--window", "8", "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "scores.csv")
    assert [tuple(r) for r in table[["slice", "y", "x"]].to_numpy()] == sites
    # inject is the default with --coords: window score at each site, inject calibration
    expected = direct_scores(detector, normalize_ct(volume), sites, window=8)
    # float32 conv kernels sum in a CPU-dependent order (AVX-512 vs AVX2): a few 1e-6 relative
    np.testing.assert_allclose(table["score"], expected, rtol=2e-5)
    threshold = Calibration.load(calibration_path(ckpt, "inject")).threshold
    assert table["flagged"].tolist() == [int(s > threshold) for s in expected]
    assert "8 x 8 window" in (out / "summary.md").read_text()


def test_scan_speed_options_keep_the_scores(ckpt, volume, tmp_path, capsys):
    np.save(tmp_path / "vol.npy", volume)
    base = [
        "scan",
        tmp_path / "vol.npy",
        "--checkpoint",
        ckpt,
        "--threshold",
        "0",
        "--device",
        "cpu",
    ]
    tables = {}
    for name, extra in {
        "reference": ["--reference-path"],
        "fast": [],
        "nchw": ["--no-channels-last", "--batch-size", "5"],
        "bf16": ["--precision", "bf16"],
    }.items():
        code, _, err = run([*base, *extra, "--out", tmp_path / name], capsys)
        assert code == 0, err
        tables[name] = pd.read_csv(tmp_path / name / "scores.csv")
    ref = tables["reference"]["score"].to_numpy()
    for name in ("fast", "nchw"):
        np.testing.assert_allclose(tables[name]["score"], ref, rtol=1e-5)
    assert np.corrcoef(tables["bf16"]["score"], ref)[0, 1] > 0.99


def test_scan_npy_and_nifti_agree(ckpt, volume, tmp_path, capsys):
    np.save(tmp_path / "vol.npy", volume)
    write_nifti(tmp_path / "vol.nii.gz", volume)
    tables = {}
    for name, extra in (("vol.npy", []), ("vol.nii.gz", ["--modality", "ct"])):
        out = tmp_path / f"out_{name}"
        code, _, err = run(
            [
                "scan",
                tmp_path / name,
                "--checkpoint",
                ckpt,
                "--out",
                out,
                "--device",
                "cpu",
                *extra,
            ],
            capsys,
        )
        assert code == 0, err
        tables[name] = pd.read_csv(out / "scores.csv")
        assert len(tables[name]) == 4 * 9  # default stride = P // 2
    pd.testing.assert_frame_equal(tables["vol.npy"], tables["vol.nii.gz"])
    assert "NumPy" in (tmp_path / "out_vol.npy" / "summary.md").read_text()
    text = (tmp_path / "out_vol.nii.gz" / "summary.md").read_text()
    assert "NIfTI" in text and "calibration: " in text and "target false-positive rate 0.1" in text


def test_scan_resamples_to_pixel_size(ckpt, volume, tmp_path, capsys):
    series = tmp_path / "s"
    write_ct_series(series, volume, spacing=(2.5, 0.7, 0.7))
    out = tmp_path / "r"
    argv = ["scan", series, "--checkpoint", ckpt, "--out", out, "--pixel-mm", "1.4"]
    code, _, err = run([*argv, "--threshold", "1e9", "--device", "cpu"], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "scores.csv")
    # 32 px at 0.7 mm -> 16 px at 1.4 mm: one tile per slice, centre 8 -> original pixel 16
    assert len(table) == 4 and set(table["y"]) == {16} and set(table["x"]) == {16}
    assert not table["flagged"].any() and not list(out.glob("*.png"))
    assert "resampled" in (out / "summary.md").read_text()


def test_scan_mri_series_uses_patient_standardisation(ckpt, detector, tmp_path):
    vol = mr_phantom((3, 24, 24), seed=2)
    write_dicom_series(tmp_path / "mr", vol, modality="MR", scanner="Optima MR450w")
    sites = [(0, 12, 12), (2, 3, 20)]
    pd.DataFrame(sites, columns=["slice", "y", "x"]).to_csv(tmp_path / "c.csv", index=False)
    report = run_scan(
        tmp_path / "mr", ckpt, tmp_path / "o", coords=tmp_path / "c.csv", task="remove",
        device="cpu",
    )  # fmt: skip
    expected = direct_scores(detector, normalize_volume(vol, "mri"), sites)
    np.testing.assert_allclose(report.table["score"], expected, rtol=1e-6)
    assert "modality MRI" in report.summary.read_text()


def test_infer_modality():
    hu = np.full((1, 4, 4), -1000, np.int16)
    u8 = np.zeros((1, 4, 4), np.uint8)
    assert infer_modality(u8, {"modality": "CT"}, None) == "ct"
    assert infer_modality(hu, {"modality": "MR"}, None) == "mri"
    assert infer_modality(hu, {"modality": None}, None) == "ct"
    assert infer_modality(hu, {}, "mri") == "mri"
    with pytest.raises(BTDInputError, match="vol.npy.*--modality"):
        infer_modality(u8, {"modality": None}, None, "vol.npy")


# ----------------------------------------------------------------------------- scan errors


def test_corrupt_checkpoint_is_one_line_exit_2(volume, tmp_path, capsys):
    np.save(tmp_path / "vol.npy", volume)
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    argv = ["scan", tmp_path / "vol.npy", "--checkpoint", bad, "--threshold", "0"]
    code, _, err = run([*argv, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, str(bad))
    code, _, err = run(["score", "--checkpoint", bad, "--patches", tmp_path / "vol.npy",
                        "--out", tmp_path / "s.csv"], capsys)  # fmt: skip
    assert_one_line_error(code, err, str(bad))


def test_missing_calibration_is_one_line_exit_2(ckpt, volume, tmp_path, capsys):
    np.save(tmp_path / "vol.npy", volume)
    bare = uncalibrated(ckpt, tmp_path)
    argv = ["scan", tmp_path / "vol.npy", "--checkpoint", bare, "--out", tmp_path / "o"]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, str(calibration_path(bare, "remove")), "btd calibrate")
    assert "--threshold" in err
    assert not (tmp_path / "o").exists()  # failed before any output


def test_bad_coords_are_one_line_exit_2(ckpt, volume, tmp_path, capsys):
    np.save(tmp_path / "vol.npy", volume)
    coords = tmp_path / "coords.csv"
    coords.write_text("slice,y,x\n1,5,5\n2,40,5\n")
    argv = ["scan", tmp_path / "vol.npy", "--checkpoint", ckpt, "--coords", coords]
    code, _, err = run([*argv, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, str(coords), "row 2", "outside")
    coords.write_text("z,row,col\n1,5,5\n")
    code, _, err = run([*argv, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, str(coords), "missing columns")


def test_read_coords_validation(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("X, Y ,Slice\n3.2,4.6,1\n")
    assert read_coords(path, (2, 8, 8)).tolist() == [[1, 5, 3]]
    for text in (
        "X, Y ,Slice,note\n3.2,4.6,1,a\n",
        "slice,y,x\n",
        "slice,y,x\n0,-1,2\n",
        "slice,y,x\n2,1,1\n",
        "slice,y,x\n0,a,1\n",
    ):
        path.write_text(text)
        with pytest.raises(BTDInputError, match="c.csv"):
            read_coords(path, (2, 8, 8))


def test_tile_sites_skip_background():
    assert tile_starts(32, 16, 8).tolist() == [0, 8, 16]
    assert tile_starts(30, 16, 8).tolist() == [0, 8, 14]
    fg = np.zeros((2, 32, 32), dtype=bool)
    fg[1, :8, :8] = True  # 64 tissue pixels = 25 % of a 16 x 16 tile at the corner only
    sites, skipped = tile_sites(fg, 16, 8, min_foreground=0.1)
    assert sites.tolist() == [[1, 8, 8]] and skipped == 17
    sites, skipped = tile_sites(fg, 16, 8, min_foreground=0.3)
    assert len(sites) == 0 and skipped == 18


# ----------------------------------------------------------------------------- calibrate, score, train


@pytest.fixture
def patch_folder(tmp_path) -> Path:
    """40 [0, 1] patches: 10 train, 30 val (15 TM + 15 TB) with site positions."""
    rng = np.random.default_rng(5)
    x = rng.random((40, 1, P, P), dtype=np.float32)
    manifest = pd.DataFrame(
        {
            "index": np.arange(40),
            "patient": [f"ct-{i // 10:04d}" for i in range(40)],
            "scanner": "helion-16",
            "split": ["train"] * 10 + ["val"] * 30,
            "slice": 0,
            "cy": 20,
            "cx": 20,
            "py": rng.integers(0, P, 40),
            "px": rng.integers(0, P, 40),
            "diameter_mm": 0.0,
            "label": ["TB"] * 10 + ["TM", "TB"] * 15,
        }
    )
    save_patch_dataset(tmp_path / "processed", x, manifest)
    return tmp_path / "processed"


def test_calibrate_writes_json(ckpt, detector, patch_folder, tmp_path, capsys):
    bare = uncalibrated(ckpt, tmp_path)
    argv = ["calibrate", "--checkpoint", bare, "--patches", patch_folder, "--target-fpr", "0.2"]
    code, out, err = run([*argv, "--window", "8", "--device", "cpu"], capsys)
    assert code == 0, err
    x = np.load(patch_folder / "patches.npy")
    manifest = pd.read_csv(patch_folder / "manifest.csv")
    val = (manifest["split"] == "val").to_numpy()
    for task, label, window in (("inject", "TM", 8), ("remove", "TB", None)):
        cal = Calibration.load(calibration_path(bare, task))
        rows = val & (manifest["label"] == label).to_numpy()
        kw = {"window": window, "centres": manifest.loc[rows, ["py", "px"]]} if window else {}
        expected = fit_threshold(score(detector, x[rows], **kw)[0], 0.2)
        assert cal.n == 15 and cal.target_fpr == 0.2 and cal.family == expected.family
        assert cal.threshold == pytest.approx(expected.threshold, rel=1e-9)
        assert f"{task}: family {cal.family}, threshold" in out


def test_score_writes_one_row_per_patch(ckpt, detector, patch_folder, tmp_path, capsys):
    x = np.load(patch_folder / "patches.npy")
    csv = tmp_path / "scores.csv"
    code, out, err = run(
        ["score", "--checkpoint", ckpt, "--patches", patch_folder / "patches.npy", "--out", csv,
         "--device", "cpu", "--batch-size", "7"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(csv)
    assert list(table.columns) == ["index", "score"] and len(table) == len(x)
    np.testing.assert_allclose(table["score"], score(detector, x)[0], rtol=1e-6)

    # a patch folder: manifest columns kept, window at the manifest's py,px, flags at calibration
    code, _, err = run(
        ["score", "--checkpoint", ckpt, "--patches", patch_folder, "--split", "val",
         "--task", "inject", "--window", "8", "--out", csv, "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(csv)
    assert len(table) == 30 and {"patient", "label", "score", "flagged"} <= set(table.columns)
    centres = table[["py", "px"]].to_numpy(float)
    expected = score(detector, x[10:], window=8, centres=centres)[0]
    # float32 conv kernels sum in a CPU-dependent order (AVX-512 vs AVX2): a few 1e-6 relative
    np.testing.assert_allclose(table["score"], expected, rtol=2e-5)
    threshold = Calibration.load(calibration_path(ckpt, "inject")).threshold
    assert table["flagged"].tolist() == [int(s > threshold) for s in expected]


def test_train_resumes_with_checkpoint_settings(patch_folder, tmp_path, capsys):
    out = tmp_path / "m"
    tiny = ["--dim", "8", "--dim-mults", "1,2", "--attn-heads", "1", "--attn-dim-head", "8"]
    base = ["train", "--patches", patch_folder, "--out", out, "--quiet", "--device", "cpu"]
    code, stdout, err = run([*base, "--steps", "2", "--batch-size", "4", *tiny], capsys)
    assert code == 0, err
    assert "steps 0->2" in stdout and (out / "checkpoint.pt").is_file()
    code, stdout, err = run([*base, "--steps", "3"], capsys)  # no size options: taken from it
    assert code == 0, err
    assert "steps 2->3" in stdout
    assert len(pd.read_csv(out / "loss_log.csv")) == 2
    code, _, err = run([*base, "--steps", "4", "--dim", "12"], capsys)
    assert_one_line_error(code, err, str(out / "checkpoint.pt"), "dim")


@pytest.mark.slow
def test_scan_split_over_two_processes_matches_one(ckpt, volume, tmp_path, capsys):
    """`torchrun` (what `accelerate launch` runs) with 2 CPU processes: same table, one report."""
    import subprocess

    np.save(tmp_path / "vol.npy", volume)
    base = ["scan", str(tmp_path / "vol.npy"), "--checkpoint", str(ckpt), "--threshold", "0.0",
            "--device", "cpu", "--stride", "4"]  # fmt: skip
    code, _, err = run([*base, "--out", tmp_path / "one"], capsys)
    assert code == 0, err
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29534", "-m", "btd.cli", *base, "--accelerate",
           "--out", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("scored ") == 1  # only the main process reports
    one = pd.read_csv(tmp_path / "one" / "scores.csv")
    two = pd.read_csv(tmp_path / "two" / "scores.csv")
    assert len(one) > 8
    pd.testing.assert_frame_equal(one, two, rtol=1e-6)
    # the same number of heat maps (near-tied scores may swap places: batches differ by process)
    assert len(list((tmp_path / "one").glob("flag_*.png"))) == len(
        list((tmp_path / "two").glob("flag_*.png"))
    )
