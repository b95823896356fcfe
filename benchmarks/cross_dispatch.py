"""Same seed, two SIMD dispatch settings: which outputs are bit-identical, and how far the rest move.

Runs the pipeline (default: the `tiny` profile) in a fresh copy of the repository with NumPy, OpenBLAS
and PyTorch limited to their baseline x86-64 kernels (NPY_DISABLE_CPU_FEATURES, OPENBLAS_CORETYPE,
ATEN_CPU_CAPABILITY), and compares it with a run using everything the CPU offers (a fresh copy too, or
`--reference DIR`, an already reproduced copy). Writes benchmarks/results/cross_dispatch.json:
  - the dvc.lock hashes of data/scans and data/processed (expected: identical),
  - every Table 1 AUC of both runs, the largest difference, and whether each one lies inside the other
    run's bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from btd import profiles  # noqa: E402
from btd.runinfo import cpu_model, environment  # noqa: E402

LIMITED = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Prescott",
    "ATEN_CPU_CAPABILITY": "default",
}


def fresh_copy(dest: Path, profile: str) -> Path:
    """What a clone holds (tracked + untracked-not-ignored files), switched to `profile`."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    profiles.apply(profile, dest / "params.yaml")
    return dest


def reproduce(repo: Path, extra_env: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LIMITED}
    env.update(extra_env, BTD_ROOT=str(repo), PYTHONPATH=str(repo / "src"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    subprocess.run(["dvc", "repro", "--pull"], cwd=repo, env=env, check=True)


def data_hashes(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = lock["stages"]["preprocess"]["outs"]
    return {o["path"]: o["md5"] for o in outs if o["path"] in ("data/scans", "data/processed")}


def compare_tables(a: Path, b: Path) -> tuple[pd.DataFrame, dict]:
    ta = pd.read_csv(a / "results/tables/table1.csv")
    tb = pd.read_csv(b / "results/tables/table1.csv")
    keys = ["scenario", "method"]
    m = ta.merge(tb, on=keys, suffixes=("_full", "_limited"))
    m["diff"] = (m["auc_full"] - m["auc_limited"]).abs()
    m["inside"] = (m["auc_limited"].between(m["auc_lo_full"], m["auc_hi_full"])) & (
        m["auc_full"].between(m["auc_lo_limited"], m["auc_hi_limited"])
    )
    summary = {
        "n_aucs": int(len(m)),
        "identical": int((m["diff"] == 0).sum()),
        "max_abs_diff": float(m["diff"].max()),
        "mean_abs_diff": float(m["diff"].mean()),
        "inside_other_interval": int(m["inside"].sum()),
    }
    return m, summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for the copies")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--reference", type=Path, help="an already reproduced copy (full dispatch)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cross_dispatch.json")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    full = args.reference
    if full is None:
        full = fresh_copy(args.work / "full", args.profile)
        reproduce(full, {})
    limited = fresh_copy(args.work / "limited", args.profile)
    reproduce(limited, LIMITED)
    ha, hb = data_hashes(full), data_hashes(limited)
    table, summary = compare_tables(full, limited)
    cols = ["scenario", "method", "auc_full", "auc_limited", "diff", "inside"]
    report = {
        "cpu": cpu_model(),
        "packages": environment()["packages"],
        "profile": args.profile,
        "limited_dispatch": LIMITED,
        "data_hashes": {"full": ha, "limited": hb, "identical": ha == hb},
        "table1": summary,
        "rows": table[cols].round(4).to_dict(orient="records"),
    }
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(json.dumps({k: report[k] for k in ("cpu", "data_hashes", "table1")}, indent=2))
    return report


if __name__ == "__main__":
    main()
