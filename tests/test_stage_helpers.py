"""Known-answer tests of the helpers the stages share: the Laplacian control, the stored-type
round trip of fakes, the calibration interval, the computed readings and the report figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from btd.data.preprocess import (
    CT_HU_MAX,
    CT_HU_MIN,
    MRINormaliser,
    normalize_ct,
    normalize_mri_patient,
    to_stored_grid,
)
from btd.detect.control import CONTROL, laplacian_maps, laplacian_score
from btd.pipeline.evaluate import (
    best_baselines,
    calibration_metrics,
    calibration_summary,
    fpr_interval,
    size_figure,
    tail_calibration_check,
)
from btd.report import reading


def test_laplacian_control_known_answers() -> None:
    flat = np.full((2, 1, 8, 8), 0.3)
    assert np.allclose(laplacian_score(flat), 0.0)
    impulse = np.zeros((1, 1, 9, 9))
    impulse[0, 0, 4, 4] = 1.0
    lap = laplacian_maps(impulse)[0]
    assert lap[4, 4] == -4.0 and lap[3, 4] == lap[4, 5] == 1.0
    # whole patch: (16 + 4 * 1) / 81; a 3 x 3 window at the centre holds all of it: 20 / 9
    assert laplacian_score(impulse)[0] == pytest.approx(20 / 81)
    assert laplacian_score(impulse, 3, np.array([[4.0, 4.0]]))[0] == pytest.approx(20 / 9)
    assert CONTROL.endswith("(control)")


def test_ct_fakes_land_on_the_integer_hu_grid() -> None:
    rng = np.random.default_rng(0)
    fake = rng.uniform(0, 1, (1, 6, 6)).astype(np.float32)
    q = to_stored_grid(fake, "ct")
    hu = q.astype(np.float64) * (CT_HU_MAX - CT_HU_MIN) + CT_HU_MIN
    assert np.allclose(hu, np.rint(hu), atol=1e-3)
    reals = normalize_ct(np.rint(hu))
    assert np.array_equal(q, reals)  # bit-identical to a real patch with those HU
    assert np.abs(q - fake).max() <= 0.5 / (CT_HU_MAX - CT_HU_MIN) + 1e-6


def test_mri_fakes_land_on_the_patients_stored_grid() -> None:
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 256, (3, 16, 16)).astype(np.uint8)
    norm = MRINormaliser.fit(volume)
    assert np.array_equal(norm(volume), normalize_mri_patient(volume))
    grid = set(norm(np.arange(256, dtype=np.uint8)).tolist())
    fake = rng.uniform(0, 1, (16, 16)).astype(np.float32)
    q = to_stored_grid(fake, "mri", volume)
    assert set(q.ravel().tolist()) <= grid
    with pytest.raises(ValueError, match="stored volume"):
        to_stored_grid(fake, "mri")


def test_fpr_interval_is_the_binomial_one() -> None:
    lo, hi = fpr_interval(0.1, 60)
    assert lo == pytest.approx(2 / 60) and hi == pytest.approx(11 / 60)  # the issue: ~0.03-0.18
    assert np.isnan(fpr_interval(0.1, 0)[0])


def _t1() -> pd.DataFrame:
    rows = []
    for scenario, (b, c, a) in {
        "X-CT-Inject": (0.9, 0.6, 0.7),
        "X-CT-Remove": (0.5, 0.7, 0.6),
    }.items():
        for method, auc in (("BTD", b), (CONTROL, c), ("AE", a)):
            rows.append(dict(method=method, scenario=scenario, auc=auc, auc_lo=auc - 0.05,
                             auc_hi=auc + 0.05, eer=1 - auc))  # fmt: skip
    return pd.DataFrame(rows)


def test_tail_calibration_flags_p_at_or_below_the_target() -> None:
    """BTD+ scores are -log10 p: the threshold at target 0.1 flags p <= 0.1 (p = 0.1 included)."""
    p_real = np.array([0.05, 0.1, 0.2, 0.5, 1.0, 0.8, 0.3, 0.6, 0.9, 0.4])  # 2 of 10 flagged
    p_fake = np.array([0.01, 0.02, 0.5, 0.1])  # 3 of 4 flagged
    rows = []
    for method in ("BTD+ two-sided", "BTD+ scanner"):
        for fake, p in ((0, p_real), (1, p_fake)):
            rows += [{"method": method, "scenario": "LDM-CT-Inject", "fake": fake,
                      "score": -np.log10(v)} for v in p]  # fmt: skip
    rows.append({"method": "BTD", "scenario": "LDM-CT-Inject", "fake": 0, "score": 9.0})
    cal = tail_calibration_check(pd.DataFrame(rows), 0.1)
    assert list(cal["method"]) == ["BTD+ two-sided", "BTD+ scanner"]  # BTD is not a tail score
    r = cal.iloc[0]
    assert (r.test_fpr, r.test_tpr, r.n_real) == (0.2, 0.75, 10)
    assert (r.fpr_lo, r.fpr_hi) == fpr_interval(0.1, 10)
    assert r.holds == (r.fpr_lo <= 0.2 <= r.fpr_hi)
    summary = calibration_summary(cal).set_index("method")
    assert summary.loc["BTD+ scanner", "test_sets"] == 1
    metrics = calibration_metrics(cal)
    assert metrics["BTD+ two-sided"]["scenarios"]["LDM-CT-Inject"]["test_fpr"] == 0.2


def test_best_baseline_excludes_the_control_and_reading_says_where_btd_wins() -> None:
    best = best_baselines(_t1())
    assert best["best_baseline"].tolist() == ["AE", "AE"]
    assert best["control_auc"].tolist() == [0.6, 0.7]
    cal = pd.DataFrame({"scenario": ["X-CT-Inject", "X-CT-Remove"], "target_fpr": 0.1,
                        "test_fpr": [0.1, 0.4], "fpr_lo": 0.05, "fpr_hi": 0.18,
                        "holds": [True, False]})  # fmt: skip
    text = reading.evaluate(best, cal)
    assert "above the Laplacian (control) on 1 of 2 scenarios (X-CT-Inject)" in text
    assert "below it on X-CT-Remove" in text
    assert "on 1 of 2 test sets; it misses on X-CT-Remove (FPR 0.40" in text


def test_deepfake_reading_flags_weak_attacks() -> None:
    realism = pd.DataFrame(
        {"noise_in": [1.0, 0.4], "noise_out": [1.0, 1.0], "scenario": ["S", "S"]},
        index=pd.Index(["real", "fake"], name="group"),
    )
    text = reading.deepfakes({"S": 0.45, "T": 0.9}, realism)
    assert "Below 0.8: S" in text and "S 0.40× (reals 1.00×)" in text
    assert "Mean intensity" not in text  # no intensities measured
    realism["mean_in"] = [0.05, 0.11]
    text = reading.deepfakes({"S": 0.45, "T": 0.9}, realism)
    assert "fakes vs reals of the class they claim: S 0.110 vs 0.050." in text


def test_size_figure_leaves_out_scenarios_without_diameters(tmp_path) -> None:
    sizes = pd.DataFrame({
        "scenario": ["A"] * 4 + ["B"] * 4, "diameter_mm": [5, 10, 15, 20] + [np.nan] * 4,
        "normalised_score": [0.5, 1.0, 1.5, 2.0] * 2,
    })  # fmt: skip
    fig = size_figure(sizes, tmp_path / "s.png")
    assert len([a for a in fig.axes if a.has_data()]) == 1
    assert "B" in fig._suptitle.get_text()
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_report_figures_draw(tmp_path) -> None:
    from btd import viz

    rng = np.random.default_rng(0)
    rows = [("S", rng.random((8, 8)), rng.random((8, 8)), np.ones((8, 8)))]
    fig = viz.before_after(rows, tmp_path / "ba.png")
    diff_ax = fig.axes[2]
    lo, hi = diff_ax.images[0].get_clim()
    assert lo == -hi  # centred on zero
    log = pd.DataFrame({"step": [1, 2], "train_loss": [1, 0.5], "val_loss": [1, 0.6],
                        "val_loss_t0": [0.9, 0.8]})  # fmt: skip
    fig = viz.ddpm_loss(log, "t", tmp_path / "l.png")
    assert fig.axes[0].get_ylabel() == "noise-prediction MSE"
    results = {
        ("S", "BTD"): {"residuals": rng.random((2, 8, 8)), "shap": rng.normal(size=(2, 8, 8))}
    }
    fig = viz.shap_residuals(results, 2, tmp_path / "f5.png")
    assert fig.axes[0].get_title().startswith("sample 1")
    assert all((tmp_path / n).stat().st_size > 1000 for n in ("ba.png", "l.png", "f5.png"))


def test_attack_nps_gives_each_attacker_one_colour_in_every_panel(tmp_path) -> None:
    from btd import viz

    rows = []
    for mod, attackers in (("ct", ("CTGAN", "DIFF", "LDM")), ("mri", ("DIFF", "LDM"))):
        for region in ("inside mask", "outside mask"):
            for f in (0.1, 0.2):
                rows.append({"modality": mod, "region": region, "group": "real", "attacker": "",
                             "freq": f, "nps": 1.0})  # fmt: skip
                for a in attackers:
                    rows.append({"modality": mod, "region": region, "group": "fake",
                                 "attacker": a, "freq": f, "nps": 2.0})  # fmt: skip
    fig = viz.attack_nps(pd.DataFrame(rows), tmp_path / "nps.png")
    colours: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert all(len(c) == 1 for c in colours.values()), (
        colours
    )  # DIFF is DIFF's colour in CT and MRI


def test_guidance_validation_and_score_figures_draw(tmp_path) -> None:
    from btd import viz

    study = pd.DataFrame({"modality": ["ct"] * 4 + ["mri"] * 4, "attack": "inject",
                          "negative": ["none", "none", "opposite", "opposite"] * 2,
                          "guidance": [1.0, 3.0] * 4, "success": [0.5, 0.9, 0.4, 0.7] * 2,
                          "paste_success": [0.5, 0.8, 0.3, 0.6] * 2})  # fmt: skip
    chosen = ({"ct": {"inject": 3.0}, "mri": {"inject": 3.0}},
              {"ct": {"inject": "none"}, "mri": {"inject": "opposite"}})  # fmt: skip
    fig = viz.guidance_study(study, chosen, 0.8, tmp_path / "g.png")
    assert [a.get_title() for a in fig.axes] == ["CT · inject\nchosen 3, negative none",
                                                 "MRI · inject\nchosen 3, negative opposite"]  # fmt: skip
    assert len(fig.axes[0].lines) == 2 * 2 + 2  # 2 modes x (decoded, pasted) + target + chosen
    val = pd.DataFrame({"method": ["BTD", "BTD+ scanner"], "scenario": "LDM-CT-Inject",
                        "auc": [0.6, 0.8]})  # fmt: skip
    fig = viz.validation_auc(val, "BTD+ scanner", tmp_path / "v.png")
    assert "BTD+ scanner" in fig.axes[0].get_title()
    scores = pd.DataFrame({"method": "BTD", "scenario": ["A"] * 4, "fake": [0, 0, 1, 1],
                           "score": [1.0, 2.0, 3.0, 4.0]})  # fmt: skip
    fig = viz.score_distributions(scores, ["BTD"], ["A"], tmp_path / "d.png")
    assert fig.axes[0].get_yscale() == "log"
    assert all((tmp_path / n).stat().st_size > 1000 for n in ("g.png", "v.png", "d.png"))
