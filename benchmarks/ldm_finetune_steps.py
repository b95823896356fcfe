"""LDM attack success on validation sites against the DreamBooth fine-tune length, side by side.

The MRI attacks miss the issue's 0.8 attack-success target; the next lever the CPU budget allows is
longer DreamBooth fine-tunes (injector: malignant patches; remover: healthy ones). This fits the LDM
attacker of one modality on the validation patients (the attacker's own, as the deepfakes stage
does) once per fine-tune length, with every other setting from params.yaml, and runs the stage's
guidance study on validation sites with the stage's tumour classifier (trained on train patients).
The test sets play no part. Run from the repo root after `dvc repro preprocess`, alone:

    python benchmarks/ldm_finetune_steps.py --modality mri --finetune-steps 250,500
    python benchmarks/ldm_finetune_steps.py --finetune-steps 250 --guidance-grid 7.5,10,15 \
        --out benchmarks/results/ldm_guidance_high.json   # does injection keep rising past 7.5?
    python benchmarks/ldm_finetune_steps.py --finetune-steps 250 --set mri_margin_mm=4 \
        --out benchmarks/results/ldm_mri_margin.json   # a wider MRI mask (the attacker's choice)
    python benchmarks/ldm_finetune_steps.py --modality mri --finetune-steps 250 --negative none,opposite \
        --out benchmarks/results/ldm_negative_mri.json   # SD's negative prompt vs the empty one
    python benchmarks/ldm_finetune_steps.py --modality ct --finetune-steps 250 --negative none,opposite \
        --out benchmarks/results/ldm_negative_ct.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from btd import runinfo
from btd.atomic import write_json
from btd.attacks.testsets import TumourClassifier
from btd.data.dataset import load_patch_dataset
from btd.data.scans import load_scans
from btd.params import parse_list
from btd.pipeline import deepfakes as stage

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ldm_finetune_steps.json"


def overrides(items: list[str]) -> dict:
    """`--set KEY=VALUE` pairs as a dict (values read as YAML); a key params.yaml lacks is an error."""
    known = yaml.safe_load(Path("params.yaml").read_text())["deepfakes"]
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(
                f"--set {item!r}: expected KEY=VALUE with KEY a params.yaml deepfakes key"
            )
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modality", default="mri", choices=("ct", "mri"))
    ap.add_argument("--finetune-steps", default="250,500")
    ap.add_argument("--guidance-grid", default=None, help="default: params.yaml ldm_guidance_grid")
    ap.add_argument(
        "--negative",
        default=None,
        help="ldm_negative modes to try, e.g. none,opposite (default: params.yaml)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a params.yaml deepfakes key, e.g. mri_margin_mm=4")  # fmt: skip
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    p = yaml.safe_load(Path("params.yaml").read_text())["deepfakes"] | overrides(args.set)
    seed, m = 0, args.modality
    base = stage.ldm_config(p)
    grid, scfg = stage.ldm_search_config(
        p | ({"ldm_guidance_grid": args.guidance_grid} if args.guidance_grid else {})
    )
    scans = {s.patient: s for s in load_scans(Path("data/scans") / m)}
    pixel_mm = next(iter(scans.values())).spacing[1]
    vp, vm = load_patch_dataset(Path("data/processed") / m, "val")
    tp, tman = load_patch_dataset(Path("data/processed") / m, "train")
    clf = TumourClassifier(seed=seed)
    clf.fit(tp, tman["label"].tolist(), epochs=p["classifier_epochs"])
    if args.negative:  # the modes the stage's search tries, on each fit
        scfg = scfg | {"ldm_negative": stage.negative_modes(args.negative)}
    results = {}
    for steps in parse_list(args.finetune_steps, "--finetune-steps", int):
        t0 = time.perf_counter()
        models, _ = stage.fit_ldm(vp, vm, m, pixel_mm, base | {"finetune_steps": steps}, seed)
        fit_s = time.perf_counter() - t0
        study, _ = stage.ldm_guidance_study(
            {m: models}, {m: (vp, vm)}, {m: scans}, {m: clf}, grid, scfg, seed
        )
        print(f"finetune {steps}: fit {fit_s:.0f} s\n{study.round(3).to_string()}", flush=True)
        results[str(steps)] = {"fit_seconds": round(fit_s, 1),
                               "study": study.to_dict(orient="records")}  # fmt: skip
    report = {"cpu": runinfo.cpu_model(), "modality": m, "params": base, "guidance_grid": grid,
              "negative_modes": scfg["ldm_negative"], "overrides": overrides(args.set),
              "results": results}  # fmt: skip
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
