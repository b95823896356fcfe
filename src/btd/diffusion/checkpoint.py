"""Checkpoints of the BTD diffusion model: atomic save, safe load, readable errors.

A checkpoint is one `torch.save`d dict holding only tensors, dicts, lists, numbers and strings, so
it loads with `torch.load(weights_only=True)` (no arbitrary pickled code runs on load). It holds the
online model, the EMA model (what the detector uses), the optimiser, the step, the training RNG
state, the training config and the loss history: enough to resume a killed run bit-exactly; and
`data`, what the training patches were (modality, pixel spacing, patch size, intensity rule, a
fingerprint), which `btd scan` uses to bring its input to the same geometry.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import pickle
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from denoising_diffusion_pytorch import GaussianDiffusion

from btd.atomic import atomic_path, stale_temp_files
from btd.diffusion.config import TrainConfig, build_from_config
from btd.errors import BTDInputError

FORMAT = "btd-ddpm"
FORMAT_VERSION = 1
#: Config fields that fix the network's shapes or the diffusion schedule.
MODEL_FIELDS = (
    "image_size",
    "dim",
    "dim_mults",
    "channels",
    "timesteps",
    "beta_schedule",
    "objective",
)
REQUIRED_KEYS = ("format", "format_version", "config", "step", "model", "ema")

log = logging.getLogger(__name__)


def library_version() -> str:
    """Installed denoising-diffusion-pytorch version (stored for provenance)."""
    try:
        from denoising_diffusion_pytorch.version import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - very old releases
        return "unknown"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` atomically: a run killed mid-write leaves the previous checkpoint intact."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def remove_stale_temp_checkpoints(path: str | Path) -> list[Path]:
    """Delete what a killed `save_checkpoint(path)` left: its temporary files
    (`.<name>.*.tmp<suffix>` beside `path`, btd.atomic.stale_temp_files), with a log line naming
    them. Only for a resume: no save of `path` may be running. Returns the removed paths."""
    stale = stale_temp_files(path)
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    if stale:
        log.warning(
            "removed %d stale temporary checkpoint file(s) left by an interrupted save: %s",
            len(stale),
            ", ".join(p.name for p in stale),
        )
    return stale


def _short_reason(exc: BaseException) -> str:
    """One line of a torch.load failure, never torch's advice about the weights_only option."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and "Weights only" not in ln]
    return lines[0] if lines else type(exc).__name__


def _pickle_refusal(exc: BaseException) -> str | None:
    """The refusal of a file that holds code, or None when `exc` is not the weights-only unpickler's.

    Says what the file holds and that it was not loaded; it never relays torch's hint, which
    suggests the unsafe option.
    """
    found = re.search(r"GLOBAL (\S+)", str(exc))
    if not isinstance(exc, pickle.UnpicklingError) or found is None:
        return None
    found = f" (it calls {found.group(1)})"
    return (
        f"the file holds pickled Python code{found}, not only weights; it was not loaded, "
        "because loading it could run that code. Use a checkpoint written by `btd train`"
    )


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of the checkpoint file: binds a calibration to the exact weights it was fitted on."""
    path = Path(path)
    if not path.is_file():
        raise BTDInputError(path, "checkpoint file not found")
    return _file_sha256(*_file_key(path))


def _file_key(path: Path) -> tuple[str, int, int]:
    """(path, size, mtime): a rewritten checkpoint gets a new key, so the caches never go stale."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Cached: a scan hashes its checkpoint once, however often it is checked."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=8)
def _step(path: str, size: int, mtime_ns: int) -> int:
    return int(read_checkpoint(path)["step"])


#: What a checkpoint records about its input (None when unknown: checkpoints from before it).
METADATA_FIELDS = ("modality", "pixel_mm", "patch_size", "intensity", "data_sha256")


def checkpoint_metadata(state: dict[str, Any]) -> dict[str, Any]:
    """Modality, pixel spacing, patch size, intensity rule, data fingerprint and step of a model.

    Read from the checkpoint's `data` record (written by `btd train` / the pipeline); older
    checkpoints have none, so those fields are None; the patch size then comes from the config.
    """
    data = state.get("data")
    data = data if isinstance(data, dict) else {}
    meta = {k: data.get(k) for k in METADATA_FIELDS}
    if meta["patch_size"] is None:
        meta["patch_size"] = state.get("config", {}).get("image_size")
    if meta["modality"] not in (None, "ct", "mri"):
        meta["modality"] = None
    pixel = meta["pixel_mm"]
    if isinstance(pixel, bool) or not isinstance(pixel, int | float) or not pixel > 0:
        meta["pixel_mm"] = None
    meta["step"] = int(state["step"])
    return meta


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """`checkpoint_metadata` of a checkpoint file (cached: a scan asks after loading the model)."""
    path = Path(path)
    if not path.is_file():
        raise BTDInputError(path, "checkpoint file not found")
    return copy.deepcopy(_metadata(*_file_key(path)))


@lru_cache(maxsize=8)
def _metadata(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    return checkpoint_metadata(read_checkpoint(path))


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """{'sha256', 'step'} of a checkpoint: what calibration files and scan summaries record."""
    sha = checkpoint_sha256(path)
    return {"sha256": sha, "step": _step(*_file_key(Path(path)))}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on CPU; BTDInputError if missing, corrupt or not a BTD checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise BTDInputError(path, "checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on garbage input
        refusal = _pickle_refusal(exc)
        if refusal is not None:
            raise BTDInputError(path, refusal) from None
        first = _short_reason(exc)
        raise BTDInputError(
            path, f"not a readable torch checkpoint (corrupt, truncated or another format): {first}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise BTDInputError(
            path,
            f"not a BTD diffusion checkpoint (no format={FORMAT!r}; found {keys}); "
            "checkpoints of the original BTD/lucidrains trainer do not fit the 2.x U-Net",
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise BTDInputError(path, f"checkpoint is incomplete, missing {missing}")
    if state["format_version"] > FORMAT_VERSION:
        raise BTDInputError(
            path,
            f"checkpoint format v{state['format_version']} is newer than this code (v{FORMAT_VERSION})",
        )
    return state


def model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The shape-defining part of a config, with tuples/lists normalised for comparison."""
    out = {}
    for key in MODEL_FIELDS:
        value = config.get(key)
        out[key] = list(value) if isinstance(value, list | tuple) else value
    return out


def check_model_config(path: str | Path, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    """BTDInputError naming each differing field when a checkpoint is for another model size."""
    have, want = model_config(stored), model_config(expected)
    diffs = [
        f"{k}={have[k]!r} (checkpoint) vs {want[k]!r} (expected)"
        for k in MODEL_FIELDS
        if have[k] != want[k]
    ]
    if diffs:
        raise BTDInputError(path, "checkpoint is for another model: " + "; ".join(diffs))


def load_module_state(
    module: torch.nn.Module, state_dict: dict, path: str | Path, what: str
) -> None:
    """`load_state_dict(strict=True)` with shape/key mismatches turned into one BTDInputError."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0] if lines else ""
        raise BTDInputError(path, f"{what} weights do not fit the model: {detail}") from None


def load_checkpoint(path: str | Path, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint and, if `expected` (a config dict) is given, check it is the same model."""
    state = read_checkpoint(path)
    if expected is not None:
        check_model_config(path, state["config"], expected)
    return state


def load_detector(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model a checkpoint describes, with its EMA weights, in eval mode on `device`.

    Returns `(diffusion, config)`, `config` a `TrainConfig`. The EMA weights are what the detector
    scores with (the paper's README loads the online weights; EMA is the usual, smoother choice).
    """
    state = read_checkpoint(path)
    config = TrainConfig.from_dict(state["config"], source=str(path))
    diffusion = build_from_config(config)
    load_module_state(diffusion, state["ema"], path, "EMA")
    diffusion.to(device).eval().requires_grad_(False)
    return diffusion, config


def load_online_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GaussianDiffusion, Any]:
    """Like `load_detector` but with the raw (non-EMA) weights, as the paper's README loads them."""
    state = read_checkpoint(path)
    config = TrainConfig.from_dict(state["config"], source=str(path))
    diffusion = build_from_config(config)
    load_module_state(diffusion, state["model"], path, "model")
    diffusion.to(device).eval().requires_grad_(False)
    return diffusion, config
