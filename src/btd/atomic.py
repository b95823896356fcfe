"""Atomic file writes: a killed stage never leaves a half-written output behind."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def default_mode(directory: bool = False) -> int:
    """The mode `open()` / `mkdir()` would give (0o666 / 0o777 less the umask): mkstemp and mkdtemp
    make 0o600 / 0o700 entries, which other users of a shared machine could not read."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _temp_affixes(path: Path) -> tuple[str, str]:
    """(prefix, suffix) of `atomic_path`'s temporary names: `.<name>.<random>.tmp<suffix>`."""
    return f".{path.name}.", ".tmp" + path.suffix


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def stale_temp_files(path: str | Path) -> list[Path]:
    """Temporary files that `atomic_path(path)` writes left behind when killed (kill -9, power
    loss: its `finally` never ran): regular files in `path`'s folder named exactly
    `.<name>.<random>.tmp<suffix>`, `<random>` being mkstemp's letters, digits and underscores.
    Sorted; the caller decides whether to remove them (no write of `path` may be running)."""
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    pattern = re.compile(re.escape(prefix) + "[a-z0-9_]+" + re.escape(suffix))
    if not path.parent.is_dir():
        return []
    return sorted(
        p
        for p in path.parent.iterdir()
        if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink()
    )


def write_atomic(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call `writer(tmp)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically with stable key order (DVC metrics files)."""
    return write_atomic(
        path,
        lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n"),
    )
