"""The common interface of the unsupervised baselines and their input checks (saving: `storage`).

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
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from btd.errors import BTDConfigError, BTDInputError

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
