"""Patch files in, score tables out: what `btd score` reads and writes, as library functions.

A patch set is a `.npy` array of [0, 1] patches (N, 1, P, P) or a patch folder (patches.npy +
manifest.csv); window centres come from the manifest's py,px or a CSV with exactly those columns.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from btd.errors import BTDInputError


def load_patch_file(path: Path) -> np.ndarray:
    """(N, 1, P, P) or (N, P, P) [0, 1] patches from a .npy file, with readable errors."""
    if not path.is_file():
        raise BTDInputError(path, "patch file not found")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BTDInputError(path, f"not a readable .npy array ({exc})") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1 or not np.issubdtype(x.dtype, np.number):
        raise BTDInputError(path, f"expected numeric patches (N, 1, P, P), got {x.shape} {x.dtype}")
    return x.astype(np.float32, copy=False)


def load_patches(path: str | Path, split: str | None) -> tuple[np.ndarray, Any]:
    """Patches and a table describing them: a .npy file (index only) or a patch folder."""
    path = Path(path)
    if path.is_dir():
        from btd.data.dataset import load_patch_dataset

        return load_patch_dataset(path, split)
    x = load_patch_file(path)
    return x, pd.DataFrame({"index": np.arange(len(x))})


def read_centres(path: str | Path, n: int) -> np.ndarray:
    """(n, 2) window centres inside the patches from a CSV with exactly the columns py,px (or y,x)."""
    from btd.detect.scan import check_row_widths, read_csv_rows

    path = Path(path)
    if not path.is_file():
        raise BTDInputError(path, "centres file not found")
    header, rows = read_csv_rows(path)
    cols = next((c for c in (["py", "px"], ["y", "x"]) if sorted(header) == sorted(c)), None)
    if cols is None:
        raise BTDInputError(path, f"need exactly the columns py,px (or y,x), found {header}")
    check_row_widths(path, header, rows)
    if len(rows) != n:
        raise BTDInputError(path, f"{len(rows)} centres for {n} patches")
    order = [header.index(c) for c in cols]
    try:
        values = np.array([[float(r[j]) for j in order] for r in rows], dtype=np.float64)
    except ValueError:
        raise BTDInputError(path, "centres must be numbers") from None
    if not np.isfinite(values).all():
        raise BTDInputError(path, "centres must be numbers")
    return values.reshape(-1, 2)


def plus_scores(
    calibration: Any, statistic: np.ndarray, scanners: np.ndarray | None
) -> tuple[np.ndarray, dict[str, str]]:
    """A BTD+ statistic read against the calibration's benign reference: each row against its
    scanner's own when the calibration has one for it (a prepared folder's `scanner` column),
    else the pooled one. Also {scanner: reference used} for the summary line."""
    from btd.detect.calibrate import plus_reference
    from btd.detect.plus import tail_score

    groups = np.full(len(statistic), None, object) if scanners is None else np.asarray(scanners)
    out, used = np.empty(len(statistic), dtype=np.float64), {}
    for g in pd.unique(groups):
        sel = groups == g
        ref, key = plus_reference(calibration, None if g is None else str(g))
        out[sel] = tail_score(statistic[sel], ref)
        used[str(g)] = "own" if key is not None else "pooled"
    return out, used


def score_table(
    diffusion,
    x: np.ndarray,
    table: pd.DataFrame,
    window: int | None,
    centres: np.ndarray | None,
    threshold: float | None,
    batch_size: int,
    transform: Any = None,
) -> tuple[pd.DataFrame, float]:
    """`table` with BTD's score of every patch (and `flagged` at `threshold`), and the seconds it took.

    `transform(scores, maps) -> scores` turns BTD's scores into another score (a BTD+ one) before
    flagging. Non-finite scores are an error (a NaN never exceeds a threshold: it would read as
    authentic).
    """
    from btd.detect.btd import check_finite_scores, score

    t0 = time.perf_counter()
    batch = min(batch_size, max(len(x), 1))
    scores, maps = score(diffusion, x, window=window, centres=centres, batch_size=batch)
    if transform is not None:
        scores = transform(scores, maps)
    check_finite_scores(scores)
    seconds = time.perf_counter() - t0
    table = table.copy()
    table["score"] = scores
    if threshold is not None:
        table["flagged"] = (scores > threshold).astype(int)
    return table, seconds
