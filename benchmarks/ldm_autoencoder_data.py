"""Which images should the LDM attack's autoencoder learn from? Natural photographs vs the attacker's patients.

SD's autoencoder never saw CT or MRI; giving ours the same role means training it on natural images
(scikit-image's bundled photos). But SD's autoencoder is *competent* on medical images because it saw
billions of photos; ours sees 17 for a few CPU minutes. This measures both choices with the default
profile's budget: the round-trip error on *training* patients' patches (seen by neither attacker nor
test set), mean absolute error and high-pass energy after / before (1 = the noise survives).

    python benchmarks/ldm_autoencoder_data.py [--steps 300] [--out benchmarks/results/ldm_autoencoder_data.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from btd import runinfo
from btd.attacks import autoencoder_kl as akl
from btd.data.dataset import load_patch_dataset
from btd.params import parse_list


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processed", default="data/processed")
    ap.add_argument(
        "--steps", type=int, default=None, help="default: params.yaml deepfakes.ldm_ae_steps"
    )
    ap.add_argument("--out", default="benchmarks/results/ldm_autoencoder_data.json")
    args = ap.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())["deepfakes"]
    steps = args.steps or int(params["ldm_ae_steps"])
    cfg = akl.AutoencoderConfig(
        channels=tuple(parse_list(params["ldm_ae_channels"], "ldm_ae_channels", int))
    )
    torch.set_num_threads(runinfo.runtime().threads)
    results = {}
    for m in ("ct", "mri"):
        patches, man = load_patch_dataset(Path(args.processed) / m)
        val = patches[man.index[man.split == "val"].to_numpy()]
        train = patches[man.index[man.split == "train"].to_numpy()[:256]]
        sources = {"natural": akl.natural_crops(patches.shape[-1], 4096, seed=0), "attacker": val}
        for name, images in sources.items():
            ae = akl.build_autoencoder(cfg, seed=0)
            t0 = time.perf_counter()
            akl.fit_autoencoder(ae, images, steps, seed=0)
            results[f"{m}/{name}"] = {
                **{k: round(v, 4) for k, v in akl.reconstruction_error(ae, train).items()},
                "train_seconds": round(time.perf_counter() - t0, 1),
            }
            print(m, name, results[f"{m}/{name}"], flush=True)
    out = {
        "cpu": runinfo.cpu_model(),
        "environment": runinfo.environment(),
        "steps": steps,
        "channels": list(cfg.channels),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
