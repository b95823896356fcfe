"""Executed notebooks fit to read and to commit.

papermill stores what a kernel printed as it came: every redraw of a progress bar is an output chunk,
and paths print as the machine's absolute paths. `clean_report` keeps what a reader needs (each
bar's final state, every figure and table), writes paths relative to the repository root, drops
the bare path a cell returned (`PosixPath('reports/figures/...')` beside its figure) and drops the
run-specific metadata (timestamps, durations) that would make dvc.lock and git churn.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from btd.atomic import write_atomic

PACKAGE_SRC = Path(__file__).resolve().parents[2]  # src/ of the installed btd (warnings name it)
VOLATILE_NOTEBOOK_KEYS = ("papermill",)
VOLATILE_CELL_KEYS = ("papermill", "execution", "ExecuteTime")
# An absolute POSIX path into a machine's folders (what must not appear in a committed report).
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:home|root|tmp|work|usr|opt|var|mnt|Users)/[^\s'\"]*")


def _collapse_carriage_returns(text: str) -> str:
    """Each line as a terminal would show it: only what follows its last carriage return."""
    lines = text.split("\n")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in lines)


def _merge_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive stdout (or stderr) chunks become one output, as a terminal would show them."""
    merged: list[dict[str, Any]] = []
    for out in outputs:
        if (
            out.get("output_type") == "stream"
            and merged
            and merged[-1].get("output_type") == "stream"
            and merged[-1].get("name") == out.get("name")
        ):
            merged[-1]["text"] = _text(merged[-1]) + _text(out)
        else:
            merged.append(dict(out))
    for out in merged:
        if out.get("output_type") == "stream":
            out["text"] = _collapse_carriage_returns(_text(out)).replace("\n\n\n", "\n")
    return [o for o in merged if o.get("output_type") != "stream" or o["text"].strip()]


# The repr of a path a cell returned (a figure's save path, a metrics file): not a result to show.
PATH_REPR = re.compile(r"^(?:Posix|Windows)?Path\('[^']*'\)$")


def _is_path_repr(out: dict[str, Any]) -> bool:
    """An execute_result whose only content is a Path's repr (e.g. `viz.save(...)` as a cell's
    last line): the figure itself is shown by its own output, the path is noise."""
    if out.get("output_type") != "execute_result" or set(out.get("data", {})) != {"text/plain"}:
        return False
    return bool(PATH_REPR.match(_text({"text": out["data"]["text/plain"]}).strip()))


def _text(out: dict[str, Any]) -> str:
    text = out.get("text", "")
    return "".join(text) if isinstance(text, list) else text


def relative_paths(text: str, root: Path) -> str:
    """The repository root (and its real path) written as '.', the Python installation as
    '<python>', so reports name no machine folder."""
    for r in sorted({str(root), str(root.resolve())}, key=len, reverse=True):
        text = text.replace(r + "/", "").replace(r, ".")
    for prefix in sorted({sys.prefix, sys.base_prefix}, key=len, reverse=True):
        text = text.replace(prefix, "<python>")
    return text.replace(str(PACKAGE_SRC), "<btd>")


def clean_notebook(nb: dict[str, Any], root: Path) -> dict[str, Any]:
    """A cleaned copy of an executed notebook (see the module docstring)."""
    nb = json.loads(relative_paths(json.dumps(nb), root))
    for key in VOLATILE_NOTEBOOK_KEYS:
        nb.get("metadata", {}).pop(key, None)
    for cell in nb.get("cells", []):
        for key in VOLATILE_CELL_KEYS:
            cell.get("metadata", {}).pop(key, None)
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell["id"] = "injected-parameters"  # papermill draws a random id on every run
        if cell.get("cell_type") == "code":
            outputs = [o for o in cell.get("outputs", []) if not _is_path_repr(o)]
            cell["outputs"] = _merge_streams(outputs)
    return nb


def clean_report(path: str | Path, root: str | Path) -> Path:
    """Clean an executed notebook in place (atomically)."""
    path = Path(path)
    nb = clean_notebook(json.loads(path.read_text()), Path(root))
    text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    return write_atomic(path, lambda p: p.write_text(text))


def absolute_paths(nb: dict[str, Any]) -> list[str]:
    """Absolute machine paths left anywhere in a notebook's text (images' base64 is not text)."""
    text_only = json.loads(json.dumps(nb))
    for cell in text_only.get("cells", []):
        for out in cell.get("outputs", []):
            for mime in [m for m in out.get("data", {}) if m.startswith("image/")]:
                del out["data"][mime]
    return ABSOLUTE_PATH.findall(json.dumps(text_only))


def image_outputs(nb: dict[str, Any]) -> int:
    """How many PNG figures the executed notebook shows."""
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.get("cells", [])
        for out in cell.get("outputs", [])
    )
