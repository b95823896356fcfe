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
    assert p["columns"]["DIFF-MRI-Inject"] == "SD-MRI-Inject"
    assert p["table1"]["BTD"]["CTGAN-CT-Remove"] == 0.55
    assert p["table3_d1"]["B"]["DIFF-MRI-Inject"] == 0.9862


def test_render_known_answer(tmp_path):
    fake_tables(tmp_path)
    text = render(tmp_path)
    # DIFF-MRI-Inject: paper BTD 0.99, paper best baseline ae 0.80; ours BTD 0.90, best ae 0.70
    assert (
        "| DIFF-MRI-Inject (SD-MRI-Inject) | 0.99 | 0.90 [0.50, 1.00] | 0.65 [0.50, 1.00] | 0.80 (AE) "
        "| 0.70 [0.50, 1.00] (AE) |" in text
    )
    # CTGAN-CT-Inject: the paper's best baseline is In-Paint AE (0.80)
    assert "| 0.80 (In-Paint AE) |" in text
    assert "| DIFF-CT-Remove | 0.86 | 0.80 [0.50, 1.00] | 0.66 | 0.55 [0.50, 1.00] |" in text
    assert (
        "injection BTD 0.90 vs control 0.65 vs best baseline 0.70; removal BTD 0.90 vs control 0.65 "
        "vs best baseline 0.70" in text
    )
    # neither the control nor BTD+ counts as a baseline; BTD+ gets its own table
    assert "(Laplacian (control))" not in text and "(BTD+ scanner)" not in text
    assert "| DIFF-MRI-Inject | 0.90 [0.50, 1.00] | 0.95 [0.50, 1.00] | 0.65 [0.50, 1.00] |" in text
    assert "BTD: above the control on 0 of 6" in text


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
