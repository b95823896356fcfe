# ruff: noqa: F811 - test_cli's fixtures are imported and then requested as arguments
"""`btd calibrate --score` / `btd scan --score`: the BTD+ variants on the tiny real checkpoint.

Every expectation is computed by hand here (numpy on the model's residual maps), not through the
functions under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_medical import write_ct_series
from test_cli import (  # noqa: F401 - module fixtures of the tiny checkpoint
    P,
    assert_one_line_error,
    ckpt,
    detector,
    model_dir,
    run,
    uncalibrated,
    volume,
)

from btd.cli import SCORES as CLI_SCORES
from btd.data.dataset import save_patch_dataset
from btd.data.patches import extract_patch
from btd.data.preprocess import normalize_ct
from btd.detect import Calibration, calibration_path, fit_threshold, score
from btd.detect.calibrate import SCORES, fit_plus, plus_reference, score_calibration_path
from btd.errors import BTDInputError

WINDOW = 8
#: scanner_key of write_ct_series' header: Manufacturer + ManufacturerModelName
DICOM_SCANNER = "Virtual Imaging Co VirtuCT 64"
#: Calibration.to_dict of a btd calibration before BTD+ (the pipeline's files must not change)
OLD_FIELDS = {
    "family", "params", "threshold", "target_fpr", "n", "ks_statistic", "ks_pvalue",
    "candidates", "note", "checkpoint_sha256", "checkpoint_step",
}  # fmt: skip


def hand_ratio(maps: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """log(mean r^2 in the centred window / mean r^2 elsewhere), by hand."""
    r2 = np.square(maps.astype(np.float64))
    lo = P // 2 - window // 2
    inside = np.zeros((P, P), dtype=bool)
    inside[lo : lo + window, lo : lo + window] = True
    return np.log(r2[:, inside].mean(axis=1) / r2[:, ~inside].mean(axis=1))


def hand_tail(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """-log10 of 2 min(#ref <= v + 1, #ref >= v + 1) / (n + 1), capped at p = 1, by hand."""
    ref = np.asarray(ref)
    out = []
    for v in values:
        k = min((ref <= v).sum() + 1, (ref >= v).sum() + 1)
        out.append(-np.log10(min(2.0 * k / (ref.size + 1), 1.0)))
    return np.array(out)


def scan_maps(detector, volume: np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """Residual maps of the patches at the scan's sites, cut and scored independently."""
    norm = normalize_ct(volume)
    cut = [extract_patch(norm[z], y, x, P) for z, y, x in table[["slice", "y", "x"]].to_numpy()]
    return score(detector, np.stack([c[0] for c in cut])[:, None])[1]


def patch_folder(root: Path, n_a: int, n_b: int) -> Path:
    """10 train patches + val TB patches of two scanners (n_a of the DICOM one, n_b of another)
    and 4 val TM patches; remove is calibrated on the val TB ones."""
    rng = np.random.default_rng(7)
    n = 10 + n_a + n_b + 4
    x = rng.random((n, 1, P, P), dtype=np.float32)
    manifest = pd.DataFrame(
        {
            "index": np.arange(n),
            "patient": [f"ct-{i:04d}" for i in range(n)],
            "scanner": ["train"] * 10 + [DICOM_SCANNER] * n_a + ["other-8"] * n_b + ["x"] * 4,
            "split": ["train"] * 10 + ["val"] * (n_a + n_b + 4),
            "slice": 0,
            "cy": 20,
            "cx": 20,
            "py": P // 2,
            "px": P // 2,
            "diameter_mm": 0.0,
            "label": ["TB"] * (10 + n_a + n_b) + ["TM"] * 4,
        }
    )
    save_patch_dataset(root / "processed", x, manifest)
    return root / "processed"


def val_tb(folder: Path, scanner: str | None = None) -> np.ndarray:
    x = np.load(folder / "patches.npy")
    man = pd.read_csv(folder / "manifest.csv")
    rows = (man["split"] == "val") & (man["label"] == "TB")
    if scanner is not None:
        rows &= man["scanner"] == scanner
    return x[rows.to_numpy()]


def calibrate(bare: Path, folder: Path, score_name: str, capsys) -> tuple[int, str, str]:
    argv = ["calibrate", "--checkpoint", bare, "--patches", folder, "--task", "remove"]
    return run([*argv, "--target-fpr", "0.2", "--window", WINDOW, "--score", score_name,
                "--device", "cpu"], capsys)  # fmt: skip


def scan(series: Path, bare: Path, out: Path, score_name: str | None, capsys):
    argv = ["scan", series, "--checkpoint", bare, "--out", out, "--task", "remove"]
    argv += ["--stride", "8", "--window", WINDOW, "--device", "cpu", "--max-figures", "0"]
    return run([*argv, *(["--score", score_name] if score_name else [])], capsys)


def test_cli_choices_are_the_library_scores():
    assert CLI_SCORES == SCORES == ("btd", "two-sided", "self-ref")


def test_self_ref_round_trip_pooled(detector, ckpt, volume, tmp_path, capsys):
    """15 + 5 benign patches: no scanner reaches MIN_COUNT = 20: the scan reads the pooled one."""
    folder = patch_folder(tmp_path, 15, 5)
    bare = uncalibrated(ckpt, tmp_path)
    code, out, err = calibrate(bare, folder, "self-ref", capsys)
    assert code == 0, err
    assert "remove: score self-ref" in out and "0 scanner reference(s)" in out
    assert not calibration_path(bare, "remove").exists()  # the paper's file is left alone
    data = json.loads(score_calibration_path(bare, "remove", "self-ref").read_text())
    assert (
        score_calibration_path(bare, "remove", "self-ref").name
        == "calibration_remove.self-ref.json"
    )
    ref = np.sort(hand_ratio(score(detector, val_tb(folder))[1]))
    assert data["score"] == "self-ref" and data["n"] == 20 and data["min_count"] == 20
    np.testing.assert_allclose(data["reference"], ref, rtol=1e-9)
    assert data["scanner_references"] == {}
    assert data["threshold"] == pytest.approx(-np.log10(0.2))

    series = tmp_path / "series"
    write_ct_series(series, volume)
    code, _, err = scan(series, bare, tmp_path / "o", "self-ref", capsys)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "o" / "scores.csv")
    assert len(table) == 36
    expected = hand_tail(hand_ratio(scan_maps(detector, volume, table)), data["reference"])
    np.testing.assert_allclose(table["score"], expected, rtol=1e-6)
    assert (table["flagged"] == (expected > -np.log10(0.2))).all()
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["score"] == {
        "variant": "self-ref", "reference": "pooled", "scanner": None, "n_reference": 20,
    }  # fmt: skip


def test_two_sided_uses_the_scanner_reference(detector, ckpt, volume, tmp_path, capsys):
    """25 benign patches of the DICOM's scanner (>= 20) get their own reference; 5 of another
    scanner do not; a volume without a scanner header reads the pooled one."""
    folder = patch_folder(tmp_path, 25, 5)
    bare = uncalibrated(ckpt, tmp_path)
    code, out, err = calibrate(bare, folder, "two-sided", capsys)
    assert code == 0, err
    cal = Calibration.load(score_calibration_path(bare, "remove", "two-sided"))
    own = np.sort(score(detector, val_tb(folder, DICOM_SCANNER))[0])
    assert cal.score == "two-sided" and list(cal.scanner_references) == [DICOM_SCANNER]
    np.testing.assert_allclose(cal.scanner_references[DICOM_SCANNER], own, rtol=1e-9)
    assert len(cal.reference) == 30 and "other-8 (5)" in cal.note

    series = tmp_path / "series"
    write_ct_series(series, volume)
    code, _, err = scan(series, bare, tmp_path / "o", "two-sided", capsys)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "o" / "scores.csv")
    energy = np.square(scan_maps(detector, volume, table).astype(np.float64)).mean(axis=(1, 2))
    np.testing.assert_allclose(table["score"], hand_tail(energy, own), rtol=1e-6)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["score"] == {
        "variant": "two-sided", "reference": "scanner", "scanner": DICOM_SCANNER, "n_reference": 25,
    }  # fmt: skip
    assert f"scanner '{DICOM_SCANNER}'" in (tmp_path / "o" / "summary.md").read_text()

    np.save(tmp_path / "vol.npy", volume)  # no header: pooled
    code, _, err = scan(tmp_path / "vol.npy", bare, tmp_path / "p", "two-sided", capsys)
    assert code == 0, err
    pooled = json.loads((tmp_path / "p" / "summary.json").read_text())["score"]
    assert pooled["reference"] == "pooled" and pooled["n_reference"] == 30


def test_scan_refuses_a_calibration_of_another_score(ckpt, volume, tmp_path, capsys):
    np.save(tmp_path / "vol.npy", volume)
    folder = patch_folder(tmp_path, 10, 0)
    bare = uncalibrated(ckpt, tmp_path)
    # no two-sided calibration yet: the error names the command that makes one
    code, _, err = scan(tmp_path / "vol.npy", bare, tmp_path / "o", "two-sided", capsys)
    assert_one_line_error(code, err, "calibration_remove.two-sided.json", "--score two-sided")
    assert calibrate(bare, folder, "self-ref", capsys)[0] == 0
    selfref = score_calibration_path(bare, "remove", "self-ref")
    # a self-ref calibration in the btd file's place is refused for the default btd score ...
    shutil.copy(selfref, calibration_path(bare, "remove"))
    code, _, err = scan(tmp_path / "vol.npy", bare, tmp_path / "o", None, capsys)
    assert_one_line_error(
        code, err, "calibration_remove.json", "--score self-ref", "not --score btd"
    )
    # ... and an old btd file (no score field) in the two-sided file's place for two-sided
    shutil.copy(
        calibration_path(ckpt, "remove"), score_calibration_path(bare, "remove", "two-sided")
    )
    code, _, err = scan(tmp_path / "vol.npy", bare, tmp_path / "o", "two-sided", capsys)
    assert_one_line_error(code, err, "--score btd", "not --score two-sided", "btd calibrate")
    assert not (tmp_path / "o").exists()


def test_old_calibration_file_still_scans_as_btd(detector, ckpt, volume, tmp_path, capsys):
    bare = uncalibrated(ckpt, tmp_path)
    cal = fit_threshold(np.random.default_rng(2).gamma(3.0, 1e-3, 100), 0.3)
    cal.save(calibration_path(bare, "remove"))
    data = json.loads(calibration_path(bare, "remove").read_text())
    assert set(data) == OLD_FIELDS  # a btd calibration is written exactly as before BTD+
    assert Calibration.from_dict(data).score == "btd"

    series = tmp_path / "series"
    write_ct_series(series, volume)
    code, _, err = scan(series, bare, tmp_path / "o", None, capsys)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "o" / "scores.csv")
    energy = np.square(scan_maps(detector, volume, table).astype(np.float64)).mean(axis=(1, 2))
    np.testing.assert_allclose(table["score"], energy, rtol=2e-5)
    assert (table["flagged"] == (table["score"] > data["threshold"])).all()
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["score"] == {"variant": "btd"}
    assert summary["threshold"]["value"] == data["threshold"]


def test_fit_plus_minimum_count_and_fallback():
    stat = np.arange(30, dtype=float)[::-1]
    cal = fit_plus(stat, ["a"] * 20 + ["b"] * 10, 0.1, "two-sided")
    assert cal.reference == list(np.arange(30.0))
    assert cal.scanner_references == {"a": list(np.arange(10.0, 30.0))}
    assert cal.threshold == pytest.approx(1.0)
    ref, used = plus_reference(cal, "a")
    assert used == "a" and ref.tolist() == list(np.arange(10.0, 30.0))
    for scanner in ("b", "unknown", None):
        ref, used = plus_reference(cal, scanner)
        assert used is None and ref.size == 30
    restored = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert restored == cal


def test_bad_plus_fields_are_refused():
    cal = fit_plus(np.arange(12.0), None, 0.2, "self-ref").to_dict()
    for key, bad in (("reference", [2.0, 1.0]), ("reference", None), ("score", "btd+")):
        with pytest.raises(BTDInputError, match=key):
            Calibration.from_dict({**cal, key: bad})
    btd = fit_threshold(np.arange(1.0, 13.0), 0.2).to_dict()
    with pytest.raises(BTDInputError, match="reference"):
        Calibration.from_dict({**btd, "reference": [1.0]})


def test_score_command_reads_each_row_against_its_scanner(detector, ckpt, tmp_path, capsys):
    """`btd score --score two-sided` on a prepared folder: rows of the scanner with its own
    reference (25 >= 20) read against it, the others against the pooled one; by hand."""
    folder = patch_folder(tmp_path, 25, 5)
    bare = uncalibrated(ckpt, tmp_path)
    assert calibrate(bare, folder, "two-sided", capsys)[0] == 0
    cal = Calibration.load(score_calibration_path(bare, "remove", "two-sided"))
    out = tmp_path / "s.csv"
    argv = ["score", "--checkpoint", bare, "--patches", folder, "--split", "val", "--out", out,
            "--task", "remove", "--score", "two-sided", "--device", "cpu"]  # fmt: skip
    code, text, err = run(argv, capsys)
    assert code == 0, err
    assert f"{DICOM_SCANNER} own" in text and "other-8 pooled" in text
    table = pd.read_csv(out)
    x = np.load(folder / "patches.npy")[(pd.read_csv(folder / "manifest.csv")["split"] == "val")]
    energy = np.square(score(detector, x)[1].astype(np.float64)).mean(axis=(1, 2))
    own = (table["scanner"] == DICOM_SCANNER).to_numpy()
    expected = np.where(own, hand_tail(energy, cal.scanner_references[DICOM_SCANNER]),
                        hand_tail(energy, cal.reference))  # fmt: skip
    np.testing.assert_allclose(table["score"], expected, rtol=1e-6)
    assert (table["flagged"] == (expected > cal.threshold)).all()
    # a BTD+ score without a task has no benign reference to read: one clear line
    code, _, err = run([*argv[:-6], "--score", "self-ref", "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "--score", "--task")
