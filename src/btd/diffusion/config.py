"""What defines a DDPM training run (`TrainConfig`) and the model it builds: shared by training and
checkpoint loading, which therefore do not import each other."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from denoising_diffusion_pytorch import GaussianDiffusion

from btd.diffusion.model import build_diffusion, check_model_size
from btd.diffusion.timesteps import TimestepSampler, make_sampler
from btd.errors import BTDConfigError, BTDInputError


@dataclass
class TrainConfig:
    """Everything that defines a training run (model size, optimiser, schedule, bookkeeping).

    Defaults are the default profile's (params.yaml `ddpm:` and `runtime:`; a test keeps them equal),
    so a bare `btd train` trains the pipeline's model.
    """

    image_size: int = 48
    dim: int = 16
    dim_mults: tuple[int, ...] = (1, 2, 4)
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-4
    ema_decay: float = 0.995
    ema_update_every: int = 10
    ema_update_after_step: int = 100
    timestep_sampler: str = "uniform"
    timestep_kwargs: dict[str, float] = field(default_factory=dict)
    #: Min-SNR loss weighting (Hang et al. 2023, the library's `min_snr_loss_weight`) with this
    #: gamma; 0 = off (the paper's plain loss). For pred_noise it DOWN-weights small t.
    min_snr_gamma: float = 0.0
    val_every: int = 100
    ckpt_every: int = 500
    seed: int = 0
    device: str = "cpu"
    hflip: bool = False
    max_grad_norm: float = 1.0
    val_size: int = 256
    channels: int = 1
    timesteps: int = 1000
    beta_schedule: str = "sigmoid"
    objective: str = "pred_noise"
    attn_heads: int = 2
    attn_dim_head: int = 16

    def __post_init__(self) -> None:
        self.dim_mults = tuple(self.dim_mults)
        self.timestep_kwargs = dict(self.timestep_kwargs)

    def validate(self) -> TrainConfig:
        """Raise BTDConfigError naming the first bad field; return self for chaining."""
        check_model_size(self.image_size, self.dim, self.dim_mults)
        positive_ints = (
            "batch_size",
            "steps",
            "ema_update_every",
            "val_every",
            "ckpt_every",
            "val_size",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BTDConfigError(name, f"must be a positive integer, got {value!r}")
        if not isinstance(self.ema_update_after_step, int) or self.ema_update_after_step < 0:
            raise BTDConfigError("ema_update_after_step", "must be a non-negative integer")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise BTDConfigError("lr", f"must be in (0, 1), got {self.lr!r}")
        if not (isinstance(self.ema_decay, int | float) and 0 <= self.ema_decay <= 1):
            raise BTDConfigError("ema_decay", f"must be in [0, 1], got {self.ema_decay!r}")
        if not (isinstance(self.max_grad_norm, int | float) and self.max_grad_norm > 0):
            raise BTDConfigError("max_grad_norm", "must be positive")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise BTDConfigError("seed", f"must be a non-negative integer, got {self.seed!r}")
        for name in ("attn_heads", "attn_dim_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BTDConfigError(name, f"must be a positive integer, got {value!r}")
        if self.channels != 1:
            raise BTDConfigError("channels", "BTD patches are single-channel; channels must be 1")
        resolve_device(self.device)
        if not (isinstance(self.min_snr_gamma, int | float) and self.min_snr_gamma >= 0):
            raise BTDConfigError(
                "min_snr_gamma", f"must be >= 0 (0 = off), got {self.min_snr_gamma!r}"
            )
        self.sampler()  # unknown sampler / bad kwargs -> BTDConfigError
        return self

    def sampler(self) -> TimestepSampler:
        """The configured timestep sampler."""
        return make_sampler(self.timestep_sampler, self.timesteps, **self.timestep_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) for checkpoints and JSON."""
        d = asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> TrainConfig:
        """Build from a dict (params.yaml section or checkpoint); unknown keys are an error.

        With `source` (a file) errors are BTDInputError naming it, else BTDConfigError.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            problem = f"unknown training config keys {unknown}; known: {sorted(known)}"
            if source is not None:
                raise BTDInputError(source, problem)
            raise BTDConfigError(unknown[0], problem)
        return cls(**d)


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available) -> torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BTDConfigError("device", f"not a torch device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BTDConfigError("device", f"{device!r} requested but CUDA is not available")
    return dev


def build_from_config(config: TrainConfig) -> GaussianDiffusion:
    """The diffusion model a config describes, with seeded initial weights (on CPU)."""
    return build_diffusion(
        image_size=config.image_size,
        dim=config.dim,
        dim_mults=config.dim_mults,
        channels=config.channels,
        timesteps=config.timesteps,
        beta_schedule=config.beta_schedule,
        objective=config.objective,
        seed=config.seed,
        attn_heads=config.attn_heads,
        attn_dim_head=config.attn_dim_head,
        min_snr_gamma=config.min_snr_gamma,
    )
