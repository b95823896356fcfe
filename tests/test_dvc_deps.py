"""DVC reruns exactly what changed: every file a stage's notebook imports (transitively, in `btd`)
is covered by one of the stage's deps, and the stage's params are keys, not whole sections."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


from test_pipeline_contract import STAGES  # noqa: E402  (foreach stages expanded per key)

LAZY_REFERENCE = re.compile(r"^(btd(?:\.\w+)+)(?::\w+)?$")


def _module_file(dotted: str) -> Path | None:
    """src/ path of a `btd...` module or package, or None when it is not one (an attribute)."""
    base = SRC.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(source: str, package: str) -> set[str]:
    """Every `btd` module named by an import statement anywhere in `source` (lazy ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside package `package`
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = LAZY_REFERENCE.match(node.value)  # "btd.x.y:Class" of a lazy registry
            if m:
                names.add(m.group(1))
    return {n for n in names if n == "btd" or n.startswith("btd.")}


def _with_parents(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(source: str) -> set[Path]:
    """Files of every `btd` module the code imports, transitively, with their packages' __init__."""
    seen: set[Path] = set()
    todo = [(m, "btd") for m in _imports(source, "btd")]
    while todo:
        dotted, _ = todo.pop()
        for name in _with_parents(dotted):
            path = _module_file(name)
            if path is None or path in seen:
                continue
            seen.add(path)
            pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
            todo += [(m, pkg) for m in _imports(path.read_text(), pkg)]
    return seen


def _notebook_code(path: Path) -> str:
    nb = json.loads(path.read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    return "\n".join(
        line for c in cells for line in c.splitlines() if not line.startswith(("%", "!"))
    )


def _stage_notebook(stage: dict) -> Path:
    cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
    for cmd in cmds:
        m = re.search(r"papermill\s+(\S+\.ipynb)", cmd)
        if m:
            return ROOT / m.group(1)
    raise AssertionError("no papermill command")


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_import_closure(name: str) -> None:
    stage = STAGES[name]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    notebook = _stage_notebook(stage)
    assert _covered(notebook, deps), f"{name}: its notebook is not a dep"
    missing = sorted(
        p.relative_to(ROOT).as_posix()
        for p in import_closure(_notebook_code(notebook))
        if not _covered(p, deps)
    )
    assert not missing, f"{name}: imports files its deps do not cover: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_are_keys_and_have_a_description(name: str) -> None:
    stage = STAGES[name]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert stage.get("desc"), f"{name}: no desc"
    for key in stage.get("params", []):
        assert isinstance(key, str), key
        node = params
        for part in key.split("."):
            node = node[part]
        assert not isinstance(node, dict), f"{name}: depends on the whole section '{key}'"
        assert not key.startswith("runtime"), f"{name}: runtime knob '{key}' is tracked"


def test_closure_finds_lazy_and_transitive_imports() -> None:
    files = import_closure("def f():\n    from btd.pipeline import preprocess\n")
    rels = {p.relative_to(SRC).as_posix() for p in files}
    assert {"btd/__init__.py", "btd/pipeline/__init__.py", "btd/pipeline/preprocess.py"} <= rels
    assert "btd/errors.py" in rels  # preprocess -> ... -> errors
    lazy = import_closure("REGISTRY = {'ae': 'btd.baselines.autoencoders:ConvAE'}")
    assert SRC / "btd/baselines/autoencoders.py" in lazy


def _import_graph() -> dict[str, set[str]]:
    """module -> the `btd` modules it imports (lazy imports included)."""
    graph = {}
    for f in (SRC / "btd").rglob("*.py"):
        mod = ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        graph[mod] = {n for n in _imports(f.read_text(), pkg) if _module_file(n) and n != mod}
    return graph


def test_no_import_cycles() -> None:
    """Modules form layers: no module imports (even lazily) one that imports it back."""
    graph, state, stack, cycles = _import_graph(), {}, [], []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n in graph and state.get(n) == "open":
                cycles.append(stack[stack.index(n) :] + [n])
            elif n in graph and n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # a package's __init__ re-exporting its children is not a cycle of logic
    real = [
        c for c in cycles if not any(a.startswith(b + ".") for a, b in zip(c, c[1:], strict=False))
    ]
    assert not real, " ; ".join(" -> ".join(c) for c in real[:5])
