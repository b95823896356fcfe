"""Fast BTD scoring of the paper-size model: each speed option against the plain fp32 path, side by side.

The paper's detector (dim 32, mults 1,2,4,8, 96x96 patches; about 9 GFLOP per patch) scored by
- `reference_b16`: `btd.detect.score` (the library's `p_sample`), fp32, batch 16 — the baseline;
- `fast_*`: `btd.detect.fast.FastScorer` with channels-last, bf16 autocast, torch.compile and larger
  batches, alone and combined.
Every variant scores the same patches in one process, round-robin. Reduced precision is only kept
if it preserves the ranking: each variant's scores on a test set (real and fake patches of a
`data/deepfakes` scenario, resized to the model's size) are compared with fp32 ones (Spearman
>= 0.999). `--profile` adds a torch.profiler table of the baseline (what bounds it) and the FLOPs.

    python benchmarks/fast_scoring.py                      # paper-size, seeded random weights
    python benchmarks/fast_scoring.py --checkpoint models/ddpm/ct/checkpoint.pt --testset data/deepfakes/DIFF-CT-Remove
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import machine_info, peak_rss_mb, setup_model, timed
from tqdm.auto import tqdm

from btd.atomic import write_json
from btd.attacks.testsets import load_testset
from btd.detect import score
from btd.detect.fast import FastOptions, FastScorer, ranking_check

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fast_scoring.json"

VARIANTS: dict[str, FastOptions] = {
    "fast_fp32_nchw_b16": FastOptions(channels_last=False, batch_size=16),
    "fast_fp32_cl_b16": FastOptions(channels_last=True, batch_size=16),
    "fast_fp32_cl_b64": FastOptions(channels_last=True, batch_size=64),
    "fast_bf16_nchw_b16": FastOptions(precision="bf16", channels_last=False, batch_size=16),
    "fast_bf16_cl_b16": FastOptions(precision="bf16", channels_last=True, batch_size=16),
    "compile_fp32_cl_b16": FastOptions(channels_last=True, compile=True, batch_size=16),
    "compile_bf16_cl_b16": FastOptions(
        precision="bf16", channels_last=True, compile=True, batch_size=16
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="load this model instead of building one")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--dim-mults", default="1,2,4,8")
    p.add_argument("--testset", type=Path, help="a data/deepfakes scenario for the ranking check")
    p.add_argument("--n-patches", type=int, default=32, help="patches per timed run")
    p.add_argument("--n-rank", type=int, default=120, help="test-set patches for the ranking")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="profile the baseline (top ops, FLOPs)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def testset_patches(folder: Path | None, size: int, n: int) -> tuple[np.ndarray, str]:
    """Up to n test-set images resized to size x size (bilinear), or seeded noise images."""
    if folder is not None and (folder / "images.npy").is_file():
        images, _, meta = load_testset(folder)
        idx = np.random.default_rng(0).permutation(len(images))[:n]
        x = torch.from_numpy(images[idx].astype(np.float32))
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.clamp(0, 1).numpy(), f"{folder.name} ({len(idx)} of {len(meta)} images)"
    rng = np.random.default_rng(0)
    smooth = F.avg_pool2d(torch.from_numpy(rng.random((n, 1, size, size), np.float32)), 5, 1, 2)
    return smooth.clamp(0, 1).numpy(), "smoothed seeded noise (no test set found)"


def profile_reference(diffusion, x: np.ndarray) -> dict[str, object]:
    """Top operators of one batch-16 reference call and the U-Net's FLOPs per patch."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    xb = torch.from_numpy(x[:16])
    score(diffusion, xb, batch_size=16)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        score(diffusion, xb, batch_size=16)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    top = [
        {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
         "share": e.self_cpu_time_total / total}
        for e in rows[:15]
    ]  # fmt: skip
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        m = diffusion.model
        m(torch.from_numpy(x[:1]) * 2 - 1, torch.zeros(1, dtype=torch.long))
    return {"top_ops_self_cpu": top, "gflop_per_patch": counter.get_total_flops() / 1e9}


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Time every variant, check its ranking, write the JSON report."""
    args = parse_args(argv)
    diffusion, device, model = setup_model(args)
    size = model["image_size"]
    x_rank, source = testset_patches(args.testset, size, args.n_rank)
    x = x_rank[: args.n_patches]
    if len(x) < args.n_patches:
        x = np.concatenate([x] * (args.n_patches // len(x) + 1))[: args.n_patches]
    names = [v for v in args.variants.split(",") if v]
    scorers = {n: FastScorer(diffusion, VARIANTS[n]) for n in names}

    runs: dict[str, Callable[[], object]] = {
        "reference_b16": lambda: score(diffusion, x, batch_size=16)
    }
    runs.update({n: (lambda s=s: s.score(x)) for n, s in scorers.items()})
    timings = timed(runs, device, args.repeats, args.warmup)  # warm-up includes compilation
    results: dict[str, dict[str, object]] = {}
    ref_scores = score(diffusion, x_rank, batch_size=16)[0]
    for name, t in timings.items():
        wall = statistics.median(t["wall_s"])
        results[name] = {"patches_per_s": len(x) / wall, "median_wall_s": wall, **t}
    base = results["reference_b16"]["patches_per_s"]
    for name in tqdm(names, desc="ranking check"):
        results[name]["ranking"] = ranking_check(ref_scores, scorers[name].score(x_rank)[0])
    for name, r in results.items():
        r["speedup_over_reference_b16"] = r["patches_per_s"] / base
        rank = r.get("ranking", {"spearman": 1.0})
        print(f"{name:>22}: {r['patches_per_s']:8.2f} patches/s  x{r['speedup_over_reference_b16']:.2f}"
              f"  spearman {rank['spearman']:.5f}")  # fmt: skip
    passing = [n for n in names if results[n]["ranking"]["passes"]]
    best = max(passing, key=lambda n: results[n]["patches_per_s"]) if passing else None
    report: dict[str, object] = {
        "model": model,
        "ranking_set": source,
        "settings": {"n_patches": len(x), "repeats": args.repeats, "warmup": args.warmup},
        "results": results,
        "best_passing": best,
        "best_speedup": results[best]["speedup_over_reference_b16"] if best else None,
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine_info(device),
    }  # fmt: skip
    if args.profile:
        report["profile"] = profile_reference(diffusion, x)
        gflop = report["profile"]["gflop_per_patch"]
        report["profile"]["reference_gflop_per_s"] = gflop * base
        if best:
            report["profile"]["best_gflop_per_s"] = gflop * results[best]["patches_per_s"]
    write_json(args.out, report)
    print(f"best ranking-preserving variant: {best}  ->  {args.out}")
    return report


if __name__ == "__main__":
    main()
