"""Shared timing and machine-description helpers of the benchmark scripts."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from btd.diffusion import build_diffusion, load_detector
from btd.diffusion.checkpoint import library_version
from btd.diffusion.train import resolve_device


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


def machine_info(device: torch.device) -> dict[str, object]:
    """Where the numbers came from."""
    from btd.runinfo import cpu_model

    info: dict[str, object] = {
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "denoising_diffusion_pytorch": library_version(),
        "device": str(device),
        "load_avg_1min": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup_model(args) -> tuple[object, torch.device, dict[str, object]]:
    """Threads and device from `args`, then the model: `args.checkpoint` (EMA weights) if given,
    else a seeded random model of `args.image_size`, `args.dim`, `args.dim_mults` ('1,2,4').
    Returns (diffusion in eval mode, device, the model description for the report)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.checkpoint:
        diffusion, cfg = load_detector(args.checkpoint, device)
        size, dim, mults = cfg.image_size, cfg.dim, tuple(cfg.dim_mults)
    else:
        size, dim = args.image_size, args.dim
        mults = tuple(int(m) for m in args.dim_mults.split(","))
        diffusion = build_diffusion(size, dim, mults, seed=0).to(device).eval()
    model = {"image_size": size, "dim": dim, "dim_mults": list(mults),
             "checkpoint": str(args.checkpoint) if args.checkpoint else None}  # fmt: skip
    return diffusion, device, model


def write_study(fig, report: dict, table, out_dir: Path, stem: str, dpi: int = 110) -> None:
    """A study's figure (PNG) and report (JSON) under `out_dir`, and its table on stdout."""
    import matplotlib.pyplot as plt

    from btd.atomic import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=dpi)
    plt.close(fig)
    write_json(out_dir / f"{stem}.json", report)
    print(table.to_string(index=False))
