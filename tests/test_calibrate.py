"""Threshold calibration: the fitted threshold gives the target FPR on fresh benign scores."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

from btd.detect import Calibration, calibration_path, fit_threshold
from btd.errors import BTDConfigError, BTDInputError

N_CAL, N_TEST = 3000, 200_000


def _within_sampling_error(cal: Calibration, fresh: np.ndarray) -> None:
    """Achieved FPR within 3 binomial sigmas (threshold estimate + test sample)."""
    p = cal.target_fpr
    achieved = float(cal.apply(fresh).mean())
    sigma = math.sqrt(p * (1 - p) * (1 / cal.n + 1 / fresh.size))
    assert abs(achieved - p) < 3 * sigma, (cal.family, p, achieved, sigma)


DISTRIBUTIONS = {
    "lognormal": stats.lognorm(0.6, scale=2e-3),
    "gamma": stats.gamma(3.0, scale=1e-3),
    "weibull": stats.weibull_min(1.7, scale=5e-3),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize("target", [0.05, 0.01])
def test_parametric_family_hits_target_fpr(name, target):
    dist = DISTRIBUTIONS[name]
    benign = dist.rvs(N_CAL, random_state=np.random.default_rng(1))
    fresh = dist.rvs(N_TEST, random_state=np.random.default_rng(2))
    for family in (name, "auto"):
        cal = fit_threshold(benign, target, family=family)
        _within_sampling_error(cal, fresh)
    auto = fit_threshold(benign, target)
    assert auto.family == name  # AIC picks the true family at this sample size
    assert set(auto.candidates) == {"lognormal", "gamma", "weibull"}


@pytest.mark.parametrize("family", ["kde", "empirical"])
def test_nonparametric_families_hit_target_fpr(family):
    dist = DISTRIBUTIONS["lognormal"]
    benign = dist.rvs(N_CAL, random_state=np.random.default_rng(3))
    fresh = dist.rvs(N_TEST, random_state=np.random.default_rng(4))
    _within_sampling_error(fit_threshold(benign, 0.05, family=family), fresh)


def test_auto_falls_back_to_empirical_for_bimodal_scores():
    rng = np.random.default_rng(5)

    def draw(n):
        return np.where(rng.random(n) < 0.7, rng.lognormal(-6, 0.2, n), rng.lognormal(-4, 0.2, n))

    cal = fit_threshold(draw(N_CAL), 0.05)
    assert cal.family == "empirical" and "KS" in cal.note
    _within_sampling_error(cal, draw(N_TEST))


def test_empirical_threshold_is_order_statistic():
    x = np.arange(1, 100, dtype=float)  # n = 99, (1 - 0.1) * 100 = 90 -> 90th smallest
    assert fit_threshold(x, 0.1, family="empirical").threshold == 90.0
    tiny = fit_threshold(x, 1e-4, family="empirical")
    assert tiny.threshold == 99.0 and "resolution" in tiny.note


def test_apply_save_load_roundtrip(tmp_path):
    benign = DISTRIBUTIONS["gamma"].rvs(500, random_state=np.random.default_rng(6))
    cal = fit_threshold(benign, 0.05)
    path = calibration_path(tmp_path / "checkpoint.pt", "injection")
    assert path == tmp_path / "calibration_injection.json"
    cal.save(path)
    again = Calibration.load(path)
    assert again == cal
    flags = again.apply([cal.threshold * 0.5, cal.threshold, cal.threshold * 2])
    assert flags.tolist() == [False, False, True]


def test_bad_calibration_inputs(tmp_path):
    good = np.linspace(1, 2, 50)
    with pytest.raises(BTDInputError, match="at least"):
        fit_threshold([1.0, 2.0], 0.05)
    with pytest.raises(BTDInputError, match="NaN"):
        fit_threshold(np.append(good, np.nan), 0.05)
    with pytest.raises(BTDInputError, match="positive"):
        fit_threshold(good - 1.5, 0.05, family="lognormal")
    assert fit_threshold(good - 1.5, 0.05).family == "empirical"  # auto copes
    with pytest.raises(BTDConfigError, match="target_fpr"):
        fit_threshold(good, 0.0)
    with pytest.raises(BTDConfigError, match="family"):
        fit_threshold(good, 0.05, family="cauchy")
    broken = tmp_path / "calibration.json"
    broken.write_text("{not json")
    with pytest.raises(BTDInputError, match="calibration.json"):
        Calibration.load(broken)
    broken.write_text('{"family": "gamma"}')
    with pytest.raises(BTDInputError, match="missing"):
        Calibration.load(broken)
    with pytest.raises(BTDInputError, match="not found"):
        Calibration.load(tmp_path / "nothing.json")


def test_save_binds_the_checkpoint_beside_or_given(tmp_path):
    from btd.diffusion.checkpoint import checkpoint_sha256, save_checkpoint

    cal = fit_threshold(np.random.default_rng(0).gamma(3.0, 1e-3, 50), 0.1)
    lone = Calibration.load(cal.save(tmp_path / "lone" / "calibration_remove.json"))
    assert lone.checkpoint_sha256 is None  # no checkpoint beside: nothing to bind to
    ckpt = tmp_path / "m" / "checkpoint.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, {"config": {}, "step": 7, "model": {}, "ema": {}})
    bound = Calibration.load(cal.save(ckpt.with_name("calibration_remove.json")))
    assert (bound.checkpoint_sha256, bound.checkpoint_step) == (checkpoint_sha256(ckpt), 7)
    bound.check_checkpoint(ckpt, "calibration_remove.json")
    with pytest.raises(BTDInputError, match="checkpoint file not found"):
        cal.save(tmp_path / "x.json", checkpoint=tmp_path / "missing.pt")
    with pytest.raises(BTDInputError, match="does not record which checkpoint"):
        lone.check_checkpoint(ckpt, "calibration_remove.json")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [("threshold", "0.1", "threshold must be a finite number"),
     ("threshold", -1.0, "threshold must be a finite number"),
     ("target_fpr", 1.0, "target_fpr must be in (0, 1)"),
     ("n", True, "n must be a positive integer"),
     ("checkpoint_sha256", "abc", "checkpoint_sha256 must be 64 hex digits"),
     ("checkpoint_step", -3, "checkpoint_step must be an integer >= 0"),
     ("ks_pvalue", "low", "ks_pvalue must be a number")],
)  # fmt: skip
def test_from_dict_checks_types_and_ranges(field, value, fragment):
    d = fit_threshold(np.random.default_rng(0).gamma(3.0, 1e-3, 50), 0.1).to_dict()
    with pytest.raises(BTDInputError, match=re.escape(fragment)):
        Calibration.from_dict({**d, field: value}, source="cal.json")


def test_binding_default_is_the_trainer_checkpoint_name():
    from btd.detect.calibrate import CHECKPOINT
    from btd.diffusion.train import CHECKPOINT_NAME

    assert CHECKPOINT == CHECKPOINT_NAME  # what the pipeline's train_ddpm stage saves beside
