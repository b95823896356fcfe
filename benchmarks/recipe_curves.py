"""DDPM training recipes against what decides them, on validation data only, against compute.

Each recipe trains the default detector of one modality (params.yaml `ddpm` + `data.<modality>`,
train patients, same seed and batches) in chunks of `--every` steps. After each chunk, from the
EMA weights:

- BTD's AUC on the VALIDATION fakes the deepfakes stage writes (`<valsets>/LDM-<MOD>-*`: the
  SD-faithful attack on the attacker's own patients; never the test sets), and BTD+ two-sided's
  (the same residual read against validation patients' benign residuals, as the score stage
  does), beside the Laplacian control's AUC on the same sets (a no-learning floor);
- the plain validation loss per timestep band (`btd.diffusion.model.T_BANDS`) on validation reals;
- at the last chunk: log10 NPS ratio of DDIM samples over real training patches (0 = the scanner's
  noise texture).

Throughput (images/s of training) per recipe and the CPU model go into the JSON.

    python benchmarks/recipe_curves.py --modality ct --recipes uniform,min_snr --steps 1500 --every 250
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import yaml
from _common import machine_info, write_study
from tqdm.auto import tqdm

from btd import paths
from btd.attacks.testsets import load_testset
from btd.attacks.traces import nps_log_ratio
from btd.data.dataset import load_patch_dataset
from btd.detect.plus import tail_score
from btd.diffusion.checkpoint import load_detector
from btd.diffusion.model import band_losses
from btd.diffusion.train import CHECKPOINT_NAME, TrainConfig, train
from btd.evaluate.metrics import auc
from btd.params import parse_list
from btd.pipeline.score import (
    benign_references,
    btd_plus_all,
    btd_scenario_scores,
    control_reference,
    control_scenario_scores,
)
from btd.pipeline.train_ddpm import samples
from btd.scenarios import BENIGN_LABEL, SCENARIOS, attack_of, modality_of

OUT = Path(__file__).resolve().parent / "results"
#: Recipe -> TrainConfig overrides of the default profile.
RECIPES: dict[str, dict[str, object]] = {
    "uniform": {},  # the paper's (and the default profile's)
    "low_t": {"timestep_sampler": "low_t"},
    "min_snr": {"min_snr_gamma": 5.0},
    "wide": {"dim": 24},
}


def config_for(recipe: str, modality: str, steps: int, every: int, seed: int) -> TrainConfig:
    """The default detector's TrainConfig with the recipe's overrides."""
    params = yaml.safe_load((paths.ROOT / "params.yaml").read_text())
    d = params["ddpm"]
    base = dict(
        image_size=int(params["data"][modality]["patch_size"]), dim=int(d["dim"]),
        dim_mults=tuple(parse_list(str(d["dim_mults"]), "ddpm.dim_mults", int)),
        attn_heads=int(d["attn_heads"]), attn_dim_head=int(d["attn_dim_head"]),
        batch_size=int(d["batch_size"]), lr=float(d["lr"]), ema_decay=float(d["ema_decay"]),
        timestep_sampler=str(d["timestep_sampler"]), steps=steps, val_every=10**9,
        ckpt_every=every, seed=seed,
    )  # fmt: skip
    return TrainConfig(**{**base, **RECIPES[recipe]})


def validation_sets(folder: Path, modality: str) -> dict[str, tuple]:
    """The validation fakes of one modality's LDM scenarios (decoded and pasted back)."""
    names = [s for s in SCENARIOS if s.startswith("LDM-") and modality_of(s) == modality]
    sets = {s: load_testset(folder / s) for s in names if (folder / s).is_dir()}
    if not sets:
        raise SystemExit(f"{folder}: no validation fakes of {modality} (run the deepfakes stage)")
    return sets


def control_aucs(sets: dict, window: int, modality: str) -> tuple[dict, dict]:
    """The Laplacian control's AUC on each validation set, one-sided and read two-sided against
    validation patients' benign patches (the matched floor of BTD and of BTD+ two-sided)."""
    x, man = load_patch_dataset(paths.resolve("data/processed") / modality, "val")
    one, two = {}, {}
    for name, (images, _, meta) in sets.items():
        attack, fake = attack_of(name), meta["fake"].to_numpy()
        benign = np.asarray(x[(man["label"] == BENIGN_LABEL[attack]).to_numpy()])
        ref = control_reference(benign, attack, window)
        s = control_scenario_scores(images, meta, attack, window)
        one[name], two[name] = auc(fake, s), auc(fake, tail_score(s, ref))
    return one, two


def set_aucs(diffusion, sets: dict, window: int, modality: str) -> dict[str, float]:
    """BTD's AUC on each validation set (window at the site for injection, the patch for removal)
    and BTD+ two-sided's (`<set> two-sided`: the same residual against validation patients' benign
    residuals, as the score stage reads it)."""
    refs = benign_references({modality: diffusion}, paths.resolve("data/processed"),
                             {modality: window})  # fmt: skip
    out = {}
    for name, (images, _, meta) in sets.items():
        fake = meta["fake"].to_numpy()
        out[name] = auc(fake, btd_scenario_scores(diffusion, images, meta, attack_of(name), window))
        plus = btd_plus_all({name: (images, None, meta)}, {modality: diffusion}, refs,
                            {modality: window})  # fmt: skip
        out[f"{name} two-sided"] = auc(fake, plus.loc[plus["method"] == "BTD+ two-sided", "score"])
    return out


def run_recipe(recipe: str, args, sets: dict, window: int, train_x, val_x) -> tuple[list, dict]:
    """Train in chunks; after each: AUCs and band losses against cumulative training seconds."""
    rows, seconds, extra = [], 0.0, {}
    with tempfile.TemporaryDirectory() as tmp:
        for step in tqdm(range(args.every, args.steps + 1, args.every), desc=recipe):
            cfg = config_for(recipe, args.modality, step, args.every, args.seed)
            t0 = time.perf_counter()
            train(train_x, cfg, tmp, resume=True, progress=False)
            seconds += time.perf_counter() - t0
            diffusion, _ = load_detector(Path(tmp) / CHECKPOINT_NAME, torch.device("cpu"))
            rows.append({"recipe": recipe, "step": step, "train_s": round(seconds, 1),
                         **set_aucs(diffusion, sets, window, args.modality),
                         **{f"loss {k}": v for k, v in band_losses(diffusion, val_x).items()}})  # fmt: skip
            print(rows[-1], flush=True)
        if args.keep:
            keep = Path(args.keep) / recipe
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / CHECKPOINT_NAME, keep / CHECKPOINT_NAME)
        gen = samples(diffusion, args.n_samples, args.seed, ddim_steps=args.sample_steps)
        freq, ratio = nps_log_ratio(gen, train_x[: args.n_samples * 8])
        extra = {
            "images_per_s": round(args.steps * cfg.batch_size / seconds, 2),
            "sample_nps_log10_ratio": dict(
                zip(np.round(freq, 3).tolist(), np.round(ratio, 3).tolist(), strict=True)
            ),  # fmt: skip
            "sample_nps_mean_abs_log10_ratio": round(float(np.abs(ratio).mean()), 3),
        }
    return rows, extra


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the study and write JSON + PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modality", default="ct", choices=("ct", "mri"))
    p.add_argument("--recipes", default="uniform,min_snr")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--valsets", default="data/deepfakes/validation")
    p.add_argument("--n-val", type=int, default=256, help="validation reals for the band losses")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", help="folder to copy each recipe's final checkpoint into")
    args = p.parse_args(argv)
    unknown = sorted(set(args.recipes.split(",")) - set(RECIPES))
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; known {sorted(RECIPES)}")
    torch.set_num_threads(args.threads)
    params = yaml.safe_load((paths.ROOT / "params.yaml").read_text())
    window = int(params["detect"][f"{args.modality}_window"])
    sets = validation_sets(paths.resolve(args.valsets), args.modality)
    patches, man = load_patch_dataset(paths.resolve("data/processed") / args.modality)
    train_x = patches[man.index[man["split"] == "train"].to_numpy()]
    val_idx = man.index[man["split"] == "val"].to_numpy()
    val_x = patches[np.random.default_rng(args.seed).permutation(val_idx)[: args.n_val]]
    control, control_two_sided = control_aucs(sets, window, args.modality)
    rows, per_recipe = [], {}
    for recipe in args.recipes.split(","):
        r, per_recipe[recipe] = run_recipe(recipe, args, sets, window, train_x, val_x)
        rows += r
    report = {"rows": rows, "recipes": per_recipe, "control_auc": control,
              "control_two_sided_auc": control_two_sided,
              "overrides": {k: RECIPES[k] for k in per_recipe}, "settings": vars(args),
              "machine": machine_info(torch.device("cpu"))}  # fmt: skip
    write_report(report, args.modality)
    return report


def write_report(report: dict, modality: str) -> None:
    """JSON and the figure: AUC per validation set and band losses against training seconds."""
    table = pd.DataFrame(report["rows"])
    sets = list(report["control_auc"])
    bands = [c for c in table.columns if c.startswith("loss ")]
    fig, axes = plt.subplots(2, max(len(sets), len(bands)), figsize=(3.4 * max(len(sets), len(bands)), 6.4),
                             squeeze=False)  # fmt: skip
    for ax, name in zip(axes[0], sets, strict=False):
        for i, (recipe, g) in enumerate(table.groupby("recipe", sort=False)):
            ax.plot(g["train_s"] / 60, g[name], marker="o", color=f"C{i}", label=f"{recipe} BTD")
            if f"{name} two-sided" in g:
                ax.plot(g["train_s"] / 60, g[f"{name} two-sided"], marker="s", ls="--",
                        color=f"C{i}", label=f"{recipe} BTD+ two-sided")  # fmt: skip
        ax.axhline(report["control_auc"][name], color="black", ls=":", lw=1, label="control")
        if name in report.get("control_two_sided_auc", {}):
            ax.axhline(report["control_two_sided_auc"][name], color="black", ls="--", lw=1,
                       label="control two-sided")  # fmt: skip
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set(title=f"{name} (val)", xlabel="training minutes", ylabel="AUC",
               ylim=(0, 1))  # fmt: skip
    axes[0, 0].legend(fontsize=7)
    for ax, band in zip(axes[1], bands, strict=False):
        for recipe, g in table.groupby("recipe", sort=False):
            ax.plot(g["train_s"] / 60, g[band], marker="o", label=recipe)
        ax.set(title=f"validation {band}", xlabel="training minutes", ylabel="noise MSE")
        ax.set_yscale("log")
    for ax in [*axes[0, len(sets) :], *axes[1, len(bands) :]]:
        ax.set_visible(False)
    write_study(fig, report, table, OUT, f"recipe_curves_{modality}")


if __name__ == "__main__":
    main()
