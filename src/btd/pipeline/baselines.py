"""The baselines stage: fit the paper's eight unsupervised baselines per modality on real patches."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from btd.baselines.base import Baseline
from btd.baselines.registry import make_baseline
from btd.baselines.storage import load_baseline, save_baseline
from btd.data.dataset import load_patch_dataset

#: Display names in the paper's Table 1 order.
DISPLAY = {
    "ae": "AE", "unet_ae": "U-Net AE", "inpaint_ae": "In-Paint AE", "oc_vae": "OC-VAE",
    "splicebuster": "SpliceBuster", "spliceradar": "SpliceRadar", "vit_ae": "Satellite ViT",
    "ood_ddpm": "OOD DDPM",
}  # fmt: skip


def build(name: str, modality: str, ddpm_dir: str | Path, seed: int) -> Baseline:
    """A baseline with its default (CPU-sized) params; OOD-DDPM reuses BTD's trained DDPM."""
    if name == "ood_ddpm":
        return make_baseline(
            name, checkpoint=str(Path(ddpm_dir) / modality / "checkpoint.pt"), seed=seed
        )
    return make_baseline(name, seed=seed)


def fit_all(
    names: list[str], modality: str, processed_dir: str | Path, ddpm_dir: str | Path,
    out_dir: str | Path, seed: int,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:  # fmt: skip
    """Fit every named baseline on train (val for validation); save each; return histories and times."""
    folder = Path(processed_dir) / modality
    train_x, train_m = load_patch_dataset(folder, "train")
    val_x, val_m = load_patch_dataset(folder, "val")
    histories, times = {}, []
    for name in names:
        t0 = time.perf_counter()
        baseline = build(name, modality, ddpm_dir, seed)
        histories[name] = pd.DataFrame(baseline.fit(train_x, val_x, train_m, val_m))
        save_baseline(baseline, Path(out_dir) / modality / f"{name}.pt")
        times.append(
            {"modality": modality, "baseline": name, "fit_seconds": time.perf_counter() - t0}
        )
    return histories, pd.DataFrame(times)


#: History columns that are bookkeeping, not a loss (never drawn on a loss axis, never a metric).
NOT_LOSSES = ("seconds", "wall_s", "lr", "epoch", "step")


def loss_columns(history: pd.DataFrame) -> pd.DataFrame:
    """The loss curves of one history, indexed by its first column (epoch or step)."""
    x = history.columns[0]
    numeric = history.set_index(x).select_dtypes("number")
    return numeric[[c for c in numeric.columns if c not in NOT_LOSSES]]


def final_losses(histories: dict[str, dict[str, pd.DataFrame]]) -> dict[str, dict[str, float]]:
    """DVC metrics of the stage: each baseline's last training/validation losses, per modality."""
    out = {}
    for modality, per_name in histories.items():
        for name, history in per_name.items():
            losses = loss_columns(history) if len(history) else pd.DataFrame()
            if len(losses.columns) and len(losses):
                last = losses.iloc[-1]
                out[f"{modality}/{name}"] = {c: round(float(last[c]), 6) for c in losses.columns}
    return out


def load_all(names: list[str], modality: str, out_dir: str | Path) -> dict[str, Baseline]:
    """The fitted baselines of one modality, keyed by display name."""
    return {DISPLAY.get(n, n): load_baseline(Path(out_dir) / modality / f"{n}.pt") for n in names}
