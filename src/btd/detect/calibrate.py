"""Unsupervised threshold calibration (paper section 3.4).

Score benign patches the model was not trained on, fit a distribution to those scores, and set the
threshold tau at the fitted quantile 1 - target_fpr, so that a benign patch is flagged (score >
tau) with probability target_fpr. No fake sample is needed.

Families: `lognormal`, `gamma`, `weibull` (two-parameter, location fixed at 0; BTD scores are
positive mean squares), `kde` (Gaussian KDE of log-scores) and `empirical` (order statistic).
`auto` fits the three parametric families by maximum likelihood and keeps the lowest AIC; if even
that one fails a Kolmogorov-Smirnov test at level `ks_alpha` the parametric shape is not trusted
and the empirical quantile is used instead. A parametric fit extrapolates to small FPRs from few
samples; the empirical quantile needs about 1/target_fpr samples but assumes no shape.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, stats

from btd.atomic import write_json
from btd.errors import BTDConfigError, BTDInputError

PARAMETRIC = {
    "lognormal": (stats.lognorm, ("sigma", "scale")),
    "gamma": (stats.gamma, ("shape", "scale")),
    "weibull": (stats.weibull_min, ("shape", "scale")),
}
FAMILIES = ("auto", *PARAMETRIC, "kde", "empirical")
MIN_SAMPLES = 10
#: Scores a calibration can be made for (`--score`): the paper's, and the BTD+ variants
#: (btd.detect.plus) by their CLI names. A file without a `score` field is `btd`.
SCORES = ("btd", "two-sided", "self-ref")
#: Fields a BTD+ calibration adds; omitted from the JSON of a `btd` one (unchanged format).
PLUS_FIELDS = ("score", "reference", "scanner_references", "min_count")
CHECKPOINT = "checkpoint.pt"  # btd.diffusion.train.CHECKPOINT_NAME (not imported: torch-free)


@dataclass
class Calibration:
    """A fitted benign-score distribution and the threshold it implies."""

    family: str
    params: dict[str, float]
    threshold: float
    target_fpr: float
    n: int
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""
    #: SHA-256 and step of the checkpoint whose scores were fitted (None in files before binding).
    checkpoint_sha256: str | None = None
    checkpoint_step: int | None = None
    #: Which score the threshold is for (SCORES); BTD+ ones carry the benign reference they need:
    #: the sorted benign statistic (pooled) and, per scanner with >= `min_count` samples, its own.
    score: str = "btd"
    reference: list[float] | None = None
    scanner_references: dict[str, list[float]] | None = None
    min_count: int | None = None

    def apply(self, scores) -> np.ndarray:
        """Boolean flags: True = fake (score strictly above the threshold)."""
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (a `btd` calibration has exactly the fields it had before BTD+)."""
        d = asdict(self)
        for key in PLUS_FIELDS:
            if d[key] is None or (key == "score" and d[key] == "btd"):
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "calibration") -> Calibration:
        """Inverse of `to_dict`; BTDInputError naming `source` for missing/unknown/bad fields."""
        required = ("family", "params", "threshold", "target_fpr", "n")
        missing = [k for k in required if k not in d]
        if missing:
            raise BTDInputError(source, f"calibration is missing fields {missing}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise BTDInputError(source, f"unknown calibration fields {unknown}")
        _check_fields(d, source)
        return cls(**d)

    def save(self, path: str | Path, checkpoint: str | Path | None = None) -> Path:
        """Write as JSON atomically, bound to the checkpoint whose scores were fitted.

        `checkpoint` defaults to the `checkpoint.pt` beside `path` (the `calibration_path`
        layout), so every writer, the pipeline stage included, records its hash and step.
        """
        path = Path(path)
        beside = path.with_name(CHECKPOINT)
        if checkpoint is None and beside.is_file():
            checkpoint = beside
        if checkpoint is not None:  # an explicit one must exist (checkpoint_identity says so)
            from btd.diffusion.checkpoint import checkpoint_identity

            ident = checkpoint_identity(checkpoint)
            self.checkpoint_sha256, self.checkpoint_step = ident["sha256"], ident["step"]
        return write_json(path, self.to_dict())

    def check_checkpoint(self, checkpoint: str | Path, source: str | Path) -> None:
        """Refuse a calibration fitted on another checkpoint's scores (e.g. before a resume)."""
        from btd.diffusion.checkpoint import checkpoint_identity

        redo = f"re-run `btd calibrate --checkpoint {checkpoint} --patches <patch folder>`"
        if self.checkpoint_sha256 is None:
            raise BTDInputError(
                source, f"does not record which checkpoint it was made for (an older file); {redo}"
            )
        ident = checkpoint_identity(checkpoint)
        if ident["sha256"] != self.checkpoint_sha256:
            raise BTDInputError(
                source,
                f"made for another checkpoint (step {self.checkpoint_step}, sha256 "
                f"{self.checkpoint_sha256[:12]}), not {Path(checkpoint).name} (step "
                f"{ident['step']}, sha256 {ident['sha256'][:12]}); {redo}",
            )

    def check_score(self, score: str, source: str | Path) -> None:
        """Refuse a calibration made for another score (`--score`): its threshold means nothing."""
        if self.score != score:
            raise BTDInputError(
                source,
                f"made for --score {self.score}, not --score {score}; re-run `btd calibrate "
                f"--score {score}` (or scan with --score {self.score})",
            )

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration JSON written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise BTDInputError(path, "calibration file not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BTDInputError(path, f"not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BTDInputError(path, "calibration JSON must be an object")
        return cls.from_dict(data, source=str(path))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _field_error(d: dict[str, Any], source: str) -> str | None:
    """The first ill-typed or out-of-range calibration field, as a message; None if all are fine."""
    threshold, fpr, n = d["threshold"], d["target_fpr"], d["n"]
    params, sha, step = d["params"], d.get("checkpoint_sha256"), d.get("checkpoint_step")
    checks = [
        (d["family"] in FAMILIES[1:], f"family must be one of {FAMILIES[1:]}, got {d['family']!r}"),
        (_is_number(threshold) and math.isfinite(threshold) and threshold >= 0,
         f"threshold must be a finite number >= 0, got {threshold!r}"),
        (_is_number(fpr) and 0 < fpr < 1, f"target_fpr must be in (0, 1), got {fpr!r}"),
        (isinstance(n, int) and not isinstance(n, bool) and n >= 1,
         f"n must be a positive integer, got {n!r}"),
        (isinstance(params, dict) and all(_is_number(v) for v in params.values()),
         f"params must map names to numbers, got {params!r}"),
        (sha is None or (isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha) is not None),
         f"checkpoint_sha256 must be 64 hex digits, got {sha!r}"),
        (step is None or (isinstance(step, int) and not isinstance(step, bool) and step >= 0),
         f"checkpoint_step must be an integer >= 0, got {step!r}"),
    ]  # fmt: skip
    for key in ("ks_statistic", "ks_pvalue"):
        value = d.get(key)
        checks.append(
            (value is None or _is_number(value), f"{key} must be a number, got {value!r}")
        )
    checks += _plus_checks(d)
    return next((msg for ok, msg in checks if not ok), None)


def _is_reference(value: Any) -> bool:
    """A non-empty sorted list of finite numbers."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(_is_number(v) and math.isfinite(v) for v in value)
        and all(a <= b for a, b in zip(value, value[1:], strict=False))
    )


def _plus_checks(d: dict[str, Any]) -> list[tuple[bool, str]]:
    """(ok, message) checks of the BTD+ fields; a `btd` file must not carry a reference."""
    score, ref = d.get("score", "btd"), d.get("reference")
    per, min_count = d.get("scanner_references"), d.get("min_count")
    plus = score in SCORES[1:]
    return [
        (score in SCORES, f"score must be one of {SCORES}, got {score!r}"),
        (ref is None if not plus else _is_reference(ref),
         f"reference must be a non-empty sorted list of finite numbers for --score {score} "
         f"(and absent for btd), got {type(ref).__name__}"),
        (per is None or (plus and isinstance(per, dict)
                         and all(isinstance(k, str) and _is_reference(v) for k, v in per.items())),
         "scanner_references must map scanner names to sorted lists of finite numbers"),
        (min_count is None or (isinstance(min_count, int) and not isinstance(min_count, bool)
                               and min_count >= 1),
         f"min_count must be a positive integer, got {min_count!r}"),
    ]  # fmt: skip


def _check_fields(d: dict[str, Any], source: str) -> None:
    """BTDInputError naming the field: a calibration file is user-editable input."""
    problem = _field_error(d, source)
    if problem is not None:
        raise BTDInputError(source, problem)


def calibration_path(checkpoint: str | Path, task: str) -> Path:
    """Conventional location: `calibration_<task>.json` beside the checkpoint."""
    return Path(checkpoint).with_name(f"calibration_{task}.json")


def score_calibration_path(checkpoint: str | Path, task: str, score: str = "btd") -> Path:
    """Where `btd calibrate --score` writes: `calibration_path` for btd, else
    `calibration_<task>.<score>.json`, so that a BTD+ calibration never replaces the paper's
    threshold file that the pipeline (and `btd score`) read."""
    if score == "btd":
        return calibration_path(checkpoint, task)
    if score not in SCORES:
        raise BTDConfigError("score", f"unknown {score!r}; use one of {SCORES}")
    return Path(checkpoint).with_name(f"calibration_{task}.{score}.json")


def _check_scores(scores, need_positive: bool) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64).ravel()
    if x.size < MIN_SAMPLES:
        raise BTDInputError("benign_scores", f"need at least {MIN_SAMPLES} scores, got {x.size}")
    if not np.isfinite(x).all():
        raise BTDInputError("benign_scores", "scores contain NaN or infinite values")
    if need_positive and (x <= 0).any():
        raise BTDInputError("benign_scores", "this family needs strictly positive scores")
    return x


def _fit_parametric(name: str, x: np.ndarray) -> tuple[dict[str, float], float, float, float]:
    """MLE fit with location 0 -> (params, AIC, KS statistic, KS p-value)."""
    dist, names = PARAMETRIC[name]
    shape, _, scale = dist.fit(x, floc=0)
    frozen = dist(shape, loc=0, scale=scale)
    loglik = float(np.sum(frozen.logpdf(x)))
    aic = 2 * 2 - 2 * loglik
    ks = stats.kstest(x, frozen.cdf)
    params = dict(zip(names, (float(shape), float(scale)), strict=True))
    return params, aic, float(ks.statistic), float(ks.pvalue)


def _parametric_threshold(name: str, params: dict[str, float], target_fpr: float) -> float:
    dist, names = PARAMETRIC[name]
    return float(dist(params[names[0]], loc=0, scale=params[names[1]]).isf(target_fpr))


def _empirical_threshold(x: np.ndarray, target_fpr: float) -> tuple[float, str]:
    """Order statistic k = ceil((1-fpr)(n+1)): a fresh benign score exceeds it w.p. <= fpr."""
    xs = np.sort(x)
    k = math.ceil((1.0 - target_fpr) * (x.size + 1))
    if k > x.size:
        return float(xs[-1]), (
            f"target FPR {target_fpr} is below the empirical resolution 1/(n+1) = "
            f"{1 / (x.size + 1):.3g}; threshold = max benign score"
        )
    return float(xs[k - 1]), ""


def _kde_threshold(x: np.ndarray, target_fpr: float) -> tuple[dict[str, float], float]:
    """Gaussian KDE on log-scores (Scott bandwidth); invert its CDF by root finding."""
    logs = np.log(x)
    bw = float(np.sqrt(stats.gaussian_kde(logs).covariance[0, 0]))
    bw = bw if bw > 0 else 1e-12

    def survival(y: float) -> float:
        return float(stats.norm.sf((y - logs) / bw).mean()) - target_fpr

    lo, hi = logs.min() - 20 * bw, logs.max() + 20 * bw
    y = optimize.brentq(survival, lo, hi, xtol=1e-12)
    return {"bandwidth_log": bw}, float(np.exp(y))


def fit_threshold(
    benign_scores, target_fpr: float, family: str = "auto", ks_alpha: float = 0.01
) -> Calibration:
    """Fit benign scores and return the threshold whose fitted false-positive rate is target_fpr."""
    if family not in FAMILIES:
        raise BTDConfigError("family", f"unknown {family!r}; use one of {FAMILIES}")
    if not isinstance(target_fpr, int | float) or not 0 < target_fpr < 1:
        raise BTDConfigError("target_fpr", f"must be in (0, 1), got {target_fpr!r}")
    positive_needed = family in PARAMETRIC or family == "kde"
    x = _check_scores(benign_scores, need_positive=positive_needed)
    if family == "empirical" or (family == "auto" and (x <= 0).any()):
        threshold, note = _empirical_threshold(x, target_fpr)
        if family == "auto":
            note = ("non-positive scores: parametric families skipped. " + note).strip()
        return Calibration("empirical", {}, threshold, float(target_fpr), int(x.size), note=note)
    if family == "kde":
        params, threshold = _kde_threshold(x, target_fpr)
        return Calibration("kde", params, threshold, float(target_fpr), int(x.size))
    names = list(PARAMETRIC) if family == "auto" else [family]
    fits, candidates = {}, {}
    for name in names:
        params, aic, ks, ks_p = _fit_parametric(name, x)
        fits[name] = params
        candidates[name] = {"aic": aic, "ks_statistic": ks, "ks_pvalue": ks_p}
    best = min(candidates, key=lambda n: candidates[n]["aic"])
    ks, ks_p = candidates[best]["ks_statistic"], candidates[best]["ks_pvalue"]
    if family == "auto" and ks_p < ks_alpha:
        threshold, note = _empirical_threshold(x, target_fpr)
        note = f"best parametric fit ({best}) rejected by KS (p={ks_p:.3g}); empirical quantile. {note}"
        return Calibration(
            "empirical",
            {},
            threshold,
            float(target_fpr),
            int(x.size),
            ks,
            ks_p,
            candidates,
            note.strip(),
        )
    threshold = _parametric_threshold(best, fits[best], target_fpr)
    return Calibration(
        best, fits[best], threshold, float(target_fpr), int(x.size), ks, ks_p, candidates
    )


def apply(calibration: Calibration, scores) -> np.ndarray:
    """Flags (True = fake) for `scores` under `calibration` (same as `calibration.apply`)."""
    return calibration.apply(scores)


def calibrate_task(
    diffusion,
    x: np.ndarray,
    manifest,
    task: str,
    window: int,
    target_fpr: float,
    family: str = "auto",
    batch_size: int = 64,
) -> Calibration:
    """Fit one task's benign-score distribution (paper section 3.4) on authentic patches.

    inject: real tumours (TM) scored in the `window` at each tumour centre (`py`, `px`); remove: real
    healthy tissue (TB) scored over the whole patch. The one implementation behind the pipeline's
    train_ddpm stage and `btd calibrate`.
    """
    from btd.detect.btd import check_finite_scores, score
    from btd.scenarios import BENIGN_LABEL

    if task not in BENIGN_LABEL:
        raise BTDConfigError("task", f"must be one of {sorted(BENIGN_LABEL)}, got {task!r}")
    benign = BENIGN_LABEL[task]
    rows = (manifest["label"] == benign).to_numpy()
    if not rows.any():
        raise BTDInputError("manifest.csv", f"no {benign} patches to calibrate {task}")
    opts = {}
    if task == "inject":
        opts = {"window": window, "centres": manifest.loc[rows, ["py", "px"]].to_numpy(float)}
    scores, _ = score(
        diffusion, np.asarray(x[rows]), batch_size=min(batch_size, int(rows.sum())), **opts
    )
    check_finite_scores(scores)
    return fit_threshold(scores, target_fpr, family=family)


# ----------------------------------------------------------------------------- BTD+ (--score)


def plus_statistic(
    maps: np.ndarray, score: str, task: str, window: int, centres: np.ndarray | None = None
) -> np.ndarray:
    """The benign-referenced statistic of a BTD+ score from one step's residual maps (B, P, P).

    two-sided: BTD's residual energy (the window at `centres` for inject, the whole patch for
    remove, as the paper); self-ref: log(window / context energy) at `centres` (inject) or the
    patch centre (remove); both from `btd.detect.plus.residual_statistics`, as the pipeline.
    """
    from btd.detect.btd import check_finite_scores
    from btd.detect.plus import residual_statistics

    if score not in SCORES[1:]:
        raise BTDConfigError("score", f"no BTD+ statistic for {score!r}; use one of {SCORES[1:]}")
    if score == "self-ref" and window >= min(np.shape(maps)[1:]):
        raise BTDConfigError(
            "window", f"--score self-ref needs a window smaller than the {min(np.shape(maps)[1:])} px "
            f"patch (the rest of the patch is its reference), got {window}"
        )  # fmt: skip
    energy, ratio = residual_statistics(maps, window, task, centres)
    out = energy if score == "two-sided" else ratio
    check_finite_scores(out)
    return out


def plus_threshold(target_fpr: float) -> float:
    """Threshold on -log10(two-sided tail p): flag p < target_fpr (a fresh benign sample's
    (k + 1) / (n + 1) tail probability is below target_fpr with probability <= target_fpr)."""
    return float(-np.log10(target_fpr))


def fit_plus(
    statistic,
    scanners,
    target_fpr: float,
    score: str,
    min_count: int | None = None,
) -> Calibration:
    """A BTD+ calibration: the sorted benign statistic (pooled, and per scanner where a scanner
    has >= `min_count` samples, btd.detect.plus.MIN_COUNT by default) and the tail threshold."""
    from btd.detect.plus import MIN_COUNT, has_own_reference

    if score not in SCORES[1:]:
        raise BTDConfigError("score", f"must be one of {SCORES[1:]}, got {score!r}")
    if not isinstance(target_fpr, int | float) or not 0 < target_fpr < 1:
        raise BTDConfigError("target_fpr", f"must be in (0, 1), got {target_fpr!r}")
    min_count = MIN_COUNT if min_count is None else int(min_count)
    x = _check_scores(statistic, need_positive=False)
    groups = np.asarray(scanners).astype(str).ravel() if scanners is not None else None
    per, small = {}, []
    if groups is not None:
        if groups.shape != x.shape:
            raise BTDInputError("scanners", "one scanner name per benign score")
        for g in sorted(set(groups.tolist())):
            own = x[groups == g]
            if has_own_reference(own.size, min_count):
                per[g] = sorted(float(v) for v in own)
            else:
                small.append(f"{g} ({own.size})")
    note = f"{score}: flag when the two-sided tail probability under the benign reference is "
    note += f"below {target_fpr:g}"
    if x.size + 1 < 2 / target_fpr:
        note += f"; n = {x.size} resolves tail probabilities only down to {2 / (x.size + 1):.3g}"
    if small:
        note += f"; pooled reference for scanners under {min_count} samples: {', '.join(small)}"
    return Calibration(
        "empirical",
        {},
        plus_threshold(target_fpr),
        float(target_fpr),
        int(x.size),
        note=note,
        score=score,
        reference=sorted(float(v) for v in x),
        scanner_references=per,
        min_count=min_count,
    )


def plus_reference(cal: Calibration, scanner: str | None) -> tuple[np.ndarray, str | None]:
    """The benign reference a scan reads its statistic against: the scanner's own when the
    calibration has one for `scanner` (only scanners with >= min_count samples are stored),
    else the pooled one; also the scanner used (None = pooled)."""
    from btd.detect.plus import has_own_reference

    per = cal.scanner_references or {}
    own = scanner is not None and scanner in per
    if own and has_own_reference(len(per[scanner]), cal.min_count or 1):
        return np.asarray(per[scanner], dtype=np.float64), scanner
    return np.asarray(cal.reference, dtype=np.float64), None


def calibrate_task_plus(
    diffusion,
    x: np.ndarray,
    manifest,
    task: str,
    window: int,
    target_fpr: float,
    score: str,
    batch_size: int = 64,
    min_count: int | None = None,
) -> Calibration:
    """`calibrate_task` for a BTD+ score: the same benign patches (inject: TM at py/px; remove:
    TB), their BTD+ statistic, and the manifest's `scanner` column (if any) for per-scanner
    references."""
    from btd.detect.btd import score as btd_score
    from btd.scenarios import BENIGN_LABEL

    if task not in BENIGN_LABEL:
        raise BTDConfigError("task", f"must be one of {sorted(BENIGN_LABEL)}, got {task!r}")
    benign = BENIGN_LABEL[task]
    rows = (manifest["label"] == benign).to_numpy()
    if not rows.any():
        raise BTDInputError("manifest.csv", f"no {benign} patches to calibrate {task}")
    centres = manifest.loc[rows, ["py", "px"]].to_numpy(float) if task == "inject" else None
    _, maps = btd_score(diffusion, np.asarray(x[rows]), batch_size=min(batch_size, int(rows.sum())))
    stat = plus_statistic(maps, score, task, window, centres)
    scanners = manifest.loc[rows, "scanner"].to_numpy() if "scanner" in manifest else None
    return fit_plus(stat, scanners, target_fpr, score, min_count=min_count)
