"""SpliceBuster (Cozzolino, Poggi & Verdoliva, WIFS 2015): blind splicing detection from noise.

The method, reimplemented from its description (no code copied; the public ports carry a
research-only licence):
1. high-pass residual: 3rd-order derivative [-1, 3, -3, 1] along rows (r_h) and columns (r_v);
2. quantise with step q and truncate to [-T, T] (T = 1: symbols {0, 1, 2});
3. co-occurrences of 4 consecutive symbols along and across each derivative direction (hh, hv,
   vh, vv), 3^4 = 81 codes merged by mirror and sign symmetry into 25 classes;
4. per sliding block: histograms of (hv + vh) and (hh + vv), Hellinger (sqrt), PCA-whitening;
5. per image, EM fit of a Gaussian (pristine) + uniform (forged) mixture to its block features;
   heat map = Mahalanobis distance of each block to the pristine Gaussian, spread to pixels.

Choices for 24-128 px [0, 1]-normalised CT/MRI patches (the original is tuned for >= 512 px
8-bit camera images; all are constructor params):
- quantisation step: the camera setting (3q/256, q = 2) assumes 8-bit sensor noise; CT/MRI patches
  normalised to [0, 1] have residuals of a very different size, so `fit` sets the step to
  `q_scale` x median |residual| of the training patches (median |r| = 0.67 sigma for Gaussian
  residuals, close to the camera setting's step / residual-std ratio);
- blocks: `block` px (auto: 4 * round(P / 12), at least 8; 16 for 48 px patches, 20 for 64 px,
  8 for the tiny profile) with stride block / 4 -> 8 x 8 or 9 x 9 blocks per patch, instead of
  128 px blocks (64 px, stride 4, on small camera images);
- PCA: a patch has too few blocks to estimate a 50-D covariance, so `fit` learns a global mean
  and whitening (all non-null directions) from the training patches' blocks; then, as the
  original, each image is projected on its OWN top `pca_dim` = 6 principal axes (the original
  keeps 25) so a forged region's direction, which has variance only in that image, is kept;
- EM: `n_restarts` = 4 starts (the original: 30), `max_iter` = 50, covariance ridge 0.01 (in
  whitened units); a fit whose Gaussian explains under half of the blocks (a collapse onto a few
  near-identical overlapping blocks) loses to any other start;
- the uniform outlier density is set relative to the fitted Gaussian so that a block counts as
  forged when its squared Mahalanobis distance exceeds the chi2_d `outlier_quantile` (0.99)
  quantile (plus the prior term), the analogue of the original's fixed constant in whitened units;
- saturated pixels (within `sat_tol` of 0 or 1; CT lung below -700 HU is clipped to 0) carry no
  noise: blocks with more than 15 % saturated pixels are left out of the EM (as the original), and
  contribute nothing to the pixel map (pixels covered only by such blocks get 0). No morphological
  opening of the saturation mask. An image with too few valid blocks uses all of them;
- block -> pixel map: tent-weighted mean of the covering blocks (peaked at block centres);
- image score = mean of the heat map in the central `window_frac` x P square (the tamper is
  centred in every test patch); `window_frac = 1` scores the whole patch.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2
from threadpoolctl import threadpool_limits

from btd.baselines.base import Baseline, check_patches, require_fitted
from btd.errors import BTDConfigError, BTDInputError

SAT_MAX_FRACTION = 0.15  # a block with more saturated pixels than this is invalid (as the original)
_CHUNK = 64  # images per vectorised chunk (bounds the memory of the one-hot co-occurrence maps)

# --------------------------------------------------------------------------------------------------
# parameter checks (shared with SpliceRadar)


def check_int(value: Any, field: str, minimum: int = 1) -> int:
    """An integer >= minimum, else BTDConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise BTDConfigError(field, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(value: Any, field: str, low: float, high: float, closed_high: bool = True) -> float:
    """A number in (low, high] (or (low, high)), else BTDConfigError naming the field."""
    ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = low < value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise BTDConfigError(field, f"must be a number in ({low}, {high}{bracket}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# block layout and maps (shared with SpliceRadar)


def auto_block(size: int) -> int:
    """Block side for a `size` px patch: ~P/3 in multiples of 4, >= 8 (16 @ 48, 20 @ 64, 8 @ 24)."""
    return max(8, 4 * int(round(size / 12)))


def block_starts(extent: int, block: int, stride: int) -> np.ndarray:
    """Top-left offsets of sliding blocks covering [0, extent), the last one flush with the end."""
    if block > extent:
        raise BTDInputError("patches", f"block {block} px is larger than the usable {extent} px")
    starts = list(range(0, extent - block + 1, stride))
    if starts[-1] != extent - block:
        starts.append(extent - block)
    return np.asarray(starts, dtype=np.int64)


def _tent(block: int) -> np.ndarray:
    """Separable triangular weights over a block, peaked at its centre (bilinear-like spreading)."""
    c = (np.arange(block) + 0.5) / block
    w = 1.0 - np.abs(2.0 * c - 1.0) + 1.0 / block
    return np.outer(w, w)


def _spread(values: np.ndarray, starts: np.ndarray, block: int, offset: int, size: int):
    """Tent-weighted sum of per-block values (N, nb, nb) over the pixels each block covers."""
    acc = np.zeros((values.shape[0], size, size), np.float64)
    tent = _tent(block)
    for i, y in enumerate(starts + offset):
        for j, x in enumerate(starts + offset):
            acc[:, y : y + block, x : x + block] += values[:, i, j, None, None] * tent
    return acc


def blocks_to_pixels(
    values: np.ndarray,
    valid: np.ndarray,
    starts: np.ndarray,
    block: int,
    offset: int,
    size: int,
) -> np.ndarray:
    """Spread per-block values (N, nb, nb) to a pixel map (N, size, size) by averaging.

    Each pixel gets the mean of the valid blocks covering it, weighted by a tent peaked at each
    block's centre (a block's value is best localised there; 0 when no valid block covers the
    pixel). Blocks live on a grid shifted by `offset` px from the patch corner.
    """
    vf = valid.astype(np.float64)
    total = _spread(np.where(valid, values, 0.0), starts, block, offset, size)
    count = _spread(vf, starts, block, offset, size)
    out = np.where(count > 1e-9, total / np.maximum(count, 1e-12), 0.0)
    return out.astype(np.float32)


def central_window_mean(maps: np.ndarray, window_frac: float) -> np.ndarray:
    """Mean of (N, P, P) maps over the central round(window_frac * P) square (the tamper site)."""
    size = maps.shape[-1]
    w = min(size, max(1, int(round(window_frac * size))))
    lo = (size - w) // 2
    return maps[:, lo : lo + w, lo : lo + w].mean(axis=(1, 2)).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# residuals and co-occurrence features


def residuals(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3rd-order derivative residuals of (N, P, P) images: r_h (N,P,P-3) and r_v (N,P-3,P)."""
    r_h = x[:, :, :-3] - 3 * x[:, :, 1:-2] + 3 * x[:, :, 2:-1] - x[:, :, 3:]
    r_v = x[:, :-3, :] - 3 * x[:, 1:-2, :] + 3 * x[:, 2:-1, :] - x[:, 3:, :]
    return r_h, r_v


def unsaturated_residuals(x: np.ndarray, sat_tol: float) -> np.ndarray:
    """|residual| samples whose 4 support pixels are all unsaturated (for setting the step q)."""
    sat = (x <= sat_tol) | (x >= 1.0 - sat_tol)
    r_h, r_v = residuals(x)
    ok_h = ~(sat[:, :, :-3] | sat[:, :, 1:-2] | sat[:, :, 2:-1] | sat[:, :, 3:])
    ok_v = ~(sat[:, :-3, :] | sat[:, 1:-2, :] | sat[:, 2:-1, :] | sat[:, 3:, :])
    return np.abs(np.concatenate([r_h[ok_h], r_v[ok_v]]))


def symbol_classes(truncation: int) -> tuple[np.ndarray, int]:
    """LUT from the (2T+1)^4 co-occurrence codes to classes merged by mirror and sign symmetry.

    A 4-symbol pattern, its reverse, its negation (s -> 2T - s) and the reversed negation are one
    class (the original's `min(code, reversed, last - code, ...)` merge): 25 classes for T = 1.
    """
    base = 2 * truncation + 1
    digits = np.array(list(itertools.product(range(base), repeat=4)), dtype=np.int64)
    weights = base ** np.arange(3, -1, -1)
    variants = [digits, digits[:, ::-1], base - 1 - digits, (base - 1 - digits)[:, ::-1]]
    canon = np.min(np.stack([v @ weights for v in variants]), axis=0)
    _, lut = np.unique(canon, return_inverse=True)
    return lut.astype(np.int64), int(lut.max()) + 1


def _codes(q: np.ndarray, axis: int, base: int) -> np.ndarray:
    """Base-`base` code of 4 consecutive symbols along `axis` (1 = down, 2 = across) of (N,H,W)."""
    n = q.shape[axis]
    parts = [np.take(q, np.arange(k, n - 3 + k), axis=axis) for k in range(4)]
    return ((parts[0] * base + parts[1]) * base + parts[2]) * base + parts[3]


def _centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    oy, ox = (a.shape[1] - size) // 2, (a.shape[2] - size) // 2
    return a[:, oy : oy + size, ox : ox + size]


def _box_sums(onehot: np.ndarray, starts: np.ndarray, block: int) -> np.ndarray:
    """Sums of (N, G, G, K) over all blocks at `starts` x `starts` -> (N, nb, nb, K)."""
    n, g, _, k = onehot.shape
    integ = np.zeros((n, g + 1, g + 1, k), np.int32)
    integ[:, 1:, 1:] = onehot.cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
    a, b = starts, starts + block
    return integ[:, b][:, :, b] - integ[:, a][:, :, b] - integ[:, b][:, :, a] + integ[:, a][:, :, a]


def block_features(
    x: np.ndarray, q_step: float, truncation: int, block: int, stride: int, sat_tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """SpliceBuster block features of (N, P, P) images.

    Returns features (N, nb, nb, 2K) (sqrt of the normalised hv+vh and hh+vv histograms), the
    validity of each block (N, nb, nb) (saturation), the block starts and the grid offset (3 px:
    the co-occurrence grid is the central (P-6) x (P-6) part of the patch).
    """
    size = x.shape[-1]
    grid = size - 6
    starts = block_starts(grid, block, stride)
    lut, k = symbol_classes(truncation)
    base = 2 * truncation + 1
    feats, valid = [], []
    sat_all = (x <= sat_tol) | (x >= 1.0 - sat_tol)
    for lo in range(0, len(x), _CHUNK):
        xb = x[lo : lo + _CHUNK].astype(np.float64)
        r_h, r_v = residuals(xb)
        q_h = (np.clip(np.rint(r_h / q_step), -truncation, truncation) + truncation).astype(
            np.int64
        )
        q_v = (np.clip(np.rint(r_v / q_step), -truncation, truncation) + truncation).astype(
            np.int64
        )
        groups = (  # (across-direction pair, along-direction pair)
            (_codes(q_h, 1, base), _codes(q_v, 2, base)),  # hv + vh
            (_codes(q_h, 2, base), _codes(q_v, 1, base)),  # hh + vv
        )
        onehot = np.zeros((len(xb), grid, grid, 2 * k), np.int32)
        eye = np.eye(k, dtype=np.int32)
        for g, pair in enumerate(groups):
            for codes in pair:
                onehot[..., g * k : (g + 1) * k] += eye[lut[_centre_crop(codes, grid)]]
        hist = _box_sums(onehot, starts, block).astype(np.float64) / (2.0 * block * block)
        feats.append(np.sqrt(hist))
        sat = sat_all[lo : lo + _CHUNK, 3 : 3 + grid, 3 : 3 + grid, None].astype(np.int32)
        frac = _box_sums(sat, starts, block)[..., 0] / float(block * block)
        valid.append(frac <= SAT_MAX_FRACTION)
    return np.concatenate(feats), np.concatenate(valid), starts, 3


# --------------------------------------------------------------------------------------------------
# Gaussian + uniform EM, vectorised over images and restarts


def weighted_scatter(w: np.ndarray, xc: np.ndarray) -> np.ndarray:
    """sum_n w[b, n] xc[b, n]^T xc[b, n] -> (B, d, d) (batched matmul; einsum is 10x slower)."""
    return (xc * w[..., None]).transpose(0, 2, 1) @ xc


def _gauss_nll(xc: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared Mahalanobis distances (B, n) and 0.5 log|2 pi cov| (B,) of centred data (B, n, d)."""
    chol = np.linalg.cholesky(cov)
    d = cov.shape[-1]
    sol = xc @ np.linalg.inv(chol).transpose(0, 2, 1)  # rows L^-1 (x - mu)
    maha2 = np.sum(sol**2, axis=-1)
    half_logdet = np.sum(np.log(np.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    return maha2, half_logdet + 0.5 * d * np.log(2 * np.pi)


def em_gauss_uniform(
    feats: np.ndarray,
    valid: np.ndarray,
    rng: np.random.Generator,
    n_restarts: int = 4,
    max_iter: int = 50,
    threshold: float = 16.8,
    reg: float = 1e-2,
    max_outlier: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, fit pristine Gaussian + uniform outliers to block features (B, n, d) by EM.

    Outlier density = the Gaussian's normaliser times exp(-threshold / 2): a block is an outlier
    when its squared Mahalanobis distance exceeds `threshold` + 2 log((1 - pi) / pi). Invalid
    blocks (`valid` False) get no weight. Restart 0 starts from all valid blocks, the others from
    a random valid block with the diagonal variance (the original's initialisation); the restart
    with the highest log-likelihood is kept. Returns mean (B, d) and covariance (B, d, d).
    """
    b, n, d = feats.shape
    vw = valid.astype(np.float64)
    nv = np.maximum(vw.sum(1), 1.0)
    mean_all = (feats * vw[..., None]).sum(1) / nv[:, None]
    xc = feats - mean_all[:, None]
    cov_all = weighted_scatter(vw, xc) / nv[:, None, None]
    eye = np.eye(d)
    mus, covs = [mean_all], [cov_all + reg * eye]
    var_diag = np.einsum("bii->bi", cov_all)[:, :, None] * eye
    for _ in range(n_restarts - 1):
        p = vw / nv[:, None]
        pick = np.array([rng.choice(n, p=row) if row.sum() > 0 else 0 for row in p])
        mus.append(feats[np.arange(b), pick])
        covs.append(var_diag + reg * eye)
    r = len(mus)
    x = np.repeat(feats[None], r, 0).reshape(r * b, n, d)
    w_valid = np.repeat(vw[None], r, 0).reshape(r * b, n)
    mu = np.concatenate(mus)
    cov = np.concatenate(covs)
    pi = np.full(r * b, 0.01)
    for _ in range(max_iter):
        maha2, norm = _gauss_nll(x - mu[:, None], cov)
        log_in = np.log1p(-pi)[:, None] - norm[:, None] - 0.5 * maha2
        log_out = np.log(pi)[:, None] - norm[:, None] - 0.5 * threshold
        post = w_valid / (1.0 + np.exp(np.clip(log_out - log_in, -50, 50)))
        sw = np.maximum(post.sum(1), 1e-9)
        mu = (post[:, None] @ x)[:, 0] / sw[:, None]
        xc = x - mu[:, None]
        cov = weighted_scatter(post, xc) / sw[:, None, None] + reg * eye
        nvk = np.maximum(w_valid.sum(1), 1.0)
        pi = np.clip(1.0 - sw / nvk, 1e-4, max_outlier)
    maha2, norm = _gauss_nll(x - mu[:, None], cov)
    log_in = np.log1p(-pi)[:, None] - norm[:, None] - 0.5 * maha2
    log_out = np.log(pi)[:, None] - norm[:, None] - 0.5 * threshold
    ll = (np.logaddexp(log_in, log_out) * w_valid).sum(1)
    # a Gaussian that explains less than half of the blocks is a collapsed fit on a few
    # near-identical overlapping blocks, not the pristine majority: rank it last
    inlier_frac = (w_valid / (1.0 + np.exp(np.clip(log_out - log_in, -50, 50)))).sum(1) / nvk
    ll = np.where(inlier_frac >= 0.5, ll, ll - 1e12).reshape(r, b)
    best = np.argmax(ll, axis=0)
    pick = best * b + np.arange(b)
    return mu[pick], cov[pick]


def image_pca(z: np.ndarray, valid: np.ndarray, dim: int) -> np.ndarray:
    """Per image, project block features (B, n, D) on their own top `dim` principal axes, whitened.

    As the original, the PCA is fitted on each image's own (valid) blocks, so a forged region's
    direction, which has variance only inside that image, is kept.
    """
    w = valid.astype(np.float64)
    nv = np.maximum(w.sum(1), 1.0)
    zc = z - ((z * w[..., None]).sum(1) / nv[:, None])[:, None]
    cov = weighted_scatter(w, zc) / nv[:, None, None]
    evals, evecs = np.linalg.eigh(cov)
    dim = min(dim, z.shape[-1])
    top_vals = np.maximum(evals[:, ::-1][:, :dim], 1e-9)
    top_vecs = evecs[:, :, ::-1][:, :, :dim]
    return (zc @ top_vecs) / np.sqrt(top_vals)[:, None]


# --------------------------------------------------------------------------------------------------
# the baseline


class SpliceBuster(Baseline):
    """SpliceBuster (paper ref. [7]); see the module docstring for the method and our choices."""

    name = "splicebuster"

    def __init__(
        self,
        block: int | None = None,
        stride: int | None = None,
        truncation: int = 1,
        q_scale: float = 1.0,
        pca_dim: int = 6,
        n_restarts: int = 4,
        max_iter: int = 50,
        outlier_quantile: float = 0.99,
        window_frac: float = 0.5,
        sat_tol: float = 1e-3,
        max_fit_patches: int = 1000,
        seed: int = 0,
    ):
        super().__init__(
            block=block,
            stride=stride,
            truncation=truncation,
            q_scale=q_scale,
            pca_dim=pca_dim,
            n_restarts=n_restarts,
            max_iter=max_iter,
            outlier_quantile=outlier_quantile,
            window_frac=window_frac,
            sat_tol=sat_tol,
            max_fit_patches=max_fit_patches,
            seed=seed,
        )
        self.block = None if block is None else check_int(block, "splicebuster.block", 4)
        self.stride = None if stride is None else check_int(stride, "splicebuster.stride")
        self.truncation = check_int(truncation, "splicebuster.truncation")
        self.q_scale = check_float(q_scale, "splicebuster.q_scale", 0.0, 100.0)
        self.pca_dim = check_int(pca_dim, "splicebuster.pca_dim")
        self.n_restarts = check_int(n_restarts, "splicebuster.n_restarts")
        self.max_iter = check_int(max_iter, "splicebuster.max_iter")
        self.outlier_quantile = check_float(
            outlier_quantile, "splicebuster.outlier_quantile", 0.0, 1.0, closed_high=False
        )
        self.window_frac = check_float(window_frac, "splicebuster.window_frac", 0.0, 1.0)
        self.sat_tol = check_float(sat_tol, "splicebuster.sat_tol", -1e-12, 0.5, False)
        self.max_fit_patches = check_int(max_fit_patches, "splicebuster.max_fit_patches")
        self.seed = check_int(seed, "splicebuster.seed", 0)
        self.size: int | None = None
        self.q_step: float | None = None
        self.mean: np.ndarray | None = None
        self.proj: np.ndarray | None = None

    # -- geometry ----------------------------------------------------------------------------------
    def _layout(self, size: int) -> tuple[int, int]:
        block = self.block if self.block is not None else auto_block(size)
        stride = self.stride if self.stride is not None else max(1, block // 4)
        if block > size - 6:
            raise BTDConfigError(
                "splicebuster.block", f"{block} px does not fit a {size} px patch (max {size - 6})"
            )
        return block, stride

    def _features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        assert self.q_step is not None
        block, stride = self._layout(x.shape[-1])
        feats, valid, starts, offset = block_features(
            x[:, 0], self.q_step, self.truncation, block, stride, self.sat_tol
        )
        return feats, valid, starts, offset, block

    # -- Baseline API ------------------------------------------------------------------------------
    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        train_meta: pd.DataFrame | None = None,
        val_meta: pd.DataFrame | None = None,
    ) -> list[dict]:
        """Set the quantisation step and the PCA-whitening basis from real training patches.

        No network is trained: SpliceBuster is single-image. `val` is only checked for shape.
        """
        t0 = time.perf_counter()
        train = check_patches(train, "splicebuster.fit(train)")
        check_patches(val, "splicebuster.fit(val)", size=train.shape[-1])
        size = int(train.shape[-1])
        self._layout(size)
        rng = np.random.default_rng(self.seed)
        if len(train) > self.max_fit_patches:
            train = train[np.sort(rng.choice(len(train), self.max_fit_patches, replace=False))]
        mags = unsaturated_residuals(train[:, 0].astype(np.float64), self.sat_tol)
        if mags.size == 0 or float(np.median(mags)) <= 0:
            raise BTDInputError(
                "splicebuster.fit(train)",
                "patches carry no unsaturated noise residual (constant or clipped images)",
            )
        self.size = size
        self.q_step = self.q_scale * float(np.median(mags))
        feats, valid, *_ = self._features(train)
        flat = (
            feats[valid]
            if valid.sum() >= 2 * feats.shape[-1]
            else feats.reshape(-1, feats.shape[-1])
        )
        self.mean = flat.mean(0)
        evals, evecs = np.linalg.eigh(np.cov(flat, rowvar=False))
        keep = evals > 1e-6 * evals.max()  # drop the null directions (empty co-occurrence bins)
        self.proj = evecs[:, keep][:, ::-1] / np.sqrt(evals[keep][::-1])
        return [
            {
                "step": 0,
                "q_step": self.q_step,
                "blocks_used": int(len(flat)),
                "whitened_dims": int(keep.sum()),
                "seconds": time.perf_counter() - t0,
            }
        ]

    def block_heatmap(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Per-block Mahalanobis distances (N, nb, nb) to each image's own pristine Gaussian.

        Returns (distances, validity, block starts, grid offset, block size).
        """
        require_fitted(self.q_step is not None, self.name)
        x = check_patches(x, "splicebuster input", size=self.size)
        feats, valid, starts, offset, block = self._features(x)
        assert self.mean is not None and self.proj is not None
        n, nb = feats.shape[:2]
        ok = valid.reshape(n, -1).copy()
        too_few = ok.sum(1) < max(2 * self.pca_dim + 2, 8)
        ok[too_few] = True  # too little unsaturated texture: use every block (documented)
        z = image_pca(((feats - self.mean) @ self.proj).reshape(n, nb * nb, -1), ok, self.pca_dim)
        rng = np.random.default_rng(self.seed)
        threshold = float(chi2.ppf(self.outlier_quantile, z.shape[-1]))
        dist = np.empty((n, nb * nb))
        for lo in range(0, n, 256):
            sl = slice(lo, lo + 256)
            mu, cov = em_gauss_uniform(
                z[sl], ok[sl], rng, self.n_restarts, self.max_iter, threshold
            )
            maha2, _ = _gauss_nll(z[sl] - mu[:, None], cov)
            dist[sl] = np.sqrt(maha2)
        return dist.reshape(n, nb, nb), ok.reshape(n, nb, nb), starts, offset, block

    def anomaly_map(self, x: np.ndarray) -> np.ndarray:
        """(N, P, P) heat map: mean Mahalanobis distance of the valid blocks covering each pixel."""
        # thousands of tiny batched LAPACK calls: BLAS threads only oversubscribe the cores
        with threadpool_limits(limits=1, user_api="blas"):
            dist, ok, starts, offset, block = self.block_heatmap(x)
        assert self.size is not None
        return blocks_to_pixels(dist, ok, starts, block, offset, self.size)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Mean heat in the central window; higher = more anomalous."""
        return central_window_mean(self.anomaly_map(x), self.window_frac)

    def state(self) -> dict:
        require_fitted(self.q_step is not None, self.name)
        return {"size": self.size, "q_step": self.q_step, "mean": self.mean, "proj": self.proj}

    def load_state(self, state: dict) -> None:
        self.size = int(state["size"])
        self.q_step = float(state["q_step"])
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.proj = np.asarray(state["proj"], dtype=np.float64)
        if self.proj.ndim != 2 or self.proj.shape[0] != self.mean.shape[0]:
            raise BTDInputError(
                "splicebuster state", f"projection {self.proj.shape} does not fit the mean"
            )
