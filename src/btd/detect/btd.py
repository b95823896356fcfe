"""BTD scoring: one backward diffusion step from the clean image, residual, mean square.

For a suspect patch x0 (in [0, 1]) the library's own `normalize` maps it to model space [-1, 1];
then ONE backward step with the library's own `p_sample(x, 0)` (t index 0 = the paper's t = 1; no
noise is added at t = 0) gives x_{-1}. Because the posterior mean at t = 0 is exactly the predicted
x_start, x_{-1} = clamp(x0 / sqrt(abar_0) - sqrt(1/abar_0 - 1) * eps_theta(x0, 0), -1, 1), so the
residual r = x0 - x_{-1} is, up to clipping, proportional to the model's noise prediction at t = 0.

Residuals and scores are in model space: r is twice the residual in [0, 1] units, scores are four
times (a constant factor: rankings, AUC and calibrated thresholds are unaffected).

The score is mean(r^2) over the whole patch (removal) or over a `window` x `window` square at the
tumour centre (injection; 32 in the paper). The ablations use:
- `backward(x, k)`: x0 treated as x_k, k backward steps t = k-1 .. 0;
- `forward_backward(x, k)`: x0 noised to t = k-1 (`q_sample`), then k backward steps ("F&B").
Their random draws (posterior noise for t > 0, forward noise) come from one seeded generator PER
PATCH (seeded by `seed` and the patch's index in the input), so a patch's score never depends on
the batch size or on the other patches, and two calls give identical scores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from denoising_diffusion_pytorch import GaussianDiffusion

from btd.diffusion.model import as_patch_tensor
from btd.errors import BTDConfigError, BTDInputError

METHODS = ("backward", "forward_backward")
PAPER_WINDOW = 32


@contextmanager
def _deterministic_eval(diffusion: GaussianDiffusion) -> Iterator[torch.device]:
    """Eval mode and deterministic cuDNN for the duration of a scoring call, then restore."""
    was_training = diffusion.training
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark)
    diffusion.eval()
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield diffusion.betas.device
    finally:
        cudnn.deterministic, cudnn.benchmark = saved
        diffusion.train(was_training)


def _patch_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """One CPU generator per patch, seeded by (seed, global patch index)."""
    gens = []
    for index in range(start, start + count):
        low, high = np.random.SeedSequence([seed, 7, index]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(low) | (int(high) & 0x7FFFFFFF) << 32))
    return gens


def _noise(
    gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def _step(
    diffusion: GaussianDiffusion, x: torch.Tensor, t: int, gens: list[torch.Generator]
) -> torch.Tensor:
    """One backward step t -> t-1: the library's `p_sample`, with seeded posterior noise for t > 0."""
    if t == 0:
        x_prev, _ = diffusion.p_sample(x, 0)
        return x_prev
    times = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    mean, _, log_var, _ = diffusion.p_mean_variance(x=x, t=times, clip_denoised=True)
    return mean + (0.5 * log_var).exp() * _noise(gens, tuple(x.shape[1:]), x.device)


def _check_steps(diffusion: GaussianDiffusion, k: int) -> int:
    if (
        not isinstance(k, int | np.integer)
        or isinstance(k, bool)
        or not 1 <= k <= diffusion.num_timesteps
    ):
        raise BTDConfigError(
            "steps", f"must be an integer in 1..{diffusion.num_timesteps}, got {k!r}"
        )
    return int(k)


def _patches(diffusion: GaussianDiffusion, x01) -> torch.Tensor:
    """Validated float32 CPU patches of the model's size (BTDInputError otherwise)."""
    return as_patch_tensor(x01, diffusion.image_size[0], "patches")


@torch.inference_mode()
def _residuals(
    diffusion: GaussianDiffusion,
    x_all: torch.Tensor,
    k: int,
    forward_noise: bool,
    seed: int,
    batch_size: int,
) -> np.ndarray:
    """Residual maps x0 - x_after for validated patches (see module docstring)."""
    k = _check_steps(diffusion, k)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BTDConfigError("batch_size", f"must be a positive integer, got {batch_size!r}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise BTDConfigError("seed", f"must be a non-negative integer, got {seed!r}")
    out = np.empty((x_all.shape[0], *x_all.shape[-2:]), dtype=np.float32)
    with _deterministic_eval(diffusion) as device:
        for lo in range(0, x_all.shape[0], batch_size):
            x0 = diffusion.normalize(x_all[lo : lo + batch_size].to(device))
            gens = _patch_generators(seed, lo, x0.shape[0]) if (k > 1 or forward_noise) else []
            x = x0
            if forward_noise:
                times = torch.full((x0.shape[0],), k - 1, device=device, dtype=torch.long)
                x = diffusion.q_sample(x0, times, noise=_noise(gens, tuple(x0.shape[1:]), device))
            for t in reversed(range(k)):
                x = _step(diffusion, x, t, gens)
            out[lo : lo + x0.shape[0]] = (x0 - x)[:, 0].float().cpu().numpy()
    return out


def backward(
    diffusion: GaussianDiffusion, x01, k: int = 1, seed: int = 0, batch_size: int = 64
) -> np.ndarray:
    """Residual maps (B, P, P) of k backward steps from x0 treated as x_k (k = 1: BTD)."""
    x = _patches(diffusion, x01)
    return _residuals(diffusion, x, k, forward_noise=False, seed=seed, batch_size=batch_size)


def forward_backward(
    diffusion: GaussianDiffusion, x01, k: int, seed: int = 0, batch_size: int = 64
) -> np.ndarray:
    """Residual maps (B, P, P) of the F&B baseline: q_sample to t = k-1, then k backward steps."""
    x = _patches(diffusion, x01)
    return _residuals(diffusion, x, k, forward_noise=True, seed=seed, batch_size=batch_size)


def window_origin(size: int, window: int, centre: float) -> int:
    """First row/column of a `window`-wide square centred at `centre`, shifted to fit the patch."""
    start = int(round(float(centre))) - window // 2
    return min(max(start, 0), size - window)


def check_window(n: int, h: int, w: int, window: int | None, centres) -> np.ndarray | None:
    """Validate `window` and `centres` for n patches of h x w; return centres as (n, 2) floats."""
    if window is None:
        return None
    if (
        not isinstance(window, int | np.integer)
        or isinstance(window, bool)
        or not 1 <= window <= min(h, w)
    ):
        raise BTDConfigError("window", f"must be an integer in 1..{min(h, w)}, got {window!r}")
    if centres is None:
        return np.tile([h // 2, w // 2], (n, 1)).astype(np.float64)
    try:
        out = np.asarray(centres, dtype=np.float64)
    except (TypeError, ValueError):
        raise BTDInputError("centres", "not an array of (cy, cx) numbers") from None
    if out.shape != (n, 2) or not np.isfinite(out).all():
        raise BTDInputError(
            "centres", f"expected finite (cy, cx) pairs of shape ({n}, 2), got {out.shape}"
        )
    return out


def window_scores(
    residual_maps: np.ndarray, window: int | None = None, centres: np.ndarray | None = None
) -> np.ndarray:
    """mean(r^2) per patch, over the whole patch or a `window` square at each centre (cy, cx).

    `centres` are patch pixel coordinates, shape (B, 2); None = the patch centre (P // 2). Windows
    that would cross the border are shifted inside, never cropped (every score averages the same
    number of pixels).
    """
    r2 = np.square(np.asarray(residual_maps, dtype=np.float64))
    if r2.ndim != 3:
        raise BTDInputError("residual_maps", f"expected shape (B, P, P), got {r2.shape}")
    if window is None:
        return r2.mean(axis=(1, 2))
    n, h, w = r2.shape
    centres = check_window(n, h, w, window, centres)
    scores = np.empty(n, dtype=np.float64)
    for i, (cy, cx) in enumerate(centres):
        y0, x0 = window_origin(h, window, cy), window_origin(w, window, cx)
        scores[i] = r2[i, y0 : y0 + window, x0 : x0 + window].mean()
    return scores


def score(
    diffusion: GaussianDiffusion,
    x01,
    steps: int = 1,
    window: int | None = None,
    centres: np.ndarray | None = None,
    batch_size: int = 64,
    method: str = "backward",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """BTD anomaly scores (B,) and residual maps (B, P, P) for [0, 1] patches (B, 1, P, P).

    Defaults are the paper's detector: one backward step, mean over the patch (removal); pass
    `window=32` (and tumour `centres`) for injection. `steps` > 1 and `method="forward_backward"`
    give the ablations. Higher score = more likely fake.
    """
    if method not in METHODS:
        raise BTDConfigError("method", f"unknown {method!r}; use one of {METHODS}")
    x = _patches(diffusion, x01)
    check_window(len(x), *diffusion.image_size, window, centres)  # fail before the model runs
    maps = _residuals(diffusion, x, steps, method == "forward_backward", seed, batch_size)
    return window_scores(maps, window, centres), maps


def check_finite_scores(scores: np.ndarray, offset: int = 0) -> None:
    """NaN never exceeds a threshold: a NaN score would silently read as 'authentic'."""
    bad = ~np.isfinite(np.asarray(scores, dtype=np.float64))
    if bad.any():
        raise BTDInputError(
            "checkpoint",
            f"the model gave {int(bad.sum())} non-finite (NaN/inf) score(s), the first at site "
            f"{offset + int(np.argmax(bad))}; its weights are probably corrupt (NaN). "
            "Nothing was written",
        )
