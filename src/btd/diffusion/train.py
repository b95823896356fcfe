"""Own DDPM training loop over a tensor of patches, resumable bit-exactly.

The library's `Trainer` only reads image folders, so BTD (like the paper's `CT_trainer.py`) needs
its own loop. This one follows the Trainer's recipe (Adam betas (0.9, 0.99), grad-norm clip 1.0,
`ema_pytorch.EMA`) and adds what a pipeline stage needs:

- every random draw (batch indices, flips, timesteps, noise) comes from ONE dedicated CPU
  `torch.Generator`, whose state is checkpointed; the global RNGs are never used, so a run killed
  and resumed from its last checkpoint ends bit-identical to an uninterrupted one (on the same
  device). numpy is not used for any training randomness, so it has no state to save.
- a validation loss on a fixed set (fixed patches, noise and stratified timesteps derived from the
  seed), evaluated with the EMA model, comparable across evaluations; plus the loss at t = 0, the
  only timestep BTD queries.
- atomic checkpoints every `ckpt_every` steps and at the end, and a loss log CSV.
- optional data-parallel training through Hugging Face `accelerate` (`train(..., accelerator=...)`,
  `accelerate launch -m btd.cli train --accelerate ...` for several GPUs or nodes): each step draws
  ONE global batch of `batch_size x num_processes` from the shared generator (every process holds
  the same generator state) and each process trains on its slice, so the run is resumable from the
  same checkpoint format, and with one process it is the plain loop, step for step.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from denoising_diffusion_pytorch import GaussianDiffusion
from ema_pytorch import EMA
from tqdm import tqdm

from btd.atomic import atomic_path
from btd.diffusion.checkpoint import (
    library_version,
    load_checkpoint,
    load_module_state,
    remove_stale_temp_checkpoints,
    save_checkpoint,
)
from btd.diffusion.config import TrainConfig, build_from_config, resolve_device
from btd.diffusion.model import as_patch_tensor, diffusion_loss
from btd.diffusion.timesteps import TimestepSampler
from btd.errors import BTDConfigError, BTDInputError

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINT_NAME = "checkpoint.pt"
LOSS_LOG_NAME = "loss_log.csv"
#: Fields that may change between a run and its resumption (they do not alter the trajectory).
RESUMABLE_FIELDS = ("steps", "val_every", "ckpt_every", "device")
ADAM_BETAS = (0.9, 0.99)


@dataclass
class TrainResult:
    """What `train` hands back: both models, the loss history and where things were written."""

    model: GaussianDiffusion
    ema_model: GaussianDiffusion
    loss_log: list[dict[str, float]]
    checkpoint: Path
    loss_log_csv: Path
    config: TrainConfig
    start_step: int
    end_step: int
    seconds: float

    @property
    def steps_per_second(self) -> float:
        """Training speed of this call (steps run / wall seconds, validation included)."""
        done = self.end_step - self.start_step
        return done / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class _State:
    """The mutable pieces of a run, all of which go into a checkpoint."""

    diffusion: GaussianDiffusion
    ema: EMA
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    loss_log: list[dict[str, float]] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: int = 0


def seed_from(seed: int, *stream: int) -> int:
    """An independent 63-bit seed for a named sub-stream (SeedSequence spawning)."""
    low, high = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return int(low) | (int(high) & 0x7FFFFFFF) << 32


def _new_state(config: TrainConfig, device: torch.device) -> _State:
    diffusion = build_from_config(config).to(device)
    ema = EMA(
        diffusion,
        beta=config.ema_decay,
        update_every=config.ema_update_every,
        update_after_step=config.ema_update_after_step,
    )
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=config.lr, betas=ADAM_BETAS)
    generator = torch.Generator().manual_seed(seed_from(config.seed, 1))
    return _State(diffusion, ema, optimizer, generator)


def _checkpoint_state(
    state: _State, config: TrainConfig, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "data": dict(data or {}),  # what the patches are (btd.data.dataset.training_data_info)
        "config": config.to_dict(),
        "step": state.step,
        "model": state.diffusion.state_dict(),
        "ema": state.ema.ema_model.state_dict(),
        "ema_step": state.ema.step.detach().cpu().clone(),
        "ema_initted": state.ema.initted.detach().cpu().clone(),
        "optimizer": state.optimizer.state_dict(),
        "rng_torch": state.generator.get_state(),
        "loss_log": list(state.loss_log),
        "loss_sum": float(state.loss_sum),
        "loss_count": int(state.loss_count),
        "library_version": library_version(),
        "torch_version": str(torch.__version__),
    }


def _check_resumable(path: Path, stored: dict[str, Any], config: TrainConfig) -> None:
    """A resumed run must follow the same trajectory: only bookkeeping fields may differ."""
    current = config.to_dict()
    for key, value in current.items():
        if key in RESUMABLE_FIELDS or key not in stored:
            continue
        if stored[key] != value:
            raise BTDConfigError(
                key,
                f"is {value!r} but checkpoint {path} was trained with {stored[key]!r}; "
                "restore the value or train into a fresh output folder (resume=False overwrites)",
            )


def _check_same_data(
    path: Path, stored: dict[str, Any] | None, data: dict[str, Any] | None
) -> None:
    """A resumed run must train on the patches it started on: a checkpoint whose recorded data
    fingerprint differs (new patients, another split) is another model, even with the same config."""
    have = (stored or {}).get("data_sha256")
    want = (data or {}).get("data_sha256")
    if have and want and have != want:
        raise BTDInputError(
            path,
            f"was trained on other data (data_sha256 {have[:12]}, now {want[:12]}); "
            "train into a fresh output folder (resume=False overwrites)",
        )


def _restore(state: _State, ckpt: dict[str, Any], path: Path) -> None:
    load_module_state(state.diffusion, ckpt["model"], path, "model")
    load_module_state(state.ema.ema_model, ckpt["ema"], path, "EMA")
    state.ema.step.copy_(ckpt["ema_step"])
    state.ema.initted.copy_(ckpt["ema_initted"])
    try:
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.generator.set_state(ckpt["rng_torch"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise BTDInputError(path, f"optimizer/RNG state does not fit: {exc}") from None
    state.step = int(ckpt["step"])
    state.loss_log = list(ckpt.get("loss_log", []))
    state.loss_sum = float(ckpt.get("loss_sum", 0.0))
    state.loss_count = int(ckpt.get("loss_count", 0))


@dataclass
class ValidationSet:
    """Fixed patches, noise and timesteps: the val loss is comparable across evaluations."""

    patches: torch.Tensor
    noise: torch.Tensor
    times: torch.Tensor

    @classmethod
    def build(cls, patches: torch.Tensor, config: TrainConfig) -> ValidationSet:
        """Up to `val_size` evenly spaced patches; stratified timesteps over 0..T-1."""
        n = min(len(patches), config.val_size)
        index = torch.from_numpy(np.linspace(0, len(patches) - 1, n).round().astype(np.int64))
        gen = torch.Generator().manual_seed(seed_from(config.seed, 2))
        strata = ((torch.arange(n, dtype=torch.float64) + 0.5) * config.timesteps / n).long()
        times = strata[torch.randperm(n, generator=gen)]
        noise = torch.randn((n, *patches.shape[1:]), generator=gen)
        return cls(patches[index].clone(), noise, times)

    @torch.inference_mode()
    def loss(self, diffusion: GaussianDiffusion, batch_size: int, at_t0: bool = False) -> float:
        """Mean denoising loss (per-sample mean, then mean over the set)."""
        device, total = diffusion.betas.device, 0.0
        for lo in range(0, len(self.patches), batch_size):
            sl = slice(lo, lo + batch_size)
            times = torch.zeros_like(self.times[sl]) if at_t0 else self.times[sl]
            per = diffusion_loss(
                diffusion,
                self.patches[sl].to(device),
                times.to(device),
                self.noise[sl].to(device),
                reduction="none",
            )
            total += float(per.sum())
        return total / len(self.patches)


def _draw_batch(
    patches: torch.Tensor,
    config: TrainConfig,
    sampler: TimestepSampler,
    gen: torch.Generator,
    world: int = 1,
    rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch, timesteps and noise, in a fixed draw order from the run's generator.

    With `world` processes the global batch of `batch_size * world` is drawn and this process
    (`rank`) keeps its slice; world = 1 is the single-process draw exactly.
    """
    n = config.batch_size * world
    index = torch.randint(0, len(patches), (n,), generator=gen)
    batch = patches[index]
    if config.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    times = sampler(n, gen)
    noise = torch.randn(batch.shape, generator=gen)
    mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
    return batch[mine], times[mine], noise[mine]


def _train_step(
    state: _State,
    config: TrainConfig,
    batch,
    times,
    noise,
    forward: torch.nn.Module | None = None,
    accelerator: Accelerator | None = None,
) -> torch.Tensor:
    """One optimiser step; `forward` is the (accelerate-wrapped) model to call, default the model."""
    device = state.diffusion.betas.device
    state.diffusion.train()
    model = forward if forward is not None else state.diffusion
    loss = diffusion_loss(model, batch.to(device), times.to(device), noise.to(device))
    state.optimizer.zero_grad(set_to_none=True)
    if accelerator is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.diffusion.parameters(), config.max_grad_norm)
    else:
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(state.diffusion.parameters(), config.max_grad_norm)
    state.optimizer.step()
    state.ema.update()
    return loss.detach()


def _log_entry(state: _State, config: TrainConfig, val: ValidationSet | None, wall: float) -> dict:
    train_loss = state.loss_sum / state.loss_count if state.loss_count else float("nan")
    entry = {
        "step": state.step,
        "train_loss": train_loss,
        "val_loss": float("nan"),
        "val_loss_t0": float("nan"),
    }
    if val is not None:
        eval_bs = 4 * config.batch_size
        entry["val_loss"] = val.loss(state.ema.ema_model, eval_bs)
        entry["val_loss_t0"] = val.loss(state.ema.ema_model, eval_bs, at_t0=True)
    entry["wall_s"] = wall
    state.loss_sum, state.loss_count = 0.0, 0
    return entry


def write_loss_log(path: str | Path, loss_log: list[dict[str, float]]) -> Path:
    """Loss history as CSV (step, train_loss, val_loss, val_loss_t0, wall_s), written atomically."""
    columns = ["step", "train_loss", "val_loss", "val_loss_t0", "wall_s"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(loss_log)
    return Path(path)


def train(
    train_patches: np.ndarray | torch.Tensor,
    config: TrainConfig,
    out_dir: str | Path,
    val_patches: np.ndarray | torch.Tensor | None = None,
    resume: bool = True,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    accelerator: Accelerator | None = None,
    data: dict[str, Any] | None = None,
) -> TrainResult:
    """Train (or resume training) a DDPM on [0, 1] patches (N, 1, P, P).

    Writes `out_dir/checkpoint.pt` every `ckpt_every` steps and at the end, and
    `out_dir/loss_log.csv`. With `resume=True` an existing checkpoint there is continued (config
    must match except `steps`, `val_every`, `ckpt_every`, `device`), and temporary checkpoint files
    a killed save left there are removed first (a logged warning); `resume=False` starts afresh.
    `on_step(step)` is called after every step (progress hooks; tests use it to interrupt).
    `accelerator` (an `accelerate.Accelerator`) trains data-parallel on its device(s): the
    per-process batch is `batch_size`, the main process validates and writes the files.
    `data` (plain types: modality, pixel_mm, patch_size, intensity, data_sha256; see
    `btd.data.dataset.training_data_info`) is stored in the checkpoint so `btd scan` can check
    and match its input; a resumed run without it keeps the stored record.
    """
    config.validate()
    device = accelerator.device if accelerator is not None else resolve_device(config.device)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = accelerator.is_main_process if accelerator is not None else True
    out_dir = Path(out_dir)
    ckpt_path, csv_path = out_dir / CHECKPOINT_NAME, out_dir / LOSS_LOG_NAME
    patches = as_patch_tensor(train_patches, config.image_size, "train_patches")
    val = None
    if val_patches is not None:
        val = ValidationSet.build(
            as_patch_tensor(val_patches, config.image_size, "val_patches"), config
        )

    state = _new_state(config, device)
    if resume and is_main:  # a save killed mid-write left its temporary file behind
        remove_stale_temp_checkpoints(ckpt_path)
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, expected=config.to_dict())
        _check_resumable(ckpt_path, ckpt["config"], config)
        _check_same_data(ckpt_path, ckpt.get("data"), data)
        _restore(state, ckpt, ckpt_path)
        if data is None:
            data = ckpt.get("data")
    forward = None
    if accelerator is not None:
        forward, state.optimizer = accelerator.prepare(state.diffusion, state.optimizer)
    start_step = state.step
    sampler = config.sampler()
    t0 = time.perf_counter()
    wall0 = state.loss_log[-1]["wall_s"] if state.loss_log else 0.0
    running = torch.zeros((), device=device)
    bar = tqdm(
        total=config.steps,
        initial=min(state.step, config.steps),
        disable=not (progress and is_main),
        desc="train ddpm",
    )
    while state.step < config.steps:
        batch, times, noise = _draw_batch(patches, config, sampler, state.generator, world, rank)
        running += _train_step(state, config, batch, times, noise, forward, accelerator)
        state.step += 1
        state.loss_count += 1
        at_end = state.step == config.steps
        if state.step % config.val_every == 0 or state.step % config.ckpt_every == 0 or at_end:
            if accelerator is not None and world > 1:  # mean over processes
                running = accelerator.reduce(running, reduction="mean")
            state.loss_sum += float(running)  # sync with the device only here
            running.zero_()
        if state.step % config.val_every == 0 or at_end:
            entry = _log_entry(
                state, config, val if is_main else None, wall0 + time.perf_counter() - t0
            )
            state.loss_log.append(entry)
            bar.set_postfix(loss=f"{entry['train_loss']:.4f}", val=f"{entry['val_loss']:.4f}")
        if state.step % config.ckpt_every == 0 or at_end:
            if is_main:
                save_checkpoint(ckpt_path, _checkpoint_state(state, config, data))
                write_loss_log(csv_path, state.loss_log)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        bar.update(1)
        if on_step is not None:
            on_step(state.step)
    bar.close()
    if is_main and not ckpt_path.exists():  # resumed a run that had already finished elsewhere
        save_checkpoint(ckpt_path, _checkpoint_state(state, config, data))
    if is_main and not csv_path.exists():
        write_loss_log(csv_path, state.loss_log)
    state.ema.ema_model.eval()
    return TrainResult(
        model=state.diffusion,
        ema_model=state.ema.ema_model,
        loss_log=state.loss_log,
        checkpoint=ckpt_path,
        loss_log_csv=csv_path,
        config=config,
        start_step=start_step,
        end_step=state.step,
        seconds=time.perf_counter() - t0,
    )


MANIFEST_COLUMNS = (
    "index",
    "patient",
    "scanner",
    "split",
    "slice",
    "cy",
    "cx",
    "diameter_mm",
    "label",
)
SPLITS = ("train", "val", "holdout")


def load_split(processed_dir: str | Path, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Patches and manifest rows of one split (see `btd.data.dataset.load_patch_dataset`).

    Adds what training needs on top: a known split name, the manifest columns, finite float32 values.
    """
    from btd.data.dataset import load_patch_dataset

    if split not in SPLITS:
        raise BTDConfigError("split", f"unknown split {split!r}; use one of {SPLITS}")
    manifest_path = Path(processed_dir) / "manifest.csv"
    out, rows = load_patch_dataset(processed_dir, split)
    missing = [c for c in MANIFEST_COLUMNS if c not in rows.columns]
    if missing:
        raise BTDInputError(manifest_path, f"missing columns {missing}")
    if out.shape[1:2] != (1,):
        raise BTDInputError(manifest_path, f"expected patches (N, 1, P, P), got {out.shape}")
    out = out.astype(np.float32, copy=False)
    if out.size and not math.isfinite(float(out.sum())):
        raise BTDInputError(
            Path(processed_dir) / "patches.npy", "patches contain NaN or infinite values"
        )
    return out, rows
