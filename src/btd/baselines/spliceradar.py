"""SpliceRadar (Ghosh, Zhong, Boult & Singh, CVPR-W 2019): learned noise fingerprint + GMM.

No public code exists; this follows the paper's description (and BTD's summary of it):
1. a small CNN whose first layer is a constrained high-pass convolution (Bayar & Stamm: in every
   filter the centre weight is -1 and the other weights sum to 1, re-projected after each
   optimiser step, so the layer can only learn prediction-error residuals, not content) learns
   an acquisition-device fingerprint by classifying the source scanner of authentic segments
   (`train_meta[label_column]`, default `scanner`; the paper's surrogate task is camera-model
   identification, ours is scanner identification, as BTD's adaptation);
2. at test time the CNN embeds the overlapping segments (sliding `segment` px windows) of ONE
   image; their features (globally standardised and PCA-reduced to `pca_dim`) are clustered by a
   2-component Gaussian mixture (host vs spliced);
3. heat map = posterior of the minority component times the Mahalanobis separation of the two
   components (an image that does not really split has a small separation, so its map stays low
   even though a GMM always returns two clusters); spread from segments to pixels;
4. image score = mean heat in the central `window_frac` x P square (the tamper is centred).

Choices for small patches (constructor params): segments of `segment` px (auto: the SpliceBuster
block size, 16 for CT 48, 20 for MRI 64, 8 for the tiny profile) with stride segment / 4, a
4-conv network (~25 k weights) trained for `steps` Adam steps on random segments with random
flips, full-covariance GMM in `pca_dim` = 8 dims (EM, best likelihood of `n_restarts` = 8
starts). When the training patches come from only one scanner, the patient id is used as the
label instead (the design note's fallback).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from torch.nn import functional as F

from btd.baselines.base import Baseline, check_patches, require_fitted
from btd.baselines.splicebuster import (
    _gauss_nll,
    auto_block,
    block_starts,
    blocks_to_pixels,
    central_window_mean,
    check_float,
    check_int,
    weighted_scatter,
)
from btd.errors import BTDConfigError, BTDInputError

FALLBACK_LABEL = "patient"
_EMBED_BATCH = 4096  # segments per forward pass at test time


class ConstrainedConv2d(nn.Conv2d):
    """Bayar-Stamm constrained convolution: centre weight -1, the other weights sum to 1.

    Call `project_()` after every optimiser step (and it is called at construction) to put the
    weights back on the constraint set; the filters then compute prediction-error residuals.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__(in_channels, out_channels, kernel_size, padding=0, bias=False)
        self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        w = self.weight
        c = w.shape[-1] // 2
        w[:, :, c, c] = 0.0
        total = w.sum(dim=(2, 3), keepdim=True)
        # keep the sign of the sum away from 0 so the division cannot blow up
        total = torch.where(total.abs() < 1e-6, torch.full_like(total, 1e-6), total)
        w.div_(total)
        w[:, :, c, c] = -1.0


class FingerprintNet(nn.Module):
    """Constrained high-pass -> 3 conv blocks -> global average pool = fingerprint features."""

    def __init__(self, n_classes: int, width: int = 16, n_constrained: int = 3):
        super().__init__()
        self.constrained = ConstrainedConv2d(1, n_constrained, 5)
        self.trunk = nn.Sequential(
            nn.Conv2d(n_constrained, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.Tanh(),  # residual sign matters (Bayar-Stamm use tanh after the constrained layer)
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.constrained(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_segments(
    data: torch.Tensor, idx: torch.Tensor, segment: int, gen: torch.Generator
) -> torch.Tensor:
    """One random `segment` x `segment` crop (random h/v flips) of each patch data[idx]."""
    size = data.shape[-1]
    n = len(idx)
    oy = torch.randint(0, size - segment + 1, (n,), generator=gen)
    ox = torch.randint(0, size - segment + 1, (n,), generator=gen)
    ar = torch.arange(segment)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    crops = data[idx][:, 0][torch.arange(n)[:, None, None], rows, cols]
    flip = torch.rand(n, 2, generator=gen) < 0.5
    crops = torch.where(flip[:, 0, None, None], crops.flip(1), crops)
    crops = torch.where(flip[:, 1, None, None], crops.flip(2), crops)
    return crops[:, None]


def labels_from_meta(
    meta: pd.DataFrame | None, n: int, column: str, source: str
) -> tuple[np.ndarray, list[str], str]:
    """Integer class labels from a manifest column (patient ids if the column has one class)."""
    if meta is None:
        raise BTDInputError(source, f"SpliceRadar needs the manifest (a '{column}' column)")
    if len(meta) != n:
        raise BTDInputError(source, f"manifest has {len(meta)} rows but there are {n} patches")
    for col in (column, FALLBACK_LABEL):
        if col in meta.columns and meta[col].nunique() >= 2:
            classes = sorted(meta[col].astype(str).unique())
            lookup = {c: i for i, c in enumerate(classes)}
            return meta[col].astype(str).map(lookup).to_numpy(np.int64), classes, col
    raise BTDInputError(
        source,
        f"needs >= 2 distinct values in '{column}' (or '{FALLBACK_LABEL}') to learn a fingerprint",
    )


def _outlier_split(z: np.ndarray) -> np.ndarray:
    """(B, n) 0/1 init labels: segments nearer to each image's most atypical segment than to the
    image's mean (a splice is a minority of atypical segments)."""
    centre = z.mean(1, keepdims=True)
    d_centre = np.sum((z - centre) ** 2, -1)
    far = z[np.arange(len(z)), np.argmax(d_centre, 1)][:, None]
    return (np.sum((z - far) ** 2, -1) < d_centre).astype(np.float64)


def em_two_gaussians(
    z: np.ndarray,
    rng: np.random.Generator,
    n_restarts: int = 3,
    max_iter: int = 25,
    reg: float = 1e-2,
    tol: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image, EM fit of a 2-component full-covariance GMM to segment features (B, n, d).

    Vectorised over images and restarts (sklearn's per-image fit costs ~90 ms; this ~1 ms).
    Restart 0 starts from the most atypical segment vs the mean, the others from two random
    segments (nearest-seed assignment). Returns weights (B, 2), means (B, 2, d), covariances
    (B, 2, d, d) and the responsibilities (B, n, 2) of the restart with the highest log-likelihood.
    """
    b, n, d = z.shape
    eye = np.eye(d)
    inits = [_outlier_split(z)]
    for _ in range(n_restarts - 1):
        pair = np.stack([rng.choice(n, 2, replace=False) for _ in range(b)])
        near = np.stack(
            [np.sum((z - z[np.arange(b), pair[:, k]][:, None]) ** 2, -1) for k in range(2)], -1
        )
        inits.append((near[..., 1] < near[..., 0]).astype(np.float64))
    r = len(inits)
    x = np.repeat(z[None], r, 0).reshape(r * b, n, d)
    resp = np.stack([1.0 - np.concatenate(inits), np.concatenate(inits)], -1)  # (rb, n, 2)
    ll_prev = np.zeros(r * b)
    for it in range(max_iter + 1):
        nk = resp.sum(1) + 1e-9  # (rb, 2)
        weights = nk / n
        means = np.stack([(resp[:, None, :, k] @ x)[:, 0] / nk[:, k, None] for k in range(2)], 1)
        covs = np.stack(
            [
                weighted_scatter(resp[..., k], x - means[:, k, None]) / nk[:, k, None, None]
                + reg * eye
                for k in range(2)
            ],
            1,
        )
        logp = np.stack(
            [
                np.log(weights[:, k, None]) - norm[:, None] - 0.5 * maha2
                for k in range(2)
                for maha2, norm in [_gauss_nll(x - means[:, k, None], covs[:, k])]
            ],
            -1,
        )
        total = np.logaddexp(logp[..., 0], logp[..., 1])
        ll_now = total.mean(1)
        if it == max_iter or (it > 0 and np.abs(ll_now - ll_prev).max() < tol):
            break  # every fit has converged (mean log-likelihood per segment stable)
        ll_prev = ll_now
        resp = np.exp(logp - total[..., None])
    ll = total.sum(1).reshape(r, b)
    pick = np.argmax(ll, axis=0) * b + np.arange(b)
    return weights[pick], means[pick], covs[pick], np.exp(logp - total[..., None])[pick]


def split_heat(
    z: np.ndarray, rng: np.random.Generator, reg: float, n_restarts: int = 8
) -> np.ndarray:
    """Per-segment heat (B, n): minority posterior x Mahalanobis separation of the two components.

    The separation uses the weight-pooled covariance; a GMM always returns two clusters, so
    the separation is what tells a really split image from a homogeneous one.
    """
    weights, means, covs, resp = em_two_gaussians(z, rng, n_restarts, reg=reg)
    minority = np.argmin(weights, axis=1)
    post = np.take_along_axis(resp, minority[:, None, None], axis=2)[..., 0]
    pooled = np.einsum("bk,bkij->bij", weights, covs)
    diff = means[:, 0] - means[:, 1]
    sep = np.sqrt(
        np.maximum(np.sum(diff * np.linalg.solve(pooled, diff[..., None])[..., 0], -1), 0)
    )
    return post * sep[:, None]


class SpliceRadar(Baseline):
    """SpliceRadar (paper ref. [14]); see the module docstring for the method and our choices."""

    name = "spliceradar"

    def __init__(
        self,
        segment: int | None = None,
        stride: int | None = None,
        width: int = 16,
        steps: int = 400,
        batch_size: int = 128,
        lr: float = 2e-3,
        pca_dim: int = 8,
        n_restarts: int = 8,
        reg_covar: float = 1e-2,
        window_frac: float = 0.5,
        label_column: str = "scanner",
        seed: int = 0,
        device: str = "cpu",
    ):
        super().__init__(
            segment=segment,
            stride=stride,
            width=width,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            pca_dim=pca_dim,
            n_restarts=n_restarts,
            reg_covar=reg_covar,
            window_frac=window_frac,
            label_column=label_column,
            seed=seed,
            device=device,
        )
        self.segment = None if segment is None else check_int(segment, "spliceradar.segment", 6)
        self.stride = None if stride is None else check_int(stride, "spliceradar.stride")
        self.width = check_int(width, "spliceradar.width", 2)
        self.steps = check_int(steps, "spliceradar.steps")
        self.batch_size = check_int(batch_size, "spliceradar.batch_size", 2)
        self.lr = check_float(lr, "spliceradar.lr", 0.0, 1.0)
        self.pca_dim = check_int(pca_dim, "spliceradar.pca_dim")
        self.n_restarts = check_int(n_restarts, "spliceradar.n_restarts")
        self.reg_covar = check_float(reg_covar, "spliceradar.reg_covar", 0.0, 1e3)
        self.window_frac = check_float(window_frac, "spliceradar.window_frac", 0.0, 1.0)
        if not isinstance(label_column, str) or not label_column:
            raise BTDConfigError(
                "spliceradar.label_column", f"must be a column name, got {label_column!r}"
            )
        self.label_column = label_column
        self.seed = check_int(seed, "spliceradar.seed", 0)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise BTDConfigError("spliceradar.device", f"not a torch device: {device!r}") from None
        self.size: int | None = None
        self.classes: list[str] = []
        self.net: FingerprintNet | None = None
        self.mean: np.ndarray | None = None
        self.proj: np.ndarray | None = None

    # -- geometry ----------------------------------------------------------------------------------
    def _layout(self, size: int) -> tuple[int, int]:
        segment = self.segment if self.segment is not None else auto_block(size)
        stride = self.stride if self.stride is not None else max(1, segment // 4)
        if segment + 4 > size:
            raise BTDConfigError(
                "spliceradar.segment", f"{segment} px does not fit a {size} px patch"
            )
        return segment, stride

    # -- training ----------------------------------------------------------------------------------
    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        train_meta: pd.DataFrame | None = None,
        val_meta: pd.DataFrame | None = None,
    ) -> list[dict]:
        """Train the fingerprint CNN to tell scanners apart on random segments of real patches.

        Then fit the global feature standardisation/PCA on segments of the training patches.
        History rows: step, train loss/accuracy and (with `val_meta`) validation accuracy.
        """
        train = check_patches(train, "spliceradar.fit(train)")
        val = check_patches(val, "spliceradar.fit(val)", size=train.shape[-1])
        labels, classes, used = labels_from_meta(
            train_meta, len(train), self.label_column, "spliceradar.fit(train_meta)"
        )
        size = int(train.shape[-1])
        segment, _ = self._layout(size)
        self.size, self.classes = size, classes
        val_labels = self._val_labels(val_meta, len(val), used)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = FingerprintNet(len(classes), self.width).to(self.device)
            history = self._train(train, labels, val, val_labels, segment)
        self.net.eval()
        self._fit_projection(train)
        for row in history:
            row["label_column"] = used
        return history

    def _val_labels(self, meta: pd.DataFrame | None, n: int, column: str) -> np.ndarray | None:
        if meta is None or column not in meta.columns or len(meta) != n:
            return None
        lookup = {c: i for i, c in enumerate(self.classes)}
        return meta[column].astype(str).map(lambda v: lookup.get(v, -1)).to_numpy(np.int64)

    def _train(
        self,
        train: np.ndarray,
        labels: np.ndarray,
        val: np.ndarray,
        val_labels: np.ndarray | None,
        segment: int,
    ) -> list[dict]:
        assert self.net is not None
        gen = torch.Generator().manual_seed(self.seed)
        data, y = torch.from_numpy(train.copy()), torch.from_numpy(labels.copy())
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
        history: list[dict] = []
        every = max(1, self.steps // 5)
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for step in range(1, self.steps + 1):
            self.net.train()
            idx = torch.randint(0, len(data), (self.batch_size,), generator=gen)
            xb = random_segments(data, idx, segment, gen).to(self.device)
            logits = self.net(xb)
            loss = F.cross_entropy(logits, y[idx].to(self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            self.net.constrained.project_()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1).cpu() == y[idx]).sum())
            seen += len(idx)
            if step % every == 0 or step == self.steps:
                history.append(
                    {
                        "step": step,
                        "train_loss": loss_sum / seen,
                        "train_acc": correct / seen,
                        "val_acc": self._val_accuracy(val, val_labels, segment),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                loss_sum, correct, seen = 0.0, 0, 0
        return history

    @torch.no_grad()
    def _val_accuracy(self, val: np.ndarray, labels: np.ndarray | None, segment: int) -> float:
        """Scanner accuracy on one fixed random segment per known-scanner validation patch."""
        if labels is None or (labels >= 0).sum() == 0:
            return float("nan")
        assert self.net is not None
        self.net.eval()
        keep = np.flatnonzero(labels >= 0)
        gen = torch.Generator().manual_seed(self.seed + 1)
        xb = random_segments(torch.from_numpy(val), torch.from_numpy(keep), segment, gen)
        pred = self.net(xb.to(self.device)).argmax(1).cpu().numpy()
        return float((pred == labels[keep]).mean())

    def _fit_projection(self, train: np.ndarray) -> None:
        """Standardise + PCA-whiten segment features with statistics of the training patches."""
        rng = np.random.default_rng(self.seed)
        pick = np.sort(rng.choice(len(train), min(len(train), 100), replace=False))
        feats = self._segment_features(train[pick])[0].reshape(-1, self._feat_dim())
        self.mean = feats.mean(0)
        evals, evecs = np.linalg.eigh(np.cov(feats, rowvar=False))
        order = np.argsort(evals)[::-1][: self.pca_dim]
        self.proj = evecs[:, order] / np.sqrt(np.maximum(evals[order], 1e-12))

    def _feat_dim(self) -> int:
        return 4 * self.width

    # -- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _segment_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """CNN features of all sliding segments: (N, nb, nb, F), the segment starts, segment."""
        assert self.net is not None and self.size is not None
        segment, stride = self._layout(self.size)
        starts = block_starts(self.size, segment, stride)
        t = torch.from_numpy(x[:, 0])
        rows = (torch.from_numpy(starts)[:, None] + torch.arange(segment)).long()
        nb = len(starts)
        # (N, nb, nb, S, S) view of all segments
        segs = t[:, rows][:, :, :, rows].permute(0, 1, 3, 2, 4).reshape(-1, 1, segment, segment)
        self.net.eval()
        out = [
            self.net.features(segs[i : i + _EMBED_BATCH].to(self.device)).cpu()
            for i in range(0, len(segs), _EMBED_BATCH)
        ]
        feats = torch.cat(out).numpy().astype(np.float64)
        return feats.reshape(len(x), nb, nb, -1), starts, segment

    def segment_heatmap(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-segment heat (N, nb, nb): minority posterior x component separation, per image."""
        require_fitted(self.net is not None, self.name)
        x = check_patches(x, "spliceradar input", size=self.size)
        feats, starts, segment = self._segment_features(x)
        assert self.mean is not None and self.proj is not None
        n, nb = feats.shape[:2]
        z = ((feats - self.mean) @ self.proj).reshape(n, nb * nb, -1)
        heat = np.empty((n, nb * nb))
        rng = np.random.default_rng(self.seed)
        # many tiny batched LAPACK calls: BLAS threads would only oversubscribe the cores
        with threadpool_limits(limits=1, user_api="blas"):
            for lo in range(0, n, 256):
                heat[lo : lo + 256] = split_heat(
                    z[lo : lo + 256], rng, self.reg_covar, self.n_restarts
                )
        return heat.reshape(n, nb, nb), starts, segment

    def anomaly_map(self, x: np.ndarray) -> np.ndarray:
        """(N, P, P) heat map spread from the segments (tent-weighted mean of covering segments)."""
        heat, starts, segment = self.segment_heatmap(x)
        assert self.size is not None
        valid = np.ones(heat.shape, bool)
        return blocks_to_pixels(heat, valid, starts, segment, 0, self.size)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Mean heat in the central window; higher = more anomalous."""
        return central_window_mean(self.anomaly_map(x), self.window_frac)

    def predict_scanner(self, x: np.ndarray) -> np.ndarray:
        """Scanner class index per patch (mean logits over its segments), for sanity checks."""
        require_fitted(self.net is not None, self.name)
        x = check_patches(x, "spliceradar input", size=self.size)
        feats, _, _ = self._segment_features(x)
        assert self.net is not None
        with torch.no_grad():
            f = torch.from_numpy(feats.mean(axis=(1, 2))).float().to(self.device)
            return self.net.head(f).argmax(1).cpu().numpy()

    # -- state -------------------------------------------------------------------------------------
    def state(self) -> dict:
        require_fitted(self.net is not None, self.name)
        assert self.net is not None
        weights = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return {
            "size": self.size,
            "classes": list(self.classes),
            "weights": weights,
            "mean": self.mean,
            "proj": self.proj,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.size = int(state["size"])
        self.classes = [str(c) for c in state["classes"]]
        net = FingerprintNet(len(self.classes), self.width)
        net.load_state_dict(state["weights"])
        self.net = net.to(self.device).eval()
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.proj = np.asarray(state["proj"], dtype=np.float64)
