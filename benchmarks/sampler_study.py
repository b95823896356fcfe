"""Low-t vs uniform timestep sampling: BTD validation AUC against training time, at equal compute.

Both samplers train the default CT detector (params.yaml's `ddpm` section, same seed, same batches
per step, so the same compute per step) on the train patients, with checkpoints every `--every`
steps. After each chunk, BTD scores VALIDATION deepfakes (never the test sets): the deepfakes stage's
diffusion attacker (models/attackers/diffusion_ct.pt, trained on the validation patients) injects
into validation TB sites and removes validation tumours; reals are the validation TM / TB patches.
The AUC (inject: window score; remove: whole patch) is recorded against cumulative training seconds.

Needs `dvc repro deepfakes` first. Writes JSON and a PNG under benchmarks/results/.

    python benchmarks/sampler_study.py --steps 500 --every 100 --samplers uniform,low_t
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import yaml
from _common import machine_info, write_study
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from btd import paths
from btd.attacks import inpaint_ddpm as diff
from btd.data.dataset import load_patch_dataset
from btd.detect import score
from btd.diffusion.checkpoint import load_detector
from btd.diffusion.train import CHECKPOINT_NAME, TrainConfig, train
from btd.params import parse_list

OUT = Path(__file__).resolve().parent / "results"


def validation_fakes(n: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{attack: (images, labels 1 = fake, centres)} on validation CT patients."""
    params = yaml.safe_load((paths.ROOT / "params.yaml").read_text())["deepfakes"]
    patches, man = load_patch_dataset(paths.resolve("data/processed/ct"))
    val = man[man["split"] == "val"]
    attacker = diff.load_attacker(paths.resolve("models/attackers/diffusion_ct.pt"))
    pixel_mm = float(
        yaml.safe_load((paths.ROOT / "params.yaml").read_text())["data"]["ct"]["pixel_mm"]
    )
    rng = np.random.default_rng(seed)
    out = {}
    for attack, site_label, real_label in (("inject", "TB", "TM"), ("remove", "TM", "TB")):
        sites = val[val["label"] == site_label]
        sites = sites.loc[rng.permutation(sites.index.to_numpy())[:n]]
        fakes, _, meta = diff.make_diffusion_fakes(
            attacker, patches[sites.index.to_numpy()], sites.reset_index(drop=True), attack, "ct",
            pixel_mm, val.query("label == 'TM'")["diameter_mm"].to_numpy(),
            ct_mask_px=int(params["ct_mask_px"]), seed=seed,
            cond_scale=float(params["diff_inject_cond_scale"]) if attack == "inject" else 1.0,
        )  # fmt: skip
        reals = val[val["label"] == real_label]
        reals = reals.loc[rng.permutation(reals.index.to_numpy())[:n]]
        images = np.concatenate([patches[reals.index.to_numpy()], fakes])
        labels = np.r_[np.zeros(len(reals)), np.ones(len(fakes))]
        centres = np.concatenate([reals[["py", "px"]].to_numpy(), meta[["py", "px"]].to_numpy()])
        out[attack] = (images, labels, centres.astype(float))
    return out


def config_for(sampler: str, steps: int, every: int, seed: int) -> TrainConfig:
    """The default CT detector's config with the given sampler."""
    params = yaml.safe_load((paths.ROOT / "params.yaml").read_text())
    d = params["ddpm"]
    return TrainConfig(
        image_size=int(params["data"]["ct"]["patch_size"]), dim=int(d["dim"]),
        dim_mults=tuple(parse_list(str(d["dim_mults"]), "ddpm.dim_mults", int)),
        attn_heads=int(d["attn_heads"]), attn_dim_head=int(d["attn_dim_head"]),
        batch_size=int(d["batch_size"]), lr=float(d["lr"]), ema_decay=float(d["ema_decay"]),
        timestep_sampler=sampler, steps=steps, val_every=10**9, ckpt_every=every, seed=seed,
    )  # fmt: skip


def aucs(checkpoint: Path, sets: dict, window: int) -> dict[str, float]:
    """BTD AUC per attack for one checkpoint (EMA weights, as the pipeline scores)."""
    diffusion, _ = load_detector(checkpoint, torch.device("cpu"))
    res = {}
    for attack, (images, labels, centres) in sets.items():
        kw = {"window": window, "centres": centres} if attack == "inject" else {}
        s, _ = score(diffusion, images, **kw)
        res[attack] = float(roc_auc_score(labels, s))
    return res


def run_sampler(sampler: str, args, sets: dict, window: int, train_x: np.ndarray) -> list[dict]:
    """Train in chunks of `every` steps; AUCs after each chunk against cumulative train seconds."""
    rows, seconds = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for step in tqdm(range(args.every, args.steps + 1, args.every), desc=sampler):
            cfg = config_for(sampler, step, args.every, args.seed)
            t0 = time.perf_counter()
            train(train_x, cfg, tmp, resume=True, progress=False)
            seconds += time.perf_counter() - t0
            a = aucs(Path(tmp) / CHECKPOINT_NAME, sets, window)
            rows.append({"sampler": sampler, "step": step, "train_s": seconds, **a})
            print(rows[-1])
    return rows


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the study and write JSON + PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samplers", default="uniform,low_t")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--n-fakes", type=int, default=40, help="fakes (and reals) per attack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the output files (parallel runs)")
    p.add_argument("--merge", nargs="*", help="combine these tagged JSONs into the main report")
    args = p.parse_args(argv)
    if args.merge:
        return merge([Path(f) for f in args.merge])
    torch.set_num_threads(args.threads)
    window = int(yaml.safe_load((paths.ROOT / "params.yaml").read_text())["detect"]["ct_window"])
    sets = validation_fakes(args.n_fakes, args.seed)
    patches, man = load_patch_dataset(paths.resolve("data/processed/ct"))
    train_x = patches[man.index[man["split"] == "train"].to_numpy()]
    rows = []
    for sampler in args.samplers.split(","):
        rows += run_sampler(sampler, args, sets, window, train_x)
    report = {"rows": rows, "settings": vars(args), "machine": machine_info(torch.device("cpu"))}
    write_report(report, args.tag)
    return report


def merge(files: list[Path]) -> dict[str, object]:
    """One report from runs of single samplers made in parallel (`--tag`)."""
    import json

    parts = [json.loads(f.read_text()) for f in files]
    report = {"rows": [r for p in parts for r in p["rows"]],
              "settings": [p["settings"] for p in parts], "machine": parts[0]["machine"]}  # fmt: skip
    write_report(report, "")
    return report


def write_report(report: dict, tag: str) -> None:
    """JSON and the AUC-vs-training-time figure."""
    table = pd.DataFrame(report["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, attack in zip(axes, ("inject", "remove"), strict=True):
        for sampler, g in table.groupby("sampler"):
            ax.plot(g["train_s"], g[attack], marker="o", label=sampler)
        ax.set(title=f"DIFF-CT-{attack} (validation)", xlabel="training seconds (1 CPU thread)")
        ax.axhline(0.5, color="grey", lw=0.5)
    axes[0].set_ylabel("BTD AUC")
    axes[0].legend()
    write_study(fig, report, table, OUT, f"sampler_study{tag}", dpi=120)


if __name__ == "__main__":
    main()
