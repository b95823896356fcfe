"""The common interface of the unsupervised baselines, input checks and safe save/load.

Every baseline (AE variants, Satellite ViT, SpliceBuster, SpliceRadar, OOD-DDPM) is a `Baseline`:
`fit` on real train/val patches, then `score` patches (higher = more anomalous) and optionally
give a per-pixel `anomaly_map`. A fitted baseline is saved as one torch file holding its registry
name, its constructor params and its `state()`; that file loads with `torch.load(weights_only=True)`,
so no pickled code runs on load. Numpy arrays inside a state are stored as tagged tensors and come
back as numpy arrays.

Contract for subclasses:
- call `super().__init__(**params)` with every constructor keyword argument (plain numbers, strings,
  bools, None, lists/tuples/dicts of those): `load_baseline` rebuilds the object from them;
- `state()` returns tensors, numpy arrays, numbers, strings, lists and dicts only;
- use `check_patches` on every input so a wrong shape fails with one readable `BTDInputError`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from btd.atomic import atomic_path
from btd.errors import BTDConfigError, BTDInputError

FORMAT = "btd-baseline"
FORMAT_VERSION = 1
_ND_TAG = "__ndarray__"
_PLAIN = (int, float, str, bool, type(None))


class Baseline(abc.ABC):
    """An unsupervised detector trained on real patches only; higher score = more anomalous."""

    #: Registry name (see `btd.baselines.registry`); set by every concrete subclass.
    name: ClassVar[str] = ""

    def __init__(self, **params: Any):
        _check_plain(params, "params")
        self.params: dict[str, Any] = dict(params)

    def get_params(self) -> dict[str, Any]:
        """Constructor keyword arguments: enough (with `state()`) to rebuild the fitted object."""
        return dict(self.params)

    @abc.abstractmethod
    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        train_meta: pd.DataFrame | None = None,
        val_meta: pd.DataFrame | None = None,
    ) -> list[dict]:
        """Train on real (N,1,P,P) patches in [0,1]; return history rows (epoch/step, losses)."""

    @abc.abstractmethod
    def score(self, x: np.ndarray) -> np.ndarray:
        """(N,) anomaly scores of (N,1,P,P) patches; higher = more anomalous."""

    def anomaly_map(self, x: np.ndarray) -> np.ndarray | None:
        """(N,P,P) per-pixel anomaly heat map, or None when the method has none."""
        return None

    @abc.abstractmethod
    def state(self) -> dict:
        """Everything `fit` learned (tensors/arrays/numbers/strings only)."""

    @abc.abstractmethod
    def load_state(self, state: dict) -> None:
        """Restore what `state()` returned."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def check_patches(x: Any, source: str = "patches", size: int | None = None) -> np.ndarray:
    """Return `x` as contiguous float32 (N,1,P,P); BTDInputError naming the shape otherwise.

    `size` (when given) is the patch size the model was fitted on: scoring other sizes is refused
    because the networks and thresholds are size specific.
    """
    arr = np.asarray(x)
    if arr.ndim != 4 or arr.shape[1] != 1 or arr.shape[2] != arr.shape[3] or arr.shape[0] == 0:
        raise BTDInputError(
            source, f"expected patches of shape (N,1,P,P) with N>0, got shape {tuple(arr.shape)}"
        )
    if size is not None and arr.shape[2] != size:
        raise BTDInputError(
            source,
            f"expected {size}x{size} patches (the size the model was fitted on), "
            f"got shape {tuple(arr.shape)}",
        )
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise BTDInputError(source, f"expected real-valued patches, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise BTDInputError(source, f"{int((~np.isfinite(arr)).sum())} non-finite values (NaN/inf)")
    return arr


def require_fitted(fitted: bool, name: str) -> None:
    """Scoring an unfitted baseline is a usage error: say so instead of scoring random weights."""
    if not fitted:
        raise BTDConfigError(name, "baseline is not fitted: call fit() or load_baseline() first")


def _check_plain(obj: Any, where: str) -> None:
    """Params must survive `weights_only=True` loading: plain Python values only."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise BTDConfigError(where, f"key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise BTDConfigError(where, f"value of type {type(obj).__name__} is not a plain parameter")


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

    from btd.baselines.registry import make_baseline

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
