"""Scoring throughput: BTD (one backward step) vs a bare U-Net forward vs F&B-10 vs OOD-DDPM.

All run in ONE process on the SAME model and the same patches, so the ratios are meaningful even
on a noisy shared machine. Each measurement: warm-up runs, then several timed repeats, round-robin;
the median is reported.

- `bare_unet`, `btd` (reference path), `btd_fast` (`btd.detect.fast`, fp32 channels-last) and
  `fb10` score `--n-patches` patches in batches of `--batch-size`;
- OOD-DDPM with its ORIGINAL default settings (marksgraham/ddpm-ood: PLMS with 100 inference steps,
  reconstructions from every 4th of its start points, t = 10, 50, ..., 970: about 1 225 U-Net calls
  per patch; here with the deterministic DDIM sampler at the same step spacing) is too slow to run on
  many CPU patches, so it scores `--ood-patches` patches in one batch, and BTD is timed on the very
  same patches and batch (`btd_same_batch`) for the ratio. `ood_ddpm_cpu_profile` is this
  repository's cut-down default (4 starts, 5 calls per patch) on the same patches.

    python benchmarks/scoring.py --checkpoint models/ddpm/ct/checkpoint.pt
    python benchmarks/scoring.py --image-size 48 --dim 16 --dim-mults 1,2,4 --device auto
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import machine_info, peak_rss_mb, setup_model, timed

from btd.atomic import write_json
from btd.baselines.ood_ddpm import OODDDPM
from btd.detect import score
from btd.detect.fast import FastOptions, FastScorer

#: OOD-DDPM's original start points (MONAI PNDM, 100 steps, inference_skip_factor 4) and step spacing
ORIGINAL_OOD_T_STARTS = tuple(range(10, 1000, 40))
ORIGINAL_OOD_STRIDE = 10

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scoring.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="load this model instead of building one")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--dim-mults", default="1,2,4", help="comma-separated, e.g. 1,2,4,8")
    p.add_argument("--n-patches", type=int, default=64, help="patches scored per timed run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fb-steps", type=int, default=10)
    p.add_argument("--ood-patches", type=int, default=2, help="patches for the OOD-DDPM timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def bare_forward(diffusion, x: torch.Tensor, batch_size: int) -> Callable[[], None]:
    """Just `unet(x, t)` over the patches: the floor any one-network-call scorer can reach."""
    device = diffusion.betas.device

    @torch.inference_mode()
    def run() -> None:
        for lo in range(0, len(x), batch_size):
            xb = x[lo : lo + batch_size].to(device) * 2 - 1
            diffusion.model(xb, torch.zeros(len(xb), dtype=torch.long, device=device))

    return run


def _summary(t: dict[str, list[float]], n: int) -> dict[str, object]:
    wall, cpu = statistics.median(t["wall_s"]), statistics.median(t["cpu_s"])
    return {"median_wall_s": wall, "median_cpu_s": cpu, "patches": n,
            "patches_per_s": n / wall, "patches_per_cpu_s": n / cpu, **t}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the measurements and write the JSON report."""
    args = parse_args(argv)
    diffusion, device, model = setup_model(args)
    size = model["image_size"]
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((args.n_patches, 1, size, size), dtype=np.float32))
    fast = FastScorer(diffusion, FastOptions(batch_size=args.batch_size))
    fb = f"fb{args.fb_steps}"
    runs = {
        "bare_unet": bare_forward(diffusion, x, args.batch_size),
        "btd": lambda: score(diffusion, x, batch_size=args.batch_size),
        "btd_fast": lambda: fast.score(x),
        fb: lambda: score(
            diffusion, x, steps=args.fb_steps, method="forward_backward", batch_size=args.batch_size
        ),
    }
    load_before = os.getloadavg()[0]
    results = {}
    for name, t in timed(runs, device, args.repeats, args.warmup).items():
        results[name] = _summary(t, args.n_patches)
        print(f"{name:>22}: {results[name]['patches_per_s']:10.3f} patches/s")

    # OOD-DDPM: few patches, one batch; BTD on the same patches and batch for the ratio
    xo = x[: args.ood_patches].numpy()
    ood = {
        "ood_ddpm_original": OODDDPM(diffusion=diffusion, t_starts=ORIGINAL_OOD_T_STARTS,
                                     ddim_stride=ORIGINAL_OOD_STRIDE, batch_size=len(xo)),
        "ood_ddpm_cpu_profile": OODDDPM(diffusion=diffusion, batch_size=len(xo)),
    }  # fmt: skip
    runs = {
        "btd_same_batch": lambda: score(diffusion, xo, batch_size=len(xo)),
        **{name: (lambda b=b: b.distances(xo)) for name, b in ood.items()},
    }
    for name, t in timed(runs, device, repeats=1, warmup=0).items():
        results[name] = _summary(t, len(xo))
        print(f"{name:>22}: {results[name]['patches_per_s']:10.4f} patches/s")
    calls = {name: b.unet_calls_per_patch for name, b in ood.items()}

    def ratio(a: str, b: str, key: str = "patches_per_s") -> float:
        return results[a][key] / results[b][key]

    report = {
        "model": model,
        "settings": {"n_patches": args.n_patches, "batch_size": args.batch_size,
                     "repeats": args.repeats, "warmup": args.warmup, "fb_steps": args.fb_steps,
                     "ood_patches": len(xo), "ood_unet_calls_per_patch": calls,
                     "ood_original_t_starts": list(ORIGINAL_OOD_T_STARTS),
                     "ood_original_stride": ORIGINAL_OOD_STRIDE},
        "results": results,
        "ratios": {
            "btd_over_bare": ratio("btd", "bare_unet"),
            "btd_fast_over_bare": ratio("btd_fast", "bare_unet"),
            f"{fb}_over_btd": ratio(fb, "btd"),
            "btd_over_ood_ddpm_original": ratio("btd_same_batch", "ood_ddpm_original"),
            "btd_over_ood_ddpm_cpu_profile": ratio("btd_same_batch", "ood_ddpm_cpu_profile"),
            "btd_over_bare_cpu": ratio("btd", "bare_unet", "patches_per_cpu_s"),
        },
        "peak_rss_mb": peak_rss_mb(),
        "machine": {**machine_info(device), "load_avg_1min": [load_before, os.getloadavg()[0]]},
    }  # fmt: skip
    write_json(args.out, report)
    print(f"ratios: {report['ratios']}  ->  {args.out}")
    return report


if __name__ == "__main__":
    main()
