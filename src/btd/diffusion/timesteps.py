"""Timestep samplers for DDPM training.

`uniform` is the paper's choice: t ~ U{0, ..., T-1}, each step of the chain trained equally.
`low_t` spends more of the training budget on small t, because BTD only ever queries the model at
t = 0 (one backward step from the clean image). It is a mixture:

    with probability `p_low`:      t = floor(E),  E ~ Exponential(mean=`scale`), truncated to t < T
    with probability `1 - p_low`:  t ~ U{0, ..., T-1}

so the model still learns the whole chain (needed for sampling and for the multi-step ablation)
while the t = 0 noise predictor sees `p_low / (1 - exp(-1/scale))`-fold more updates. The loss is
not re-weighted: the aim is a better t = 0 predictor, not an unbiased ELBO.

All samplers draw from a caller-supplied `torch.Generator`, so training stays resumable exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from btd.errors import BTDConfigError


@dataclass(frozen=True)
class TimestepSampler:
    """Draws a batch of integer timesteps; `pmf` is the exact distribution (for tests/plots)."""

    name: str
    num_timesteps: int
    pmf: torch.Tensor  # float64, shape (T,)
    draw: Callable[[int, torch.Generator], torch.Tensor]

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Return `batch_size` timesteps as a CPU LongTensor."""
        return self.draw(batch_size, generator)


def _uniform(num_timesteps: int) -> TimestepSampler:
    pmf = torch.full((num_timesteps,), 1.0 / num_timesteps, dtype=torch.float64)

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, num_timesteps, (batch_size,), generator=generator)

    return TimestepSampler("uniform", num_timesteps, pmf, draw)


def low_t_pmf(num_timesteps: int, p_low: float, scale: float) -> torch.Tensor:
    """Exact pmf of the `low_t` mixture (discretised, truncated exponential + uniform)."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    # P(floor(E) = t) = exp(-t/scale) * (1 - exp(-1/scale)); renormalised over t < T.
    geometric = torch.exp(-t / scale)
    geometric = geometric / geometric.sum()
    return p_low * geometric + (1.0 - p_low) / num_timesteps


def _low_t(num_timesteps: int, p_low: float = 0.5, scale: float = 20.0) -> TimestepSampler:
    if not 0.0 <= p_low <= 1.0:
        raise BTDConfigError("timestep_kwargs.p_low", f"must be in [0, 1], got {p_low!r}")
    if not (isinstance(scale, int | float) and scale > 0 and math.isfinite(scale)):
        raise BTDConfigError("timestep_kwargs.scale", f"must be a positive number, got {scale!r}")
    pmf = low_t_pmf(num_timesteps, float(p_low), float(scale))
    weights = pmf.to(torch.float32)

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(weights, batch_size, replacement=True, generator=generator)

    return TimestepSampler("low_t", num_timesteps, pmf, draw)


SAMPLERS: dict[str, Callable[..., TimestepSampler]] = {"uniform": _uniform, "low_t": _low_t}


def make_sampler(name: str, num_timesteps: int, **kwargs: float) -> TimestepSampler:
    """Sampler by name: `uniform` (paper) or `low_t` (kwargs `p_low`, `scale`)."""
    if name not in SAMPLERS:
        raise BTDConfigError(
            "timestep_sampler", f"unknown sampler {name!r}; use one of {sorted(SAMPLERS)}"
        )
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise BTDConfigError("timesteps", f"must be a positive integer, got {num_timesteps!r}")
    try:
        return SAMPLERS[name](num_timesteps, **kwargs)
    except TypeError as exc:
        raise BTDConfigError(
            "timestep_kwargs", f"bad arguments for sampler {name!r}: {exc}"
        ) from None
