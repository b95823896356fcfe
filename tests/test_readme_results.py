"""The README's results block is generated from the pipeline's tables, and kept in sync."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from btd import paths
from btd.errors import BTDInputError
from btd.report.readme import END, START, paper_numbers, render, update

SCENARIOS = list(paper_numbers()["columns"])


def fake_tables(root: Path) -> None:
    """table1/table3 with known AUCs: BTD 0.9, AE 0.7, OC-VAE 0.6; B-1 0.8, F&B-1 0.55."""
    ci = {"auc_lo": 0.5, "auc_hi": 1.0, "eer": 0.2, "eer_lo": 0.1, "eer_hi": 0.3}
    t1 = [{"method": m, "scenario": s, "auc": a, **ci}
          for s in SCENARIOS for m, a in (("BTD", 0.9), ("AE", 0.7), ("OC-VAE", 0.6),
                                          ("Laplacian (control)", 0.65), ("BTD+ scanner", 0.95))]  # fmt: skip
    t3 = [{"method": m, "steps": k, "scenario": s, "auc": a, **ci}
          for s in SCENARIOS for k in (1, 10) for m, a in (("B", 0.8), ("F&B", 0.55))]  # fmt: skip
    tables = root / "results" / "tables"
    tables.mkdir(parents=True)
    pd.DataFrame(t1).to_csv(tables / "table1.csv", index=False)
    pd.DataFrame(t3).to_csv(tables / "table3.csv", index=False)


def test_paper_numbers_are_the_papers():
    p = paper_numbers()
    assert p["columns"]["LDM-MRI-Inject"] == "SD-MRI-Inject"
    assert p["table1"]["BTD"]["CTGAN-CT-Remove"] == 0.55
    assert p["table3_d1"]["B"]["LDM-MRI-Inject"] == 0.9862


def test_render_known_answer(tmp_path):
    fake_tables(tmp_path)
    text = render(tmp_path)
    # LDM-MRI-Inject: paper BTD 0.99, paper best baseline ae 0.80; ours BTD 0.90, best ae 0.70
    assert (
        "| LDM-MRI-Inject (SD-MRI-Inject) | 0.99 | 0.90 [0.50, 1.00] | 0.65 [0.50, 1.00] | 0.80 (AE) "
        "| 0.70 [0.50, 1.00] (AE) |" in text
    )
    # CTGAN-CT-Inject: the paper's best baseline is In-Paint AE (0.80)
    assert "| 0.80 (In-Paint AE) |" in text
    assert "| LDM-CT-Remove | 0.86 | 0.80 [0.50, 1.00] | 0.66 | 0.55 [0.50, 1.00] |" in text
    assert (
        "injection BTD 0.90 vs control 0.65 vs best baseline 0.70; removal BTD 0.90 vs control 0.65 "
        "vs best baseline 0.70" in text
    )
    # neither the control nor BTD+ counts as a baseline; BTD+ gets its own table
    assert "(Laplacian (control))" not in text and "(BTD+ scanner)" not in text
    assert "| LDM-MRI-Inject | 0.90 [0.50, 1.00] | 0.95 [0.50, 1.00] | 0.65 [0.50, 1.00] |" in text
    assert "BTD: above the control on 0 of 6" in text
    assert "(default)" not in text  # no validation choice written yet


def test_plus_table_marks_the_variant_chosen_on_validation(tmp_path):
    fake_tables(tmp_path)
    pd.DataFrame({"method": ["BTD", "BTD+ scanner"], "scenario": "LDM-CT-Inject",
                  "auc": [0.6, 0.8], "default": [False, True]}).to_csv(
        tmp_path / "results" / "validation_auc.csv", index=False)  # fmt: skip
    assert "| scenario | BTD | BTD+ scanner (default) | Laplacian (control) |" in render(tmp_path)


def test_update_rewrites_only_the_block(tmp_path):
    fake_tables(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\nold\n{END}\n\nafter\n")
    assert update(readme, tmp_path, check=True, benchmarks=False) is False
    update(readme, tmp_path, benchmarks=False)
    text = readme.read_text()
    assert text.startswith("# title\n\n") and text.endswith(f"{END}\n\nafter\n")
    assert "old" not in text
    assert update(readme, tmp_path, check=True, benchmarks=False) is True
    with pytest.raises(BTDInputError, match="benchmarks:start"):  # the benchmarks block is missing
        update(readme, tmp_path)


def test_missing_tables_and_markers_are_clear_errors(tmp_path):
    with pytest.raises(BTDInputError, match="table1.csv"):
        render(tmp_path)
    readme = tmp_path / "README.md"
    fake_tables(tmp_path)
    readme.write_text("no markers\n")
    with pytest.raises(BTDInputError, match="results markers"):
        update(readme, tmp_path)


def test_committed_readme_matches_committed_tables():
    """The README's numbers are the committed run's (regenerate with `btd readme`)."""
    if not (paths.ROOT / "results" / "tables" / "table3.csv").is_file():
        pytest.skip("no committed results tables in this checkout")
    assert update(paths.ROOT / "README.md", paths.ROOT, check=True), "run `btd readme`"


def test_scan_speed_markdown_known_answer(tmp_path):
    from btd.report.readme import render_benchmarks, scan_speed_markdown

    labels = [("model_loading", "model loading (checkpoint, hash, calibration)", 0.5),
              ("dicom_read", "DICOM read", 2.0), ("resampling", "resampling", 1.0),
              ("normalisation_tiling", "normalisation + tiling", 1.5),
              ("model_scoring", "model scoring", 40.0), ("report_writing", "report writing", 5.0)]  # fmt: skip
    r = {
        "model": {"image_size": 48, "dim": 16, "dim_mults": [1, 2, 4], "pixel_mm": 1.4,
                  "checkpoint": "models/ddpm/ct/checkpoint.pt", "random_model": False},
        "series": {"shape": [60, 512, 512], "pixel_mm": 0.7, "slice_mm": 1.25},
        "settings": {"batch_size": 64},
        "scan": {"patches": 5000, "median_wall_s": 50.0, "patches_per_s": 100.0},
        "parts": [{"part": k, "label": lab, "median_s": s, "share": s / 50.0} for k, lab, s in labels],
        "bare_forward": {"patches_per_s": 150.0},
        "ratios": {"scan_over_bare": 100 / 150, "scoring_stage_over_bare": 125 / 150, "target": 0.8},
        "cpu": "Test CPU (avx2; 2 logical CPUs)",
        "machine": {"device": "cpu", "cpu_count": 2, "torch_threads": 2, "torch": "2.0"},
    }  # fmt: skip
    text = scan_speed_markdown(r)
    assert text.startswith(
        "Series: 60 x 512 x 512 CT DICOM, 0.7 mm pixels, 1.25 mm slices (synthetic); model 48 px, "
        "dim 16, mults [1, 2, 4], 1.4 mm (models/ddpm/ct/checkpoint.pt); 5000 tiles, batch 64; "
        "cpu, 2 cores, 2 torch threads, torch 2.0.\n"
    )
    assert "| part | seconds | share |\n|---|---|---|\n" in text
    assert "| DICOM read | 2.00 | 4% |" in text
    assert "| model scoring | 40.00 | 80% |" in text
    assert "| report writing | 5.00 | 10% |" in text
    assert "| **whole scan** | **50.00** | 100% |" in text
    assert text.endswith(
        "Whole scan: **100 patches/s**; bare U-Net forward on the same tiles: 150 patches/s; "
        "ratio **0.67** (target >= 0.8: **not met**; scoring stage alone 0.83). "
        "CPU: Test CPU (avx2; 2 logical CPUs)."
    )
    r["ratios"]["scan_over_bare"] = 0.85
    assert "(target >= 0.8: met;" in scan_speed_markdown(r)
    # render_benchmarks picks up benchmarks/results/scan_speed.json
    import json

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "scan_speed.json").write_text(json.dumps(r))
    block = render_benchmarks(tmp_path)
    assert block.startswith("#### Whole `btd scan`, end to end (`benchmarks/scan_speed.py`)\n\n")


def test_summary_line_counts_paste_back_sets_with_their_attack():
    from btd.report.readme import summary_line

    rows = [
        {"scenario": s, "method": m, "auc": a}
        for s, base in (
            ("LDM-CT-Inject", 0.2),
            ("LDM-CT-Inject-Paste", 0.6),
            ("LDM-CT-Remove", 0.4),
        )
        for m, a in (("BTD", base), ("Laplacian (control)", base), ("AE", base))
    ]
    line = summary_line(pd.DataFrame(rows))
    assert "injection BTD 0.40 vs control 0.40 vs best baseline 0.40" in line  # (0.2 + 0.6) / 2
    assert "removal BTD 0.40" in line


def test_recipe_markdown_known_answer():
    from btd.report.readme import recipe_markdown

    r = {
        "rows": [{"recipe": "uniform", "step": 250, "train_s": 120.0, "LDM-CT-Inject": 0.61,
                  "loss t=0": 0.5, "loss t=100-999": 0.02}],
        "control_auc": {"LDM-CT-Inject": 0.13},
        "recipes": {"uniform": {"images_per_s": 19.5, "sample_nps_mean_abs_log10_ratio": 0.8}},
        "machine": {"cpu": "AMD EPYC (avx2; 2 logical CPUs)", "device": "cpu", "cpu_count": 2,
                    "torch_threads": 2, "torch": "2.14.1"},
    }  # fmt: skip
    text = recipe_markdown(r)
    assert "| uniform | 250 | 2.0 | 0.610 | 0.5000 | 0.0200 |" in text
    r["rows"][0]["LDM-CT-Inject"] = None  # a point the study could not record
    assert "| uniform | 250 | 2.0 | — | 0.5000 | 0.0200 |" in recipe_markdown(r)
    assert "| control (no learning) |  |  | 0.130 |  |  |" in text
    assert (
        "uniform: 19.5 images/s" in text and "AMD EPYC (avx2; 2 logical CPUs); cpu, 2 cores" in text
    )


def test_btd_plus_is_held_to_the_two_sided_control():
    from btd.report.readme import control_line

    row = {"scenario": "LDM-CT-Inject", "eer": 0.2, "eer_lo": 0.1, "eer_hi": 0.3}
    t1 = pd.DataFrame([
        {**row, "method": "BTD", "auc": 0.3, "auc_lo": 0.2, "auc_hi": 0.4},
        {**row, "method": "BTD+ two-sided", "auc": 0.85, "auc_lo": 0.8, "auc_hi": 0.9},
        {**row, "method": "Laplacian (control)", "auc": 0.1, "auc_lo": 0.05, "auc_hi": 0.15},
        {**row, "method": "Laplacian (control) two-sided", "auc": 0.95, "auc_lo": 0.9, "auc_hi": 1.0},
    ])  # fmt: skip
    text = control_line(t1)
    # BTD+ would clear the one-sided control easily; its matched floor is the two-sided one
    assert (
        "BTD+ two-sided: above the two-sided control on 0 of 1, below it on LDM-CT-Inject" in text
    )
    assert "BTD: above the control on 1 of 1 (LDM-CT-Inject)" in text


def test_attack_and_calibration_lines_known_answer():
    from btd.report.readme import attack_line, calibration_line

    line = attack_line({"attack_success": {"LDM-CT-Inject": 0.95, "LDM-CT-Remove": 0.2}}, 0.8)
    assert "1 of 2 test sets reach it; below it: LDM-CT-Remove 0.20" in line
    assert attack_line({}) == ""
    line = attack_line({"attack_success": {"LDM-CT-Remove": 0.2},
                        "attack_success_reals": {"LDM-CT-Remove": 0.75}}, 0.8)  # fmt: skip
    assert "LDM-CT-Remove 0.20 (its reals 0.75)" in line
    cal = pd.DataFrame({
        "method": ["BTD", "BTD", "BTD+ two-sided"], "scenario": ["a", "b", "a"],
        "target_fpr": 0.1, "test_fpr": [0.0, 0.12, 0.1], "holds": [False, True, True],
    })  # fmt: skip
    line = calibration_line(cal)
    assert "target FPR 0.10" in line
    assert "BTD 1 of 2 (test FPR 0.00–0.12); BTD+ two-sided 1 of 1 (test FPR 0.10–0.10)" in line
    assert "BTD 1 of 2" in calibration_line(cal.drop(columns="method").iloc[:2])  # older runs
