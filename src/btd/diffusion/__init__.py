"""DDPM for BTD: model construction, timestep samplers, training loop, checkpoints."""

from btd.diffusion.checkpoint import load_checkpoint, load_detector, load_online_model
from btd.diffusion.model import as_patch_tensor, build_diffusion
from btd.diffusion.timesteps import TimestepSampler, make_sampler
from btd.diffusion.train import TrainConfig, TrainResult, build_from_config, load_split, train

__all__ = [
    "TimestepSampler",
    "TrainConfig",
    "TrainResult",
    "as_patch_tensor",
    "build_diffusion",
    "build_from_config",
    "load_checkpoint",
    "load_detector",
    "load_online_model",
    "load_split",
    "make_sampler",
    "train",
]
