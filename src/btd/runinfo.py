"""How a run ran, kept apart from what it found.

DVC tracks results (params in, metrics out); how fast a run went, on which CPU, with which package
versions and how many threads does not change a result, so none of it is a DVC param or metric:
changing the thread count must not retrain a model, and re-running must not rewrite dvc.lock.

- `runtime()`: the untracked knobs (threads, device, parallel jobs, validation/checkpoint cadence)
  from the `runtime:` section of params.yaml, overridable by environment variables.
- `environment()`: CPU, Python and package versions, compared with requirements.lock.
- `write_run_info(stage, timings)`: both, with the stage's timings, into `runs/<stage>.json`
  (git-ignored), and `summary_lines()` a short table for the executed notebook. Both take an
  optional precomputed `env` so that a stage computes `environment()` once:
  `env = environment(); write_run_info(stage, timings, env=env); summary_lines(env)`.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from btd import paths
from btd.atomic import write_json
from btd.errors import BTDConfigError

RUNS_DIR = "runs"
LOCK_FILE = "requirements.lock"
KEY_PACKAGES = (
    "torch",
    "torchvision",
    "denoising-diffusion-pytorch",
    "numpy",
    "scipy",
    "pandas",
    "scikit-learn",
    "scikit-image",
    "shap",
    "dvc",
    "papermill",
)
_ENV = {
    "threads": "BTD_THREADS",
    "device": "BTD_DEVICE",
    "n_jobs": "BTD_N_JOBS",
    "val_every": "BTD_VAL_EVERY",
    "ckpt_every": "BTD_CKPT_EVERY",
}


@dataclass(frozen=True)
class Runtime:
    """Knobs that change how fast a stage runs, never what it computes."""

    threads: int = 2
    device: str = "cpu"
    n_jobs: int = 2
    val_every: int = 100
    ckpt_every: int = 500


def runtime(params_file: str | Path = "params.yaml") -> Runtime:
    """The `runtime:` section of params.yaml, each field overridable by $BTD_<FIELD>."""
    path = paths.resolve(params_file)
    section = {}
    if path.is_file():
        section = (yaml.safe_load(path.read_text()) or {}).get("runtime") or {}
    if not isinstance(section, dict):
        raise BTDConfigError("runtime", "must be a mapping")
    unknown = set(section) - set(_ENV)
    if unknown:
        raise BTDConfigError(f"runtime.{sorted(unknown)[0]}", f"unknown; known: {sorted(_ENV)}")
    values = {**asdict(Runtime()), **section}
    for field, var in _ENV.items():
        if os.environ.get(var):
            values[field] = os.environ[var]
    out = {}
    for field, value in values.items():
        kind = type(getattr(Runtime(), field))
        try:
            out[field] = kind(value)
        except (TypeError, ValueError):
            raise BTDConfigError(
                f"runtime.{field}", f"cannot read {value!r} as {kind.__name__}"
            ) from None
        if kind is int and out[field] < 1:
            raise BTDConfigError(f"runtime.{field}", f"must be >= 1, got {value!r}")
    if out["device"] not in ("cpu", "cuda", "auto"):
        raise BTDConfigError("runtime.device", f"must be cpu, cuda or auto, got {out['device']!r}")
    return Runtime(**out)


def cpu_model() -> str:
    """The CPU's model name and its widest SIMD (results are compared across CPU kinds)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        name = m.group(1).strip() if m else name
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(f.group(1).split()) if f else set()
    except OSError:
        pass
    simd = [s for s in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if s in flags]
    return f"{name} ({', '.join(simd) or 'no AVX2'}; {os.cpu_count()} logical CPUs)"


def locked_versions(lock_file: str | Path = LOCK_FILE) -> dict[str, str]:
    """name -> version of every `name==version` line of the lock file (names normalised)."""
    path = paths.resolve(lock_file)
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            out[normalise(m.group(1))] = m.group(2)
    return out


def normalise(name: str) -> str:
    """PEP 503 name normalisation (Scikit_Learn == scikit-learn)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """CPU, Python, key package versions, and every installed package that differs from the lock."""
    locked = locked_versions()
    differ = {}
    for name, version in locked.items():
        have = installed_version(name)
        if have is not None and have.split("+")[0] != version.split("+")[0]:
            differ[name] = {"locked": version, "installed": have}
    return {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: installed_version(p) for p in KEY_PACKAGES},
        "lock": LOCK_FILE if locked else None,
        "differs_from_lock": differ,
    }


def write_run_info(
    stage: str,
    timings: dict[str, Any],
    runs_dir: str | Path = RUNS_DIR,
    env: dict[str, Any] | None = None,
) -> Path:
    """runs/<stage>.json: the stage's timings, its runtime knobs and the environment.

    `env` is a precomputed `environment()` (pass the one given to `summary_lines` so that a stage
    reads the environment once); None computes it here.
    """
    info = {
        "stage": stage,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timings": timings,
        "runtime": asdict(runtime()),
        "environment": environment() if env is None else env,
    }
    return write_json(paths.resolve(runs_dir) / f"{stage}.json", info)


def summary_lines(env: dict[str, Any] | None = None) -> list[str]:
    """A few lines for the executed notebook: where and with what this report was made.

    `env` is a precomputed `environment()` (e.g. the one given to `write_run_info`); None
    computes it here.
    """
    if env is None:
        env = environment()
    pk = env["packages"]
    keys = ("torch", "numpy", "scipy", "pandas", "scikit-learn")
    lines = [
        f"CPU: {env['cpu']}; Python {env['python']}",
        "packages: " + ", ".join(f"{k} {pk.get(k)}" for k in keys),
    ]
    if env["differs_from_lock"]:
        lines.append(f"differs from {LOCK_FILE}: " + ", ".join(sorted(env["differs_from_lock"])))
    else:
        lines.append(f"all locked packages as in {LOCK_FILE}" if env["lock"] else "no lock file")
    return lines
