"""Parameter profiles (default = params.yaml, `paper`, `tiny`, `long`) as overrides on top of params.yaml."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from btd.atomic import write_atomic
from btd.errors import BTDConfigError

PROFILES = ("paper", "tiny", "long")


def overrides(name: str) -> dict[str, Any]:
    """The nested override mapping of a profile."""
    if name not in PROFILES:
        raise BTDConfigError(
            "profile", f"unknown profile '{name}'; known: default (params.yaml), {PROFILES}"
        )
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form `dvc exp run -S` takes."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def merge(base: dict[str, Any], over: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base`; a key the base lacks is a typo, not a new knob."""
    out = dict(base)
    for k, v in over.items():
        where = f"{path}{k}"
        if k not in base:
            raise BTDConfigError(where, "not a key of params.yaml (typo in the profile?)")
        out[k] = merge(base[k], v, where + ".") if isinstance(v, dict) else v
    return out


def set_args(name: str) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`."""
    args: list[str] = []
    for k, v in flatten(overrides(name)).items():
        text = f'"{v}"' if isinstance(v, str) and ("," in v or " " in v) else str(v)
        args += ["-S", f"{k}={text}"]  # quoted: Hydra would read a,b as a sweep
    return args


def apply(name: str, params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """Rewrite params.yaml with the profile's values (comments are lost; git restores the default)."""
    params_path = Path(params_path)
    merged = merge(yaml.safe_load(params_path.read_text()), overrides(name))
    header = f"# params.yaml with the '{name}' profile applied (git checkout params.yaml restores the default)\n"
    write_atomic(
        params_path, lambda p: p.write_text(header + yaml.safe_dump(merged, sort_keys=False))
    )
    return merged
