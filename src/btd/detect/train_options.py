"""The config of a `btd train` run: the checkpoint's own when resuming, else the defaults, plus the
options given. Resuming therefore needs no repeated options; an option that would change the model
or the training trajectory is refused by `btd.diffusion.train.train`, naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: TrainConfig fields `btd train` can set from the command line.
TRAIN_OVERRIDES = (
    "steps",
    "batch_size",
    "dim",
    "dim_mults",
    "lr",
    "timestep_sampler",
    "attn_heads",
    "attn_dim_head",
    "val_every",
    "ckpt_every",
    "device",
    "seed",
)


def run_config(overrides: dict[str, Any], image_size: int, checkpoint: Path, fresh: bool):
    """TrainConfig for a run in `checkpoint`'s folder; `overrides` holds only options given."""
    from btd.diffusion.checkpoint import read_checkpoint
    from btd.diffusion.config import TrainConfig

    if checkpoint.is_file() and not fresh:
        base = dict(read_checkpoint(checkpoint)["config"])
    else:
        base = TrainConfig(image_size=image_size).to_dict()
    given = {k: v for k, v in overrides.items() if k in TRAIN_OVERRIDES and v is not None}
    given.setdefault("device", "auto")  # not the stored one: a GPU run may resume on a CPU box
    config = TrainConfig.from_dict({**base, **given, "image_size": image_size}, str(checkpoint))
    return config.validate()
