"""Safe save/load of fitted baselines: one torch file (registry name, params, state) that loads with
`torch.load(weights_only=True)`, so no pickled code runs. Kept apart from `base` so that the
interface does not import the registry (which imports every implementation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from btd.atomic import atomic_path
from btd.baselines.base import Baseline
from btd.baselines.registry import make_baseline
from btd.errors import BTDConfigError, BTDInputError

FORMAT = "btd-baseline"
FORMAT_VERSION = 1
_ND_TAG = "__ndarray__"


def _encode(obj: Any) -> Any:
    """Numpy arrays/scalars -> tensors/Python numbers so `weights_only=True` can load them."""
    import torch

    if isinstance(obj, np.ndarray):
        return {_ND_TAG: torch.from_numpy(np.ascontiguousarray(obj)).clone()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    """Inverse of `_encode`: tagged tensors become numpy arrays again."""
    if isinstance(obj, dict):
        if set(obj) == {_ND_TAG}:
            return obj[_ND_TAG].numpy()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_decode(v) for v in obj)
    return obj


def save_baseline(baseline: Baseline, path: str | Path) -> Path:
    """Write a fitted baseline atomically (registry name + params + state) as one torch file."""
    import torch

    if not baseline.name:
        raise BTDConfigError(type(baseline).__name__, "baseline class has no registry `name`")
    blob = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": baseline.name,
        "params": baseline.get_params(),
        "state": _encode(baseline.state()),
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return Path(path)


def load_baseline(path: str | Path, **overrides: Any) -> Baseline:
    """Rebuild a saved baseline; `overrides` replace constructor params (e.g. `device="cpu"`)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise BTDInputError(path, "baseline file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on garbage input
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BTDInputError(
            path, f"not a readable baseline file (corrupt or truncated): {first}"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise BTDInputError(path, f"not a BTD baseline file (no format={FORMAT!r})")
    if blob.get("format_version") != FORMAT_VERSION:
        raise BTDInputError(
            path, f"baseline file version {blob.get('format_version')}, expected {FORMAT_VERSION}"
        )
    baseline = make_baseline(blob["name"], **{**blob["params"], **overrides})
    try:
        baseline.load_state(_decode(blob["state"]))
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        if isinstance(exc, BTDInputError | BTDConfigError):
            raise
        raise BTDInputError(path, f"state does not fit baseline {blob['name']!r}: {exc}") from None
    return baseline
