"""Figures shown by the notebooks; each saves a PNG under reports/ and returns the matplotlib figure.

No backend is forced here: in a notebook (papermill included) matplotlib's inline backend puts every
figure into the executed report; elsewhere matplotlib falls back to Agg by itself.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from btd.atomic import atomic_path
from btd.data.records import ScanVolume

CT_WINDOW = (-1000.0, 400.0)  # lung/mediastinum compromise window for display


def save(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save a figure atomically as PNG (pipeline outputs never half-written)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return Path(path)


def _display_range(scan: ScanVolume) -> tuple[float, float]:
    if scan.modality == "ct":
        return CT_WINDOW
    return float(np.percentile(scan.volume, 0.5)), float(np.percentile(scan.volume, 99.8))


def scanner_examples(scans: list[ScanVolume], path: str | Path) -> plt.Figure:
    """One slice per scanner (the slice through a tumour), tumour circled."""
    by_scanner: dict[str, ScanVolume] = {}
    for s in scans:
        if s.scanner not in by_scanner and s.tumours:
            by_scanner[s.scanner] = s
    n = len(by_scanner)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, (name, scan) in zip(axes[0], sorted(by_scanner.items()), strict=True):
        t = scan.tumours[0]
        z = int(np.clip(round(t.z), 0, scan.volume.shape[0] - 1))
        lo, hi = _display_range(scan)
        ax.imshow(scan.volume[z], cmap="gray", vmin=lo, vmax=hi)
        r = t.diameter_mm / scan.spacing[1] / 2 + 4
        ax.add_patch(plt.Circle((t.x, t.y), r, fill=False, color="tab:red", lw=1))
        ax.set_title(f"{name}\n{t.diameter_mm:.0f} mm {t.kind}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{scans[0].modality.upper()}: one slice per scanner (tumour circled)")
    save(fig, path)
    return fig


def nps_curves(
    nps: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: str | Path
) -> plt.Figure:
    """Radial noise power spectrum per scanner: the forensic fingerprint BTD relies on."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, (f, p) in sorted(nps.items()):
        ax.plot(f, p, label=name)
    ax.set_xlabel("spatial frequency (1/mm)")
    ax.set_ylabel("NPS")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save(fig, path)
    return fig


def patch_gallery(
    patches: np.ndarray, manifest: pd.DataFrame, path: str | Path, n: int = 8, seed: int = 0
) -> plt.Figure:
    """TM patches (top) and TB patches (bottom) from several scanners."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for row, label in enumerate(("TM", "TB")):
        idx = manifest.index[manifest["label"] == label].to_numpy()
        pick = rng.choice(idx, size=min(n, len(idx)), replace=False) if len(idx) else []
        for ax in axes[row]:
            ax.axis("off")
        for ax, i in zip(axes[row], pick, strict=False):
            ax.imshow(patches[i, 0], cmap="gray", vmin=0, vmax=1)
            m = manifest.loc[i]
            ax.set_title(f"{label} {m['scanner']}\n{m['diameter_mm']:.0f} mm", fontsize=7)
    save(fig, path)
    return fig


def sample_counts(manifest: pd.DataFrame, title: str, path: str | Path) -> plt.Figure:
    """Samples per scanner, split and label (the paper's Fig. 2)."""
    counts = manifest.groupby(["scanner", "split", "label"]).size().rename("n").reset_index()
    counts["split/label"] = counts["split"] + " " + counts["label"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.barplot(data=counts, x="scanner", y="n", hue="split/label", ax=ax)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    save(fig, path)
    return fig


def before_after(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | Path):
    """Fig. 3: per scenario a site before and after tampering, the difference (centred on zero, with
    its colour bar: red = brighter after) and the tamper mask."""
    fig, axes = plt.subplots(len(rows), 4, figsize=(9.6, 2.3 * len(rows)), squeeze=False)
    for ax, title in zip(
        axes[0], ("before", "after", "after - before", "tamper mask"), strict=True
    ):
        ax.set_title(title, fontsize=9)
    for row, (name, before, after, mask) in zip(axes, rows, strict=True):
        diff = after - before
        lim = float(np.abs(diff).max()) or 1.0
        row[0].imshow(before, cmap="gray", vmin=0, vmax=1)
        row[1].imshow(after, cmap="gray", vmin=0, vmax=1)
        im = row[2].imshow(diff, cmap="coolwarm", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=row[2], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        row[3].imshow(np.squeeze(mask), cmap="gray", vmin=0, vmax=1)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    save(fig, path)
    return fig


def ddpm_loss(log: pd.DataFrame, title: str, path: str | Path):
    """DDPM training/validation loss and the t = 0 validation loss (the one timestep BTD queries)."""
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    ax[0].plot(log["step"], log["train_loss"], "o-", ms=3, label="train (running mean)")
    ax[0].plot(log["step"], log["val_loss"], "o-", ms=3, label="validation")
    ax[0].set_yscale("log")
    ax[0].set_title(title)
    ax[0].legend(fontsize=8)
    ax[1].plot(log["step"], log["val_loss_t0"], "o-", ms=3, color="tab:green")
    ax[1].set_yscale("log")
    ax[1].set_title("validation loss at t = 0")
    for a in ax:
        a.set_xlabel("training step")
        a.set_ylabel("noise-prediction MSE")
    fig.tight_layout()
    save(fig, path)
    return fig


def shap_residuals(results: dict, n_show: int, path: str | Path):
    """Fig. 5: residuals (magma) and their SHAP attributions (coolwarm, centred), with colour bars,
    one row per (scenario, residual kind)."""
    fig, axes = plt.subplots(
        len(results), 2 * n_show, figsize=(2.3 * 2 * n_show, 2.3 * len(results)), squeeze=False
    )
    for r_idx, (row, ((scenario, kind), r)) in enumerate(zip(axes, results.items(), strict=True)):
        for i in range(n_show):
            a_res, a_shap = row[2 * i], row[2 * i + 1]
            for a in (a_res, a_shap):
                a.set_xticks([])
                a.set_yticks([])
            if i >= len(r["shap"]):
                a_res.axis("off")
                a_shap.axis("off")
                continue
            im = a_res.imshow(r["residuals"][i], cmap="magma")
            fig.colorbar(im, ax=a_res, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
            lim = float(np.abs(r["shap"][i]).max()) or 1.0
            im = a_shap.imshow(r["shap"][i], cmap="coolwarm", vmin=-lim, vmax=lim)
            fig.colorbar(im, ax=a_shap, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
            if r_idx == 0:
                a_res.set_title(f"sample {i + 1}: residual", fontsize=8)
                a_shap.set_title(f"sample {i + 1}: SHAP", fontsize=8)
        row[0].set_ylabel(f"{scenario}\n{kind}", fontsize=8)
    fig.tight_layout()
    save(fig, path)
    return fig


def attack_nps(spectra: pd.DataFrame, path: str | Path) -> plt.Figure:
    """Radially averaged NPS inside and outside the tamper mask, per modality: reals vs each attacker.

    `spectra` is `btd.attacks.traces.spectra`' long table; reals and each attacker's fakes are
    averaged over the modality's scenarios (inject and remove).
    """
    mods = list(dict.fromkeys(spectra["modality"]))
    regions = list(dict.fromkeys(spectra["region"]))
    attackers = list(dict.fromkeys(spectra.loc[spectra["group"] == "fake", "attacker"]))
    colour = dict(zip(attackers, sns.color_palette("tab10", len(attackers)), strict=True))
    fig, axes = plt.subplots(len(mods), len(regions), figsize=(5 * len(regions), 3.4 * len(mods)),
                             squeeze=False, sharex=True)  # fmt: skip
    for r, mod in enumerate(mods):
        for c, region in enumerate(regions):
            ax, d = (
                axes[r, c],
                spectra[(spectra["modality"] == mod) & (spectra["region"] == region)],
            )
            real = d[d["group"] == "real"].groupby("freq")["nps"].mean()
            ax.plot(real.index, real.values, color="black", lw=2.2, label="real")
            for attacker, g in d[d["group"] == "fake"].groupby("attacker", sort=False):
                curve = g.groupby("freq")["nps"].mean()
                paste = attacker.endswith("-Paste")  # same pixels as its attacker inside the mask
                label = f"{attacker} fakes" + (
                    " (dashed; = its attacker inside the mask)" if paste else ""
                )
                ax.plot(curve.index, curve.values, marker=".", color=colour[attacker],
                        ls="--" if paste else "-", label=label)  # fmt: skip
            ax.set_yscale("log")
            ax.set_title(f"{mod.upper()} · {region}")
            ax.set_xlabel("spatial frequency (cycles / pixel)")
            ax.set_ylabel("NPS (intensity² · pixel)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
    return fig


def guidance_study(
    study: pd.DataFrame, chosen: tuple[dict, dict], target: float, path: str | Path
) -> plt.Figure:
    """Attack success against the guidance scale on the attacker's own patients, one panel per
    modality and attack, one colour per negative mode (solid: decoded, dashed: pasted back); the
    target line and the chosen setting marked."""
    scales, modes = chosen
    keys = list(dict.fromkeys(zip(study["modality"], study["attack"], strict=True)))
    negatives = list(dict.fromkeys(study["negative"]))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3.0), squeeze=False,
                             sharey=True)  # fmt: skip
    for ax, (mod, attack) in zip(axes[0], keys, strict=True):
        for i, neg in enumerate(negatives):
            d = study[(study["modality"] == mod) & (study["attack"] == attack)
                      & (study["negative"] == neg)]  # fmt: skip
            ax.plot(d["guidance"], d["success"], marker="o", color=f"C{i}",
                    label=f"decoded, negative {neg}")  # fmt: skip
            ax.plot(d["guidance"], d["paste_success"], marker="s", ls="--", color=f"C{i}",
                    alpha=0.6, label=f"pasted back, negative {neg}")  # fmt: skip
        ax.axhline(target, color="grey", lw=1, ls=":", label=f"target {target:g}")
        ax.axvline(scales[mod][attack], color="red", lw=1, label="chosen")
        ax.set_title(f"{mod.upper()} · {attack}\nchosen {scales[mod][attack]:g}, "
                     f"negative {modes[mod][attack]}", fontsize=9)  # fmt: skip
        ax.set_xlabel("guidance scale")
        ax.set_ylim(-0.02, 1.02)
    axes[0, 0].set_ylabel("attack success (val sites)")
    axes[0, -1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    save(fig, path)
    return fig


def validation_auc(val_auc: pd.DataFrame, chosen: str, path: str | Path) -> plt.Figure:
    """AUC of BTD, the control and every BTD+ variant on the validation fakes (the choice's data),
    the chosen variant's name in the title."""
    fig, ax = plt.subplots(figsize=(11, 4.2))
    sns.barplot(data=val_auc, x="scenario", y="auc", hue="method", ax=ax)
    ax.axhline(0.5, color="grey", lw=1, ls=":")
    ax.set_ylim(0, 1)
    ax.set_xlabel("validation set (attacker's patients)")
    ax.set_ylabel("AUC")
    ax.set_title(f"Validation fakes: BTD+ default = {chosen}")
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")  # long scenario names
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save(fig, path)
    return fig


def score_distributions(
    scores: pd.DataFrame, methods: list[str], scenarios: list[str], path: str | Path
) -> plt.Figure:
    """Real vs fake score per test set, one row per method (log scale where scores are positive)."""
    fig, axes = plt.subplots(len(methods), 1, figsize=(1.3 * len(scenarios) + 2, 2.6 * len(methods)),
                             squeeze=False, sharex=True)  # fmt: skip
    for ax, method in zip(axes[:, 0], methods, strict=True):
        d = scores[(scores["method"] == method) & scores["scenario"].isin(scenarios)]
        d = d.assign(sample=np.where(d["fake"] == 1, "fake", "real"))
        sns.boxplot(data=d, x="scenario", y="score", hue="sample", order=scenarios,
                    hue_order=["real", "fake"], fliersize=2, ax=ax)  # fmt: skip
        if (d["score"] > 0).all():
            ax.set_yscale("log")
        ax.set_ylabel(f"{method}\nscore")
        ax.set_xlabel("")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    save(fig, path)
    return fig
