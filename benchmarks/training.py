"""DDPM training throughput (images/s) and peak memory per profile, side by side in one run.

For each profile (`default` = params.yaml, `tiny`, `paper`), the detector DDPM of that profile (CT
patch size, dim, mults, attention, batch size, timestep sampler) is trained with the project's own
loop (`btd.diffusion.train.train`, fresh, no validation) for `--steps` steps on seeded random patches;
the first `--warmup` steps are excluded. The paper profile on a CPU is slow (about 9 GFLOP per patch
forward, x3 for training, x64 per batch), so keep `--steps` small there.

    python benchmarks/training.py --profiles default,paper --steps 6
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from _common import machine_info, peak_rss_mb

from btd import paths
from btd.atomic import write_json
from btd.diffusion.train import TrainConfig, resolve_device, train
from btd.params import parse_list
from btd.profiles import merge, overrides

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "training.json"


def profile_config(name: str, device: str, steps: int) -> TrainConfig:
    """The CT detector's TrainConfig of a profile (params.yaml + the profile's overrides)."""
    params = yaml.safe_load((paths.ROOT / "params.yaml").read_text())
    if name != "default":
        params = merge(params, overrides(name))
    d = params["ddpm"]
    return TrainConfig(
        image_size=int(params["data"]["ct"]["patch_size"]),
        dim=int(d["dim"]),
        dim_mults=tuple(parse_list(str(d["dim_mults"]), "ddpm.dim_mults", int)),
        attn_heads=int(d["attn_heads"]),
        attn_dim_head=int(d["attn_dim_head"]),
        batch_size=int(d["batch_size"]),
        lr=float(d["lr"]),
        ema_decay=float(d["ema_decay"]),
        timestep_sampler=str(d["ct_timestep_sampler"]),
        steps=steps,
        val_every=10**9,
        ckpt_every=10**9,
        device=device,
    )


def measure(config: TrainConfig, warmup: int) -> dict[str, object]:
    """Train `config.steps` steps; images/s over the steps after `warmup`."""
    rng = np.random.default_rng(0)
    x = rng.random((max(4 * config.batch_size, 64), 1, config.image_size, config.image_size))
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        train(x.astype(np.float32), config, tmp, resume=False, progress=False,
              on_step=lambda _: stamps.append(time.perf_counter()))  # fmt: skip
    timed = np.diff(stamps[warmup:]) if len(stamps) > warmup + 1 else np.diff(stamps)
    sec = float(np.median(timed))
    return {"image_size": config.image_size, "dim": config.dim, "dim_mults": list(config.dim_mults),
            "batch_size": config.batch_size, "timed_steps": len(timed), "median_step_s": sec,
            "images_per_s": config.batch_size / sec, "steps_per_s": 1 / sec}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Measure each profile and write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profiles", default="default,paper")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = {}
    for name in args.profiles.split(","):
        results[name] = measure(profile_config(name, args.device, args.steps), args.warmup)
        results[name]["peak_rss_mb_so_far"] = peak_rss_mb()
        print(f"{name:>8}: {results[name]['images_per_s']:.2f} images/s "
              f"({results[name]['median_step_s']:.2f} s/step)")  # fmt: skip
    report = {"results": results, "settings": vars(args) | {"out": str(args.out)},
              "machine": machine_info(device)}  # fmt: skip
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
