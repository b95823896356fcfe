"""The six deepfake test sets: build, write (atomically), load (checked), and judge the attacks.

A test set folder `data/deepfakes/<scenario>/` holds `images.npy` (N, 1, P, P) float32 in [0, 1],
`masks.npy` (N, P, P) uint8 tamper masks (all zero for real samples) and `meta.csv` (columns
`META_COLUMNS`). Injection scenarios hold TM (real) and FM (fake) samples; removal ones TB and FB.
Reals come from holdout patients only; attackers never see them.

Besides the detector's evaluation, the issue asks whether the attacks *work*: a tumour classifier
trained only on real TM vs TB patches should call injected fakes malign and removed fakes benign
(`attack_success`), and the tampered region's intensity and noise should resemble real tissue
(`realism_stats`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from btd.atomic import default_mode
from btd.errors import BTDConfigError, BTDInputError
from btd.scenarios import ATTACKS, BENIGN_LABEL, FAKE_LABEL, attack_of

VALIDATION_DIR = "validation"  # sub-folder of the test-set folder: fakes on validation patients

META_COLUMNS = [
    "sample_id", "scenario", "attack", "label", "fake", "patient", "scanner",
    "slice", "cy", "cx", "py", "px", "diameter_mm",
]  # fmt: skip
SITE_COLUMNS = ["patient", "scanner", "slice", "cy", "cx", "py", "px", "diameter_mm"]
#: attack -> (label of real samples, label of fake samples), from the one vocabulary
LABELS = {a: (BENIGN_LABEL[a], FAKE_LABEL[a]) for a in ATTACKS}


# ----------------------------------------------------------------------------- patient splits


def check_disjoint(train_patients: Iterable[str], holdout_patients: Iterable[str]) -> None:
    """Attackers and detectors train on train/val; test images come from holdout: never overlap."""
    overlap = sorted(set(map(str, train_patients)) & set(map(str, holdout_patients)))
    if overlap:
        shown = ", ".join(overlap[:5]) + (" ..." if len(overlap) > 5 else "")
        raise BTDInputError(
            "patient splits", f"{len(overlap)} patient(s) in both training and holdout: {shown}"
        )


def sample_sites(
    manifest: pd.DataFrame, label: str, n: int | None, seed: int, split: str = "holdout"
) -> pd.DataFrame:
    """Up to `n` rows of one label from one split, drawn without replacement, in manifest order."""
    rows = manifest[(manifest["label"] == label) & (manifest["split"] == split)]
    if rows.empty:
        raise BTDInputError("patch manifest", f"no {label} patches in the {split} split")
    if n is not None and n < len(rows):
        rng = np.random.default_rng(seed)
        rows = rows.iloc[np.sort(rng.choice(len(rows), size=n, replace=False))]
    return rows


# -------------------------------------------------------------------------------- build & check


def _check_images(images: np.ndarray, source: str) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 1 or arr.shape[2] != arr.shape[3]:
        raise BTDInputError(source, f"images must be (N, 1, P, P), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise BTDInputError(source, "images contain NaN or inf")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise BTDInputError(source, f"images outside [0, 1] ({arr.min():.3g}..{arr.max():.3g})")
    return arr.astype(np.float32, copy=False)


def build_testset(
    scenario: str,
    reals: tuple[np.ndarray, pd.DataFrame],
    fakes: tuple[np.ndarray, np.ndarray, pd.DataFrame],
    split: str = "holdout",
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Stack real (holdout) and fake samples of one scenario into (images, masks, meta).

    `reals` = (patches, manifest rows): TM rows for injection, TB rows for removal, holdout split.
    `fakes` = (patches, tamper masks, metadata with `SITE_COLUMNS` [and `split`]). Every sample
    must come from `split`: "holdout" for a test set, "val" for the validation fakes choices are
    made on.
    """
    attack = attack_of(scenario)
    real_label, fake_label = LABELS[attack]
    r_img, r_rows = _check_images(reals[0], f"{scenario} reals"), reals[1]
    f_img, f_mask, f_rows = _check_images(fakes[0], f"{scenario} fakes"), fakes[1], fakes[2]
    if len(r_img) != len(r_rows) or len(f_img) != len(f_rows) or len(f_mask) != len(f_img):
        raise BTDInputError(scenario, "image, mask and metadata counts differ")
    if r_img.shape[1:] != f_img.shape[1:] and len(r_img) and len(f_img):
        raise BTDInputError(scenario, f"real {r_img.shape[1:]} vs fake {f_img.shape[1:]} patches")
    if (r_rows["label"] != real_label).any():
        raise BTDInputError(
            scenario, f"real samples of a {attack} scenario must all be {real_label}"
        )
    for name, rows in (("real", r_rows), ("fake", f_rows)):
        if "split" in rows and (rows["split"] != split).any():
            raise BTDInputError(scenario, f"{name} samples must come from {split} patients only")
        missing = [c for c in SITE_COLUMNS if c not in rows]
        if missing:
            raise BTDInputError(scenario, f"{name} metadata lacks columns {missing}")
    p = (r_img if len(r_img) else f_img).shape[-1]
    images = np.concatenate([r_img.reshape(-1, 1, p, p), f_img.reshape(-1, 1, p, p)])
    masks = np.concatenate(
        [np.zeros((len(r_img), p, p), np.uint8), (np.asarray(f_mask) > 0).astype(np.uint8)]
    )
    sites = pd.concat([r_rows[SITE_COLUMNS], f_rows[SITE_COLUMNS]], ignore_index=True)
    meta = pd.DataFrame(
        {
            "sample_id": [f"{scenario}:{i:05d}" for i in range(len(images))],
            "scenario": scenario,
            "attack": attack,
            "label": [real_label] * len(r_img) + [fake_label] * len(f_img),
            "fake": [0] * len(r_img) + [1] * len(f_img),
        }
    )
    meta = pd.concat([meta, sites], axis=1)[META_COLUMNS]
    validate_testset(images, masks, meta, scenario)
    return images, masks, meta


def validate_testset(
    images: np.ndarray, masks: np.ndarray, meta: pd.DataFrame, source: str | Path
) -> None:
    """Every consistency rule of the test-set contract, as one readable BTDInputError."""
    images = _check_images(images, f"{source}/images.npy")
    n, p = len(images), images.shape[-1]
    if masks.shape != (n, p, p) or masks.dtype != np.uint8 or not np.isin(masks, (0, 1)).all():
        raise BTDInputError(
            f"{source}/masks.npy",
            f"need ({n}, {p}, {p}) uint8 0/1, got {masks.shape} {masks.dtype}",
        )
    missing = [c for c in META_COLUMNS if c not in meta]
    if missing:
        raise BTDInputError(f"{source}/meta.csv", f"missing columns {missing}")
    if len(meta) != n:
        raise BTDInputError(f"{source}/meta.csv", f"{len(meta)} rows for {n} images")
    if meta["sample_id"].duplicated().any():
        raise BTDInputError(f"{source}/meta.csv", "duplicate sample_id")
    if meta["scenario"].nunique() > 1:
        raise BTDInputError(f"{source}/meta.csv", "more than one scenario in one test set")
    for attack, (real, fake) in LABELS.items():
        rows = meta["attack"] == attack
        expect = np.where(meta.loc[rows, "fake"].to_numpy() == 1, fake, real)
        if (meta.loc[rows, "label"].to_numpy() != expect).any():
            raise BTDInputError(
                f"{source}/meta.csv", f"{attack}: labels must be {real} (fake=0) / {fake} (fake=1)"
            )
    if not meta["attack"].isin(LABELS).all() or not meta["fake"].isin((0, 1)).all():
        raise BTDInputError(f"{source}/meta.csv", "attack must be inject|remove and fake 0|1")
    if len(meta) and attack_of(str(meta["scenario"].iloc[0])) != meta["attack"].iloc[0]:
        raise BTDInputError(f"{source}/meta.csv", "attack column disagrees with the scenario name")
    area = masks.reshape(n, -1).sum(axis=1)
    fake = meta["fake"].to_numpy() == 1
    if (area[~fake] > 0).any():
        raise BTDInputError(f"{source}/masks.npy", "real samples must have empty masks")
    if (area[fake] == 0).any():
        raise BTDInputError(
            f"{source}/masks.npy", f"{int((area[fake] == 0).sum())} fake(s) with an empty mask"
        )


def write_testset(
    folder: str | Path, images: np.ndarray, masks: np.ndarray, meta: pd.DataFrame
) -> Path:
    """Write the three files into a temporary sibling folder, then swap it in (never half-written)."""
    folder = Path(folder)
    validate_testset(images, masks, meta, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    os.chmod(tmp, default_mode(directory=True))
    old = None
    try:
        np.save(tmp / "images.npy", np.asarray(images, dtype=np.float32))
        np.save(tmp / "masks.npy", np.asarray(masks, dtype=np.uint8))
        meta[META_COLUMNS].to_csv(tmp / "meta.csv", index=False)
        if folder.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent)
            )
            os.replace(folder, old / "set")
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_testset(folder: str | Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(images, masks, meta) of one scenario folder, checked against the contract."""
    folder = Path(folder)
    files = {name: folder / name for name in ("images.npy", "masks.npy", "meta.csv")}
    for path in files.values():
        if not path.is_file():
            raise BTDInputError(
                path, "missing; run the deepfakes stage (dvc repro deepfakes) first"
            )
    try:
        images = np.load(files["images.npy"])
        masks = np.load(files["masks.npy"])
    except ValueError as exc:
        raise BTDInputError(folder, f"not a readable .npy pair ({exc})") from None
    try:
        meta = pd.read_csv(files["meta.csv"], dtype={"sample_id": str, "patient": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BTDInputError(files["meta.csv"], f"not a readable CSV ({exc})") from None
    validate_testset(images, masks, meta, folder)
    return images.astype(np.float32, copy=False), masks, meta


# ------------------------------------------------------------------------- attack success check


class _SmallCNN(nn.Module):
    """Four conv stages, then a 3x3 adaptive pool and a linear head: any patch size, and the head
    knows *where* features are (a tumour is the thing at the centre, not anywhere). GroupNorm, not
    BatchNorm: no running statistics, so short trainings behave the same in eval mode."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GroupNorm(4, w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(4, 2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GroupNorm(4, 4 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.GroupNorm(4, 4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(3),
        )  # fmt: skip
        self.head = nn.Linear(36 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).squeeze(1)


class TumourClassifier:
    """Real TM (1) vs TB (0) classifier of one modality: the judge of attack success.

    Trained on real train-split patches only; its validation accuracy says how far to trust it.
    It looks at the central `crop_fraction` of each patch (the site is at the centre): whole-patch
    pooling would let tumour-like anatomy elsewhere in a healthy patch (vessels, chest wall) vote.
    """

    def __init__(self, width: int = 16, crop_fraction: float = 0.5, seed: int = 0):
        if not 0 < crop_fraction <= 1:
            raise BTDConfigError("crop_fraction", f"must be in (0, 1], got {crop_fraction}")
        self.seed, self.crop_fraction = seed, crop_fraction
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = _SmallCNN(width)
        self.val_accuracy: float | None = None

    def fit(
        self,
        patches: np.ndarray,
        labels: Sequence[Any],
        val: tuple[np.ndarray, Sequence[Any]] | None = None,
        epochs: int = 20,
        batch_size: int = 64,
        lr: float = 2e-3,
    ) -> dict[str, list[float]]:
        """Seeded Adam + class-balanced BCE with flips/rotations; returns per-epoch train loss (and
        balanced val accuracy, the mean of the per-class recalls)."""
        x = torch.from_numpy(self._centre(_check_images(patches, "classifier patches")))
        y = torch.tensor(_binary_labels(labels, len(x)), dtype=torch.float32)
        if len(np.unique(y.numpy())) < 2:
            raise BTDInputError("classifier labels", "need both TM and TB training patches")
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        steps = epochs * int(np.ceil(len(x) / batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))  # stable end
        # healthy sites outnumber tumours several-fold: weight the rare class up (balanced BCE)
        pos_weight = (y == 0).sum() / (y == 1).sum()
        hist: dict[str, list[float]] = {"loss": [], "val_accuracy": []}
        for _ in tqdm(range(epochs), desc="tumour classifier", mininterval=5):
            self.net.train()
            order, losses = torch.randperm(len(x), generator=gen), []
            for a in range(0, len(x), batch_size):
                idx = order[a : a + batch_size]
                xb = torch.rot90(x[idx], int(torch.randint(4, (1,), generator=gen)), dims=(2, 3))
                if torch.rand(1, generator=gen) < 0.5:
                    xb = xb.flip(3)
                loss = F.binary_cross_entropy_with_logits(
                    self.net(xb), y[idx], pos_weight=pos_weight
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            hist["loss"].append(float(np.mean(losses)))
            if val is not None:
                hist["val_accuracy"].append(self.accuracy(*val))
        if val is not None:
            self.val_accuracy = hist["val_accuracy"][-1]
        return hist

    @torch.no_grad()
    def predict_proba(self, patches: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """P(malign) per patch."""
        x = self._centre(_check_images(patches, "classifier input"))
        self.net.eval()
        out = [
            torch.sigmoid(self.net(torch.from_numpy(x[a : a + batch_size])))
            for a in range(0, len(x), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def _centre(self, x: np.ndarray) -> np.ndarray:
        """The central crop the classifier sees (>= 8 px)."""
        p = x.shape[-1]
        c = min(p, max(8, int(round(p * self.crop_fraction))))
        a = (p - c) // 2
        return np.ascontiguousarray(x[..., a : a + c, a : a + c])

    def accuracy(self, patches: np.ndarray, labels: Sequence[Any]) -> float:
        """Balanced accuracy (mean recall of TM and TB), robust to the TB/TM imbalance."""
        y = _binary_labels(labels, len(patches))
        hit = (self.predict_proba(patches) >= 0.5) == (y == 1)
        return float(np.mean([hit[y == c].mean() for c in (0, 1) if (y == c).any()]))


def _binary_labels(labels: Sequence[Any], n: int) -> np.ndarray:
    """TM/FM/1 -> 1, TB/FB/0 -> 0."""
    lookup = {"TM": 1, "FM": 1, "TB": 0, "FB": 0, 1: 1, 0: 0}
    labels = list(labels)
    if len(labels) != n:
        raise BTDInputError("labels", f"{len(labels)} labels for {n} patches")
    try:
        return np.array([lookup[lab if isinstance(lab, str) else int(lab)] for lab in labels])
    except KeyError as exc:
        raise BTDInputError(
            "labels", f"unknown label {exc.args[0]!r} (use TM/TB/FM/FB or 1/0)"
        ) from None


def attack_success(classifier: Any, fakes: np.ndarray, attack: str) -> float:
    """Fraction of fakes the real-data classifier labels as intended (inject -> malign, remove -> benign).

    `classifier` is anything with `predict_proba(patches) -> P(malign)`.
    """
    if attack not in LABELS:
        raise BTDConfigError("attack", f"must be 'inject' or 'remove', got {attack!r}")
    if len(fakes) == 0:
        raise BTDInputError("attack_success", "no fake samples")
    malign = np.asarray(classifier.predict_proba(fakes)) >= 0.5
    return float(np.mean(malign if attack == "inject" else ~malign))


# ------------------------------------------------------------------------------------- realism


def highpass_residual(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Image minus its Gaussian blur (per image): what is left is mostly the scanner's noise."""
    imgs = np.asarray(images, dtype=np.float64).reshape(len(images), *np.shape(images)[-2:])
    return np.stack([im - ndimage.gaussian_filter(im, sigma, mode="reflect") for im in imgs])


def reference_regions(meta: pd.DataFrame, masks: np.ndarray) -> np.ndarray:
    """Regions to measure: each fake's mask; for reals a square of the median fake-mask area at the site."""
    n, p = masks.shape[0], masks.shape[-1]
    fake = meta["fake"].to_numpy() == 1
    areas = masks[fake].reshape(int(fake.sum()), -1).sum(axis=1)
    if not len(areas):
        raise BTDInputError("realism_stats", "no fake samples to take the region size from")
    side = max(1, int(round(np.sqrt(np.median(areas)))))
    regions = masks.astype(bool).copy()
    for i in np.flatnonzero(~fake):
        cy, cx = int(meta["py"].iloc[i]), int(meta["px"].iloc[i])
        y0, x0 = max(cy - side // 2, 0), max(cx - side // 2, 0)
        regions[i, y0 : min(y0 + side, p), x0 : min(x0 + side, p)] = True
    return regions.reshape(n, p, p)


def realism_per_sample(
    images: np.ndarray, masks: np.ndarray, meta: pd.DataFrame, sigma: float = 1.0
) -> pd.DataFrame:
    """Per sample: mean intensity and high-pass noise std inside vs outside the (reference) region.

    Noise is measured away from the region's border (eroded core vs. outside a band), so the edge
    contrast of an in-painted object does not pass for noise.
    """
    regions = reference_regions(meta, np.asarray(masks))
    imgs = np.asarray(images, dtype=np.float64).reshape(regions.shape)
    resid = highpass_residual(imgs, sigma)
    band = int(np.ceil(2 * sigma))  # the blur mixes edge contrast this far: keep noise clear of it
    rows = []
    for img, res, reg in zip(imgs, resid, regions, strict=True):
        out = ~reg
        core = ndimage.binary_erosion(reg, iterations=band)
        core = core if core.any() else reg
        far = ~ndimage.binary_dilation(reg, iterations=band)
        far = far if far.any() else out
        rows.append(
            {
                "mean_in": img[reg].mean(),
                "mean_out": img[out].mean() if out.any() else np.nan,
                "noise_in": res[core].std(),
                "noise_out": res[far].std() if far.any() else np.nan,
            }
        )
    df = pd.DataFrame(rows)
    df["noise_ratio"] = df["noise_in"] / df["noise_out"].replace(0, np.nan)
    df.insert(0, "fake", meta["fake"].to_numpy())
    return df


def realism_stats(
    images: np.ndarray, masks: np.ndarray, meta: pd.DataFrame, sigma: float = 1.0
) -> pd.DataFrame:
    """Real vs fake averages of `realism_per_sample` (index 'real'/'fake', plus a count column n).

    A convincing fake has noise_ratio (inside / outside noise std) near the reals' value (~1); a
    too-smooth in-painting shows noise_ratio << 1.
    """
    df = realism_per_sample(images, masks, meta, sigma)
    df["group"] = np.where(df.pop("fake") == 1, "fake", "real")
    stats = df.groupby("group").mean()
    stats["n"] = df.groupby("group").size()
    return stats
