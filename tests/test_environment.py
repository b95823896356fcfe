"""One locked environment: requirements.lock pins every package; pyproject, environment.yml, the
README's install command and CI all use it; each run records what it ran with (btd.runinfo)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from btd import runinfo

ROOT = Path(__file__).resolve().parents[1]
LOCK = runinfo.locked_versions(ROOT / "requirements.lock")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])
    return [Requirement(r) for r in reqs]


def test_lock_pins_every_declared_dependency_within_its_range() -> None:
    assert len(LOCK) > 100, "the lock must hold the transitive closure, not only the direct deps"
    for req in _declared():
        name = runinfo.normalise(req.name)
        assert name in LOCK, f"{req.name} is declared in pyproject.toml but not locked"
        assert req.specifier.contains(LOCK[name], prereleases=True), (
            f"{req.name}: locked {LOCK[name]} is outside pyproject's {req.specifier}"
        )


def test_installed_environment_is_the_locked_one() -> None:
    differ = runinfo.environment()["differs_from_lock"]
    assert not differ, f"installed packages differ from requirements.lock: {differ}"


def test_environment_yml_readme_and_ci_install_from_the_lock() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert python == ["python=3.11"]
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-r requirements.lock" in pip and '-e ".[dev]"' in pip
    install = 'pip install -r requirements.lock -e ".[dev]"'
    assert install in (ROOT / "README.md").read_text()
    assert "-r requirements.lock" in (ROOT / ".ci" / "run").read_text()
    header = (ROOT / "requirements.lock").read_text().splitlines()[0]
    assert header.startswith("#")


def test_lock_file_has_only_exact_pins() -> None:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert re.match(r"^[A-Za-z0-9_.\-]+==[\w.+\-]+$", line), line


def test_runtime_knobs_come_from_params_and_environment(tmp_path: Path, monkeypatch) -> None:
    from btd.errors import BTDConfigError

    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\nruntime:\n  threads: 3\n  device: cpu\n")
    monkeypatch.delenv("BTD_THREADS", raising=False)
    assert runinfo.runtime(params).threads == 3
    assert runinfo.runtime(params).val_every == runinfo.Runtime().val_every
    monkeypatch.setenv("BTD_THREADS", "1")
    assert runinfo.runtime(params).threads == 1
    monkeypatch.setenv("BTD_THREADS", "many")
    with pytest.raises(BTDConfigError, match="runtime.threads"):
        runinfo.runtime(params)
    monkeypatch.delenv("BTD_THREADS")
    params.write_text("runtime:\n  thread: 3\n")
    with pytest.raises(BTDConfigError, match="runtime.thread"):
        runinfo.runtime(params)


def test_default_runtime_equals_params_yaml() -> None:
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["runtime"]
    assert section == {k: getattr(runinfo.Runtime(), k) for k in section}


def test_run_info_records_timings_cpu_and_versions(tmp_path: Path) -> None:
    path = runinfo.write_run_info("stage", {"seconds": 1.5}, runs_dir=tmp_path)
    info = json.loads(path.read_text())
    assert info["stage"] == "stage" and info["timings"] == {"seconds": 1.5}
    assert info["environment"]["packages"]["numpy"]
    assert "logical CPUs" in info["environment"]["cpu"]
    assert (path.stat().st_mode & 0o044) or (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
