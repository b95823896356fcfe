"""Figures shown by the notebooks; each saves a PNG under reports/ and returns the matplotlib figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from btd.atomic import atomic_path  # noqa: E402
from btd.data.records import ScanVolume  # noqa: E402

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
