"""Executed reports fit to commit: progress bars collapsed, machine paths relative, no timestamps."""

from __future__ import annotations

import json
import os
from pathlib import Path

from btd.atomic import write_json
from btd.report.notebook import absolute_paths, clean_notebook, clean_report, image_outputs


def _nb(outputs: list[dict]) -> dict:
    return {
        "metadata": {"papermill": {"start_time": "x"}, "kernelspec": {"name": "python3"}},
        "cells": [
            {
                "cell_type": "code",
                "metadata": {"papermill": {"duration": 1.0}, "execution": {"a": 1}, "tags": []},
                "outputs": outputs,
                "source": [],
            }
        ],
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _stream(text: str, name: str = "stderr") -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def test_progress_bar_chunks_collapse_to_their_final_state() -> None:
    outs = [
        _stream("\rtrain:   0%| 0/3"),
        _stream("\rtrain:  33%| 1/3"),
        _stream("\rtrain: 100%| 3/3\n"),
    ]
    outs += [_stream("loss 0.1\n", "stdout")]
    cleaned = clean_notebook(_nb(outs), Path("/nowhere"))
    got = cleaned["cells"][0]["outputs"]
    assert [o["name"] for o in got] == ["stderr", "stdout"]
    assert got[0]["text"] == "train: 100%| 3/3\n"
    assert "papermill" not in cleaned["metadata"]
    assert cleaned["cells"][0]["metadata"] == {"tags": []}


def test_machine_paths_become_relative_and_are_detected(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    text = f"PosixPath('{root}/metrics/x.json') and {root}"
    nb = _nb([{"output_type": "execute_result", "data": {"text/plain": text}, "metadata": {}}])
    assert absolute_paths(nb)
    cleaned = clean_notebook(nb, root)
    assert cleaned["cells"][0]["outputs"][0]["data"]["text/plain"] == (
        "PosixPath('metrics/x.json') and ."
    )
    assert absolute_paths(cleaned) == []


def test_image_data_is_not_mistaken_for_a_path() -> None:
    png = {"output_type": "display_data", "data": {"image/png": "ab+/tmp/xy=="}, "metadata": {}}
    nb = _nb([png])
    assert absolute_paths(nb) == [] and image_outputs(nb) == 1


def test_clean_report_rewrites_in_place(tmp_path: Path) -> None:
    path = tmp_path / "r.ipynb"
    write_json(path, _nb([_stream("\ra\rb\n")]))
    clean_report(path, tmp_path)
    assert json.loads(path.read_text())["cells"][0]["outputs"][0]["text"] == "b\n"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_papermills_injected_cell_gets_a_stable_id() -> None:
    nb = _nb([])
    nb["cells"][0].update(id="a1b2c3d4", metadata={"tags": ["injected-parameters"]})
    assert clean_notebook(nb, Path("/x"))["cells"][0]["id"] == "injected-parameters"


def test_a_bare_returned_path_is_dropped_but_other_results_stay() -> None:
    def result(text: str, **data) -> dict:
        return {"output_type": "execute_result", "data": {"text/plain": text, **data},
                "metadata": {}, "execution_count": 1}  # fmt: skip

    outs = [
        result("PosixPath('reports/figures/x/samples.png')"),
        {
            "output_type": "display_data",
            "data": {"image/png": "iVBOR", "text/plain": "<Figure>"},
            "metadata": {},
        },  # fmt: skip
        result("PosixPath('a.png') and more"),
        result("'reports/figures/x.png'"),
    ]
    got = clean_notebook(_nb(outs), Path("/nowhere"))["cells"][0]["outputs"]
    assert [o["data"]["text/plain"] for o in got] == [
        "<Figure>", "PosixPath('a.png') and more", "'reports/figures/x.png'",
    ]  # fmt: skip
    assert image_outputs({"cells": [{"outputs": got}]}) == 1


def test_committed_reports_name_no_machine_path_and_no_bare_path() -> None:
    from btd.report.notebook import _is_path_repr

    reports = sorted(Path(__file__).resolve().parents[1].joinpath("reports").glob("*.ipynb"))
    assert reports, "no executed reports committed"
    for path in reports:
        nb = json.loads(path.read_text())
        assert not absolute_paths(nb), f"{path.name}: {absolute_paths(nb)[:3]}"
        bare = [o for c in nb["cells"] for o in c.get("outputs", []) if _is_path_repr(o)]
        assert not bare, f"{path.name}: a cell shows a bare path"
