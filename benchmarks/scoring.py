"""Scoring throughput: BTD (one backward step) vs a bare U-Net forward vs F&B with 10 steps.

All three run in ONE process on the SAME model and the same patches, so the ratios are
meaningful even on a noisy shared machine. Each measurement: warm-up runs, then several timed
repeats; the median is reported.

    python benchmarks/scoring.py --image-size 48 --dim 16 --dim-mults 1,2,4
    python benchmarks/scoring.py --checkpoint models/ct/checkpoint.pt --device auto
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from btd.atomic import write_json
from btd.detect import score
from btd.diffusion import build_diffusion, load_detector
from btd.diffusion.checkpoint import library_version
from btd.diffusion.train import resolve_device

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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def timed(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per call, round-robin over `fns` so load drifts hit all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    out = {name: {"wall_s": [], "cpu_s": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            out[name]["wall_s"].append(time.perf_counter() - w0)
            out[name]["cpu_s"].append(time.process_time() - c0)
    return out


def bare_forward(diffusion, x: torch.Tensor, batch_size: int) -> Callable[[], None]:
    """Just `unet(x, t)` over the patches: the floor any one-network-call scorer can reach."""
    device = diffusion.betas.device

    @torch.inference_mode()
    def run() -> None:
        for lo in range(0, len(x), batch_size):
            xb = x[lo : lo + batch_size].to(device) * 2 - 1
            diffusion.model(xb, torch.zeros(len(xb), dtype=torch.long, device=device))

    return run


def machine_info(device: torch.device) -> dict[str, object]:
    """Where the numbers came from."""
    info: dict[str, object] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "denoising_diffusion_pytorch": library_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the three measurements and write the JSON report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.checkpoint:
        diffusion, config = load_detector(args.checkpoint, device)
        size, dim, mults = config.image_size, config.dim, tuple(config.dim_mults)
    else:
        size, dim = args.image_size, args.dim
        mults = tuple(int(m) for m in args.dim_mults.split(","))
        diffusion = build_diffusion(size, dim, mults, seed=0).to(device).eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((args.n_patches, 1, size, size), dtype=np.float32))

    runs = {
        "bare_unet": bare_forward(diffusion, x, args.batch_size),
        "btd": lambda: score(diffusion, x, batch_size=args.batch_size),
        f"fb{args.fb_steps}": lambda: score(
            diffusion, x, steps=args.fb_steps, method="forward_backward", batch_size=args.batch_size
        ),
    }
    results = {}
    load_before = os.getloadavg()[0]
    for name, t in timed(runs, device, args.repeats, args.warmup).items():
        wall, cpu = statistics.median(t["wall_s"]), statistics.median(t["cpu_s"])
        results[name] = {
            "median_wall_s": wall,
            "median_cpu_s": cpu,
            "patches_per_s": args.n_patches / wall,
            "patches_per_cpu_s": args.n_patches / cpu,
            **t,
        }
        print(f"{name:>10}: {args.n_patches / wall:9.2f} patches/s (median of {args.repeats})")
    fb = f"fb{args.fb_steps}"
    report = {
        "model": {
            "image_size": size,
            "dim": dim,
            "dim_mults": list(mults),
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        },
        "settings": {
            "n_patches": args.n_patches,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "fb_steps": args.fb_steps,
        },
        "results": results,
        "ratios": {
            "btd_over_bare": results["btd"]["patches_per_s"]
            / results["bare_unet"]["patches_per_s"],
            f"{fb}_over_btd": results[fb]["patches_per_s"] / results["btd"]["patches_per_s"],
            "btd_over_bare_cpu": results["btd"]["patches_per_cpu_s"]
            / results["bare_unet"]["patches_per_cpu_s"],
            f"{fb}_over_btd_cpu": results[fb]["patches_per_cpu_s"]
            / results["btd"]["patches_per_cpu_s"],
        },
        "machine": {**machine_info(device), "load_avg_1min": [load_before, os.getloadavg()[0]]},
    }
    write_json(args.out, report)
    print(f"ratios: {report['ratios']}  ->  {args.out}")
    return report


if __name__ == "__main__":
    main()
