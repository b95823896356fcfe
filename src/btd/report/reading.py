"""Each notebook's "Reading", written from the numbers the notebook has just computed.

A fixed paragraph goes stale the moment a parameter changes; these functions turn the notebook's
tables into a few Markdown sentences (shown with IPython's `Markdown`), so the reading always says
what this run found, good or bad.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from btd.scenarios import CONTROL, CONTROL_TWO_SIDED, PAPER_SCENARIOS

SUCCESS_FLOOR = 0.8  # an attack that fools the tumour classifier less often than this is weak


def _fmt(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.2f}"


def train_ddpm(log: pd.DataFrame, calibrations: dict, modality: str) -> str:
    """Did the validation loss (and the t = 0 loss BTD uses) fall, and what thresholds came out."""
    first, last = log.iloc[0], log.iloc[-1]
    trend = lambda a, b: "fell" if b < a else "did not fall"  # noqa: E731
    cal = "; ".join(
        f"{task}: {c.family} fit, threshold {c.threshold:.3g} for FPR {c.target_fpr:.2f} "
        f"(n = {c.n} validation patches)"
        for task, c in calibrations.items()
    )
    return (
        f"**{modality.upper()}.** Over steps {int(first['step'])}–{int(last['step'])} the validation "
        f"loss {trend(first['val_loss'], last['val_loss'])} ({first['val_loss']:.4f} → "
        f"{last['val_loss']:.4f}) and the t = 0 validation loss {trend(first['val_loss_t0'], last['val_loss_t0'])} "
        f"({first['val_loss_t0']:.3f} → {last['val_loss_t0']:.3f}). Calibration — {cal}."
    )


def deepfakes(success: dict[str, float], realism: pd.DataFrame) -> str:
    """Attack success per scenario (flagging weak attacks) and the noise ratio inside the mask."""
    weak = {k: v for k, v in success.items() if v < SUCCESS_FLOOR}
    parts = [
        "Attack success (tumour classifier fooled): "
        + ", ".join(f"{k} {v:.2f}" for k, v in success.items())
        + "."
    ]
    if weak:
        parts.append(
            f"Below {SUCCESS_FLOOR:.1f}: {', '.join(weak)} — these fakes do not yet look like what "
            "they claim to be, so a detector's AUC on them says less."
        )
        if {"mean_in", "scenario"} <= set(realism.columns):
            means = []
            for name in weak:
                r = realism[realism["scenario"] == name]
                if {"real", "fake"} <= set(r.index):
                    means.append(f"{name} {r.loc['fake', 'mean_in']:.3f} vs "
                                 f"{r.loc['real', 'mean_in']:.3f}")  # fmt: skip
            if means:
                parts.append(
                    "Mean intensity in the tamper region, fakes vs reals of the class they claim: "
                    + "; ".join(means)
                    + "."
                )
    else:
        parts.append(f"Every attack fools the classifier at least {SUCCESS_FLOOR:.0%} of the time.")
    if {"noise_in", "noise_out", "scenario"} <= set(realism.columns):
        ratio = (realism["noise_in"] / realism["noise_out"]).rename("ratio")
        table = pd.concat([realism["scenario"], ratio], axis=1).reset_index()
        lines = []
        for scenario, g in table.groupby("scenario", sort=False):
            r = g.set_index(g.columns[0])["ratio"]
            if {"real", "fake"} <= set(r.index):
                lines.append(f"{scenario} {r['fake']:.2f}× (reals {r['real']:.2f}×)")
        parts.append(
            "Noise inside the tamper region relative to its surroundings: " + "; ".join(lines) + "."
        )
    return " ".join(parts)


def guidance(study: pd.DataFrame, chosen: tuple[dict, dict], target: float) -> str:
    """The guidance setting each LDM attack uses (scale, negative mode), and whether it reached
    the target on validation sites."""
    scales, modes = chosen
    lines = []
    for mod, attacks in scales.items():
        for attack, g in attacks.items():
            neg = modes[mod][attack]
            row = study[(study["modality"] == mod) & (study["attack"] == attack)
                        & (study["guidance"] == g) & (study["negative"] == neg)].iloc[0]  # fmt: skip
            setting = f"{mod.upper()} {attack} {g:g}, negative {neg}"
            if not row["n"]:
                lines.append(f"{setting} (no validation site to try on)")
                continue
            # judged as choose_guidance judges: on the lower confidence bound when the study has one
            bound = row.get("success_lower", np.nan)
            judged = row["success"] if pd.isna(bound) else bound
            verdict = "reaches" if judged >= target else "misses"
            told = "" if pd.isna(bound) else f", lower bound {bound:.2f}"
            lines.append(f"{setting} ({row['success']:.2f} on {int(row['n'])} val sites{told}, "
                         f"{verdict} {target:.2f})")  # fmt: skip
    return "Guidance chosen on the attacker's own patients: " + "; ".join(lines) + "."


def validation_choice(val_auc: pd.DataFrame, chosen: str) -> str:
    """Mean validation AUC per method over the paper's LDM sets, and the BTD+ variant chosen."""
    paper = val_auc[val_auc["scenario"].isin(PAPER_SCENARIOS)]
    means = paper.groupby("method")["auc"].mean().sort_values(ascending=False)
    listed = ", ".join(f"{m} {a:.2f}" for m, a in means.items())
    control = CONTROL_TWO_SIDED if CONTROL_TWO_SIDED in means.index else CONTROL
    verdict = "above" if means[chosen] > means.get(control, float("nan")) else "not above"
    return (
        f"Mean AUC on the validation fakes ({paper['scenario'].nunique()} LDM sets): {listed}. "
        f"BTD+'s default is **{chosen}**, {verdict} the no-learning {control} on validation."
    )


def evaluate(best: pd.DataFrame, calibration: pd.DataFrame) -> str:
    """Where BTD beats the no-learning control and the best baseline, and whether calibration holds."""
    lines = []
    beats = best[best["BTD_auc_lo"] > best["control_auc"]]["scenario"].tolist()
    below = best[best["BTD_auc_hi"] < best["control_auc"]]["scenario"].tolist()
    lines.append(
        f"BTD's AUC interval lies above the {CONTROL} on {len(beats)} of {len(best)} scenarios"
        + (f" ({', '.join(beats)})" if beats else "")
        + (f", and below it on {', '.join(below)}" if below else "")
        + "."
    )
    wins = best[best["BTD_auc"] > best["best_baseline_auc"]]["scenario"].tolist()
    lines.append(
        f"BTD has the highest mean AUC of all methods on {len(wins)} of {len(best)} scenarios"
        + (f" ({', '.join(wins)})" if wins else "")
        + f"; mean over scenarios BTD {best['BTD_auc'].mean():.2f}, control "
        f"{best['control_auc'].mean():.2f}, best baseline per scenario "
        f"{best['best_baseline_auc'].mean():.2f}."
    )
    if len(calibration):
        held = calibration[calibration["holds"]]["scenario"].tolist()
        missed = calibration[~calibration["holds"]]
        target = calibration["target_fpr"].iloc[0]
        text = (
            f"Calibration (target FPR {target:.2f}): the validation threshold's test FPR lies in the "
            f"95 % binomial interval on {len(held)} of {len(calibration)} test sets"
        )
        if len(missed):
            text += "; it misses on " + ", ".join(
                f"{r.scenario} (FPR {r.test_fpr:.2f}, interval {r.fpr_lo:.2f}–{r.fpr_hi:.2f})"
                for r in missed.itertuples()
            )
        lines.append(text + ".")
    return " ".join(lines)


def ablations(t3: pd.DataFrame, f6: pd.DataFrame) -> str:
    """Is one backward step best, and does adding forward noise (F&B) hurt, as the paper finds?"""
    best_d = f6.loc[f6.groupby("scenario")["auc"].idxmax()]
    d1 = t3[(t3["method"] == "B") & (t3["steps"] == 1)].set_index("scenario")["auc"]
    fb = t3[t3["method"] == "F&B"].groupby("scenario")["auc"].max()
    b_beats = [s for s in d1.index if s in fb.index and d1[s] > fb[s]]
    return (
        f"d = 1 is the best number of backward steps on {(best_d['steps'] == 1).sum()} of "
        f"{len(best_d)} scenarios (the paper: all). One backward step beats the best F&B setting on "
        f"{len(b_beats)} of {len(d1)} scenarios"
        + (f" ({', '.join(b_beats)})" if b_beats else "")
        + ". Both are measured on the same random subsample of each test set."
    )


def explain(table: pd.DataFrame, fb_label: str) -> str:
    """Is BTD's residual more focused (lower spatial entropy of its SHAP map) than F&B's?"""
    parts = []
    for scenario, g in table.groupby("scenario", sort=False):
        t = g.set_index("residual")
        if "BTD" in t.index and fb_label in t.index:
            b, f = t.loc["BTD", "spatial_entropy"], t.loc[fb_label, "spatial_entropy"]
            verdict = "more focused" if b < f else "not more focused"
            parts.append(f"{scenario}: BTD {b:.2f} vs {fb_label} {f:.2f} — BTD {verdict}")
    return "Spatial entropy of the SHAP maps (lower = more focused): " + "; ".join(parts) + "."


def preprocess(manifests: dict[str, pd.DataFrame]) -> str:
    """Cohort sizes, and the two properties downstream stages rely on: patient-disjoint splits and
    every scanner in every split (else Table 2 has holes)."""
    parts = []
    for modality, m in manifests.items():
        disjoint = bool((m.groupby("patient")["split"].nunique() == 1).all())
        per_split = m.groupby("split")["scanner"].nunique()
        n_scanners = m["scanner"].nunique()
        missing = [s for s, k in per_split.items() if k < n_scanners]
        labels = m["label"].value_counts()
        parts.append(
            f"**{modality.upper()}**: {m['patient'].nunique()} patients, {len(m)} patches "
            f"({int(labels.get('TM', 0))} TM, {int(labels.get('TB', 0))} TB); splits are "
            f"{'patient-disjoint' if disjoint else 'NOT patient-disjoint'}; "
            + (
                f"all {n_scanners} scanners appear in every split."
                if not missing
                else f"scanners missing from split(s) {', '.join(missing)}."
            )
        )
    return " ".join(parts)


def traces(ratios: pd.DataFrame, tolerance: float = 0.15) -> str:
    """Which scenarios change the high-pass energy outside the mask (the autoencoder's round trip)."""
    out_col, in_col = "highpass ratio outside mask", "highpass ratio inside mask"
    off = ratios[(ratios[out_col] - 1).abs() > tolerance]
    same = ratios.drop(off.index)
    parts = [
        "High-pass energy of fakes / reals outside the tamper mask: "
        + ", ".join(f"{s} {r:.2f}" for s, r in ratios[out_col].items())
        + "."
    ]
    if len(off):
        parts.append(
            f"{len(off)} scenario(s) change the pixels outside the mask by more than "
            f"{tolerance:.0%} ({', '.join(off.index)}): a trace a detector can see anywhere in the patch."
        )
    if len(same):
        parts.append(
            f"Within {tolerance:.0%} of the reals outside the mask: {', '.join(same.index)}."
        )
    parts.append(
        "Inside the mask: " + ", ".join(f"{s} {r:.2f}" for s, r in ratios[in_col].items()) + "."
    )
    return " ".join(parts)
