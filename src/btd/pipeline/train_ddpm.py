"""The train_ddpm stage for one modality: train (resuming when possible), calibrate, sample."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from btd.data.dataset import load_patch_dataset, training_data_info
from btd.detect.calibrate import Calibration, calibrate_task, calibration_path
from btd.diffusion.checkpoint import load_detector
from btd.diffusion.train import CHECKPOINT_NAME, TrainConfig, TrainResult, train
from btd.errors import BTDConfigError, BTDInputError
from btd.params import parse_list
from btd.scenarios import BENIGN_LABEL

log = logging.getLogger(__name__)


def train_config(image_size: int, seed: int, modality: str = "ct", **kw) -> TrainConfig:
    """A TrainConfig from the flat papermill parameters (dim_mults arrives as '1,2,4').

    The timestep sampler is chosen per modality (params.yaml `ddpm.<modality>_timestep_sampler`),
    so a bad one is reported under that key, not TrainConfig's field name.
    """
    kw["dim_mults"] = tuple(parse_list(kw["dim_mults"], "ddpm.dim_mults", int))
    try:
        return TrainConfig(image_size=image_size, seed=seed, **kw).validate()
    except BTDConfigError as exc:
        if exc.field != "timestep_sampler":
            raise
        raise BTDConfigError(f"ddpm.{modality}_timestep_sampler", exc.problem) from None


def train_or_resume(
    train_x: np.ndarray,
    val_x: np.ndarray,
    config: TrainConfig,
    out_dir: str | Path,
    data: dict | None = None,
) -> TrainResult:
    """Resume the checkpoint in `out_dir` if it is the same run; otherwise start afresh and say why.

    The model folder is a persistent DVC output, so a killed stage picks up where it stopped, while
    a params change (another model size, sampler, lr) retrains from scratch instead of failing.
    """
    out_dir = Path(out_dir)
    try:
        return train(train_x, config, out_dir, val_patches=val_x, resume=True, data=data)
    except (BTDInputError, BTDConfigError) as exc:
        if not (out_dir / CHECKPOINT_NAME).exists():
            raise
        log.warning("not resuming %s: %s; training from scratch", out_dir / CHECKPOINT_NAME, exc)
        return train(train_x, config, out_dir, val_patches=val_x, resume=False, data=data)


def calibrate(
    diffusion, val_x: np.ndarray, val_manifest, window: int, target_fpr: float, checkpoint: Path
) -> dict[str, Calibration]:
    """Fit the benign-score distribution per task on validation data; save next to the checkpoint.

    Injection is scored in the tumour window and its benign class is real tumours (TM); removal is
    scored over the patch and its benign class is real healthy tissue (TB) (paper section 3.4).
    """
    out = {}
    for task in BENIGN_LABEL:
        out[task] = calibrate_task(diffusion, val_x, val_manifest, task, window, target_fpr)
        out[task].save(calibration_path(checkpoint, task))
    return out


def samples(diffusion, n: int, seed: int, ddim_steps: int = 100) -> np.ndarray:
    """A few generated patches (DDIM, `ddim_steps` steps, eta 0) to eyeball what the model learned."""
    saved = diffusion.sampling_timesteps, diffusion.is_ddim_sampling
    diffusion.sampling_timesteps = min(ddim_steps, diffusion.num_timesteps)
    diffusion.is_ddim_sampling = diffusion.sampling_timesteps < diffusion.num_timesteps
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return diffusion.sample(batch_size=n).cpu().numpy()[:, 0]
    finally:
        diffusion.sampling_timesteps, diffusion.is_ddim_sampling = saved


def run(
    modality: str,
    processed_dir: str | Path,
    model_dir: str | Path,
    config: TrainConfig,
    window: int,
    target_fpr: float,
) -> tuple[TrainResult, dict[str, Calibration], float]:
    """Train + calibrate one modality; returns the result, calibrations and the wall time."""
    t0 = time.perf_counter()
    folder = Path(processed_dir) / modality
    train_x, _ = load_patch_dataset(folder, "train")
    val_x, val_m = load_patch_dataset(folder, "val")
    data = training_data_info(folder)
    result = train_or_resume(train_x, val_x, config, Path(model_dir) / modality, data)
    detector, _ = load_detector(result.checkpoint)
    cals = calibrate(detector, val_x, val_m, window, target_fpr, result.checkpoint)
    return result, cals, time.perf_counter() - t0
