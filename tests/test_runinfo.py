"""btd.runinfo: a stage reads its environment once and passes it to both the run record and the
notebook summary (environment() is slow: it reads the lock and every package's metadata)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from btd import runinfo


@pytest.fixture
def counted_environment(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace runinfo.environment() by a recorder; the list holds one entry per call."""
    real = runinfo.environment()
    calls: list[dict[str, Any]] = []

    def fake() -> dict[str, Any]:
        calls.append(real)
        return real

    monkeypatch.setattr(runinfo, "environment", fake)
    return calls


def test_precomputed_env_is_computed_once_for_record_and_summary(
    tmp_path: Path, counted_environment: list[dict[str, Any]]
) -> None:
    env = runinfo.environment()
    path = runinfo.write_run_info("stage", {"seconds": 1.0}, runs_dir=tmp_path, env=env)
    lines = runinfo.summary_lines(env)
    assert len(counted_environment) == 1
    assert json.loads(path.read_text())["environment"] == json.loads(json.dumps(env))
    assert lines[0].startswith("CPU: ") and lines[1].startswith("packages: ")


def test_without_env_each_function_still_computes_it(
    tmp_path: Path, counted_environment: list[dict[str, Any]]
) -> None:
    """Backwards compatible: the old calls (no env) keep working and give the same output."""
    path = runinfo.write_run_info("stage", {"seconds": 1.0}, runs_dir=tmp_path)
    lines = runinfo.summary_lines()
    assert len(counted_environment) == 2
    env = counted_environment[0]
    assert json.loads(path.read_text())["environment"] == json.loads(json.dumps(env))
    assert lines == runinfo.summary_lines(env)
    assert len(counted_environment) == 2


def test_run_record_stores_the_env_it_is_given(tmp_path: Path) -> None:
    env = {
        "cpu": "test CPU (avx2; 2 logical CPUs)",
        "python": "3.11.0",
        "platform": "test",
        "packages": {p: "1.0" for p in runinfo.KEY_PACKAGES},
        "lock": runinfo.LOCK_FILE,
        "differs_from_lock": {"numpy": {"locked": "1.0", "installed": "2.0"}},
    }
    info = json.loads(runinfo.write_run_info("s", {}, runs_dir=tmp_path, env=env).read_text())
    assert info["environment"] == env
    assert runinfo.summary_lines(env) == [
        "CPU: test CPU (avx2; 2 logical CPUs); Python 3.11.0",
        "packages: torch 1.0, numpy 1.0, scipy 1.0, pandas 1.0, scikit-learn 1.0",
        f"differs from {runinfo.LOCK_FILE}: numpy",
    ]
