"""DDPM construction: lucidrains' `Unet` + `GaussianDiffusion`, configured as in the BTD code.

The paper's code uses the library defaults (sigmoid beta schedule, auto-normalisation of [0, 1]
inputs to [-1, 1], 1000 steps, `pred_noise`); only the U-Net width, depth and image size change
between profiles. Construction is seeded without touching the global RNG, so two builds with the
same seed have identical initial weights (the U-Net's attention memory keys are random).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from denoising_diffusion_pytorch import GaussianDiffusion, Unet

from btd.errors import BTDConfigError, BTDInputError

BETA_SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")


def check_model_size(image_size: int, dim: int, dim_mults: Sequence[int]) -> None:
    """Raise BTDConfigError for sizes the U-Net cannot take (it halves the image per stage)."""
    if not isinstance(image_size, int) or image_size < 8:
        raise BTDConfigError("image_size", f"must be an integer >= 8, got {image_size!r}")
    if not isinstance(dim, int) or dim < 4 or dim % 4:
        raise BTDConfigError("dim", f"must be a positive multiple of 4, got {dim!r}")
    mults = tuple(dim_mults)
    if not mults or not all(isinstance(m, int) and m > 0 for m in mults):
        raise BTDConfigError("dim_mults", f"must be positive integers, got {dim_mults!r}")
    factor = 2 ** (len(mults) - 1)
    if image_size % factor:
        raise BTDConfigError(
            "image_size",
            f"{image_size} is not divisible by {factor} (2**(len(dim_mults)-1) for "
            f"dim_mults={mults}); pick a multiple of {factor}",
        )


def build_diffusion(
    image_size: int,
    dim: int,
    dim_mults: Sequence[int] = (1, 2, 4, 8),
    channels: int = 1,
    timesteps: int = 1000,
    beta_schedule: str = "sigmoid",
    objective: str = "pred_noise",
    sampling_timesteps: int | None = None,
    seed: int | None = None,
    attn_heads: int = 4,
    attn_dim_head: int = 32,
    min_snr_gamma: float = 0.0,
) -> GaussianDiffusion:
    """Build the DDPM the BTD detector is trained as (library defaults, auto_normalize=True).

    `seed` makes the initial weights reproducible; the global torch RNG is left untouched.
    `attn_heads` x `attn_dim_head` (library default 4 x 32, as in the paper) fixes the attention
    width independently of `dim`; at small `dim` on CPU attention is about half the cost of a
    training step, so CPU profiles may shrink it. `min_snr_gamma` > 0 turns on the library's
    min-SNR loss weighting with that gamma (a training recipe; the model is the same).
    """
    check_model_size(image_size, dim, dim_mults)
    if beta_schedule not in BETA_SCHEDULES:
        raise BTDConfigError(
            "beta_schedule", f"unknown {beta_schedule!r}; use one of {BETA_SCHEDULES}"
        )
    if objective not in OBJECTIVES:
        raise BTDConfigError("objective", f"unknown {objective!r}; use one of {OBJECTIVES}")
    if not isinstance(timesteps, int) or timesteps < 2:
        raise BTDConfigError("timesteps", f"must be an integer >= 2, got {timesteps!r}")
    for name, value in (("attn_heads", attn_heads), ("attn_dim_head", attn_dim_head)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BTDConfigError(name, f"must be a positive integer, got {value!r}")
    if sampling_timesteps is not None and not 1 <= sampling_timesteps <= timesteps:
        raise BTDConfigError("sampling_timesteps", f"must be in 1..{timesteps}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        unet = Unet(
            dim=dim,
            dim_mults=tuple(dim_mults),
            channels=channels,
            attn_heads=attn_heads,
            attn_dim_head=attn_dim_head,
        )
        return GaussianDiffusion(
            unet,
            image_size=image_size,
            timesteps=timesteps,
            sampling_timesteps=sampling_timesteps,
            beta_schedule=beta_schedule,
            objective=objective,
            auto_normalize=True,
            min_snr_loss_weight=min_snr_gamma > 0,
            min_snr_gamma=min_snr_gamma if min_snr_gamma > 0 else 5,
        )


def diffusion_loss(
    diffusion: GaussianDiffusion,
    x01: torch.Tensor,
    times: torch.Tensor,
    noise: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Training loss for given times and noise: the library's own forward (normalise + p_losses).

    Passing `times` and `noise` explicitly (library >= 2.0) keeps every random draw under the
    caller's generator.
    """
    return diffusion(x01, times=times, noise=noise, loss_reduction=reduction)


def as_patch_tensor(x, image_size: int | None, source: str) -> torch.Tensor:
    """Validate a batch of [0, 1] patches (N, 1, P, P) and return it as a float32 CPU tensor.

    Accepts numpy arrays or tensors; BTDInputError names `source` for the wrong shape, size,
    non-finite values or values outside [0, 1] (the library maps [0, 1] to [-1, 1] itself).
    """
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BTDInputError(source, f"cannot convert to a tensor: {exc}") from None
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4 or t.shape[1] != 1:
        raise BTDInputError(source, f"expected patches of shape (N, 1, P, P), got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise BTDInputError(source, "no patches (empty array)")
    if image_size is not None and tuple(t.shape[-2:]) != (image_size, image_size):
        raise BTDInputError(
            source,
            f"patches are {tuple(t.shape[-2:])} but the model takes {image_size}x{image_size}",
        )
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise BTDInputError(source, "patches contain NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise BTDInputError(source, f"patch values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    return t.clamp(0.0, 1.0)


#: Timestep bands of the validation loss that tell a model of the scanner (t = 0, BTD's only
#: query) from one of image content (large t): [lo, hi) in the library's 0-based indices.
T_BANDS = {"t=0": (0, 1), "t=1-9": (1, 10), "t=10-99": (10, 100), "t=100-999": (100, 1000)}


@torch.no_grad()
def band_losses(
    diffusion: GaussianDiffusion,
    x01: np.ndarray | torch.Tensor,
    bands: dict[str, tuple[int, int]] | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Plain (unweighted) noise-prediction MSE of fixed patches per timestep band.

    Times are spread evenly over each band and the noise is drawn from `seed`, so two models (or
    two checkpoints) are compared on exactly the same problems. Returns {band: mean MSE}.
    """
    bands = T_BANDS if bands is None else bands
    if diffusion.objective != "pred_noise":
        raise BTDConfigError("objective", "band_losses compares noise predictions (pred_noise)")
    x = as_patch_tensor(x01, diffusion.image_size[0], "band_losses patches")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen)
    device = next(diffusion.parameters()).device
    out = {}
    for name, (lo, hi) in bands.items():
        hi = min(hi, diffusion.num_timesteps)
        if not 0 <= lo < hi:
            raise BTDConfigError("bands", f"{name}: empty timestep band [{lo}, {hi})")
        times = torch.linspace(lo, hi - 1, len(x)).round().long()
        total = 0.0
        for i in range(0, len(x), batch_size):
            xb, nb, tb = (a[i : i + batch_size].to(device) for a in (x, noise, times))
            xt = diffusion.q_sample(diffusion.normalize(xb), tb, nb)
            pred = diffusion.model(xt, tb)
            total += float(torch.square(pred - nb).sum())
        out[name] = total / x.numel()
    return out
