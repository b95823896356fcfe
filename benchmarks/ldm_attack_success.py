"""LDM attack success on validation sites (tumour classifier fooled): DreamBooth remover vs generic.

Default params; writes benchmarks/results/ldm_attack_success.json. Run from the repo root after
`dvc repro preprocess`. Validation patients only (the attacker's own), never the test sets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import yaml

from btd import runinfo
from btd.attacks import latent_inpaint as ldm
from btd.attacks.testsets import TumourClassifier
from btd.data.dataset import load_patch_dataset
from btd.data.scans import load_scans
from btd.params import parse_list
from btd.pipeline import deepfakes as stage


def _split(patches, man, name):
    rows = man[man["split"] == name]
    return patches[rows.index.to_numpy()], rows.reset_index(drop=True)


def main() -> None:
    p = yaml.safe_load(Path("params.yaml").read_text())["deepfakes"]
    seed, captured, orig = 0, {}, ldm.dreambooth_finetune

    def spy(generic, *a, **k):  # keep the generic model fit_ldm fine-tunes from
        captured["generic"] = generic
        return orig(generic, *a, **k)

    ldm.dreambooth_finetune = spy
    ints = lambda key: parse_list(p[key], key, int)  # noqa: E731
    cfg = dict(ae_data=p["ldm_ae_data"], ae_channels=ints("ldm_ae_channels"),
               ae_steps=p["ldm_ae_steps"], unet_channels=ints("ldm_unet_channels"),
               unet_steps=p["ldm_unet_steps"], finetune_steps=p["ldm_finetune_steps"],
               batch_size=p["ldm_batch_size"], lr=p["ldm_lr"], ct_mask_px=p["ct_mask_px"],
               mri_margin_mm=p["mri_margin_mm"], remover="dreambooth",
               remover_max_hu=p["ldm_remover_max_hu"])  # fmt: skip
    scfg = dict(ldm_sites=p["ldm_guidance_sites"], ct_mask_px=p["ct_mask_px"],
                mri_margin_mm=p["mri_margin_mm"], ldm_sample_steps=p["ldm_sample_steps"])  # fmt: skip
    grid = parse_list(p["ldm_guidance_grid"], "ldm_guidance_grid", float)
    out = {}
    for m in ("ct", "mri"):
        patches, man = load_patch_dataset(Path("data/processed") / m)
        scans = {s.patient: s for s in load_scans(Path("data/scans") / m)}
        pixel_mm = next(iter(scans.values())).spacing[1]
        (vp, vm), (tp, tman) = _split(patches, man, "val"), _split(patches, man, "train")
        t0 = time.perf_counter()
        models, _ = stage.fit_ldm(vp, vm, m, pixel_mm, cfg, seed)
        fit_s = time.perf_counter() - t0
        clf = TumourClassifier(seed=seed)
        clf.fit(tp, tman["label"].tolist(), epochs=p["classifier_epochs"])
        args = ({m: (vp, vm)}, {m: scans}, {m: clf}, grid, scfg, seed)
        dream, _ = stage.ldm_guidance_study({m: models}, *args)
        generic_models = {"inject": models["inject"], "remove": captured["generic"]}
        generic, _ = stage.ldm_guidance_study({m: generic_models}, *args)
        table = pd.concat([dream.assign(remover="dreambooth"),
                           generic[generic.attack == "remove"].assign(remover="generic")])  # fmt: skip
        print(m, table.round(3).to_string(), flush=True)
        out[m] = {"fit_seconds": round(fit_s, 1), "study": table.to_dict(orient="records")}
    res = {"cpu": runinfo.cpu_model(), "results": out}
    Path("benchmarks/results/ldm_attack_success.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
