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
from btd.pipeline import deepfakes as stage


def main() -> None:
    p = yaml.safe_load(Path("params.yaml").read_text())["deepfakes"]
    seed, captured, orig = 0, {}, ldm.dreambooth_finetune

    def spy(generic, *a, **k):  # keep the generic model fit_ldm fine-tunes from
        captured["generic"] = generic
        return orig(generic, *a, **k)

    ldm.dreambooth_finetune = spy
    cfg = stage.ldm_config(p) | {"remover": "dreambooth"}  # the generic remover is captured above
    grid, scfg = stage.ldm_search_config(p)
    out = {}
    for m in ("ct", "mri"):
        scans = {s.patient: s for s in load_scans(Path("data/scans") / m)}
        pixel_mm = next(iter(scans.values())).spacing[1]
        vp, vm = load_patch_dataset(Path("data/processed") / m, "val")
        tp, tman = load_patch_dataset(Path("data/processed") / m, "train")
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
