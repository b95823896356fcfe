"""The pipeline's wiring: every papermill stage's notebook, parameters and params.yaml agree."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import papermill
import pytest
import yaml

from btd import profiles
from btd.detect.plus import MIN_COUNT
from btd.errors import BTDConfigError

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
VARS = {k: v for d in DVC.get("vars", []) for k, v in d.items()}


def _stages() -> dict[str, dict]:
    """Every stage, with foreach stages expanded per key (${key} substituted; ${item.x} kept)."""
    out = {}
    for name, stage in DVC["stages"].items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        for key in stage["foreach"]:
            text = yaml.safe_dump(stage["do"]).replace("${key}", str(key))
            out[f"{name}@{key}"] = yaml.safe_load(text)
    return out


STAGES = _stages()


def _papermill_cmds() -> list[tuple[str, str]]:
    out = []
    for name, stage in STAGES.items():
        cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        out += [(name, c) for c in cmds if c.strip().startswith("papermill")]
    return out


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize(
    "notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name
)
def test_notebook_is_a_clean_source(notebook: Path) -> None:
    nb = json.loads(notebook.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        "stored outputs"
    )
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"


@pytest.mark.parametrize("stage,cmd", _papermill_cmds(), ids=lambda v: v if len(v) < 30 else "")
def test_stage_parameters_exist_in_notebook_and_params(stage: str, cmd: str) -> None:
    for ref in re.findall(r"\$\{([^}]+)\}", cmd):
        if ref not in VARS and not ref.startswith("item"):
            _lookup(PARAMS, ref)  # KeyError = a ${} that params.yaml lacks
    expanded = re.sub(r"\$\{([^}]+)\}", lambda m: str(VARS.get(m.group(1), "X")), cmd)
    tokens = shlex.split(expanded)
    src, out = tokens[1], tokens[2]
    assert (ROOT / src).is_file(), f"{stage}: notebook {src} missing"
    assert out.startswith("reports/") and Path(out).stem.startswith(Path(src).stem)
    names = {tokens[i + 1] for i, t in enumerate(tokens) if t in ("-p", "-r")}
    declared = set(papermill.inspect_notebook(str(ROOT / src)))
    assert names <= declared, (
        f"{stage}: -p names not in the parameters cell: {sorted(names - declared)}"
    )
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in STAGES[stage].get("outs", [])]
    assert out in outs, f"{stage}: executed notebook {out} must be a stage output"


def test_every_stage_declares_its_notebook_as_dep() -> None:
    for name, cmd in _papermill_cmds():
        src = shlex.split(re.sub(r"\$\{[^}]+\}", "X", cmd))[1]
        assert src in STAGES[name]["deps"], name


@pytest.mark.parametrize("name", profiles.PROFILES)
def test_profiles_only_override_existing_params(name: str) -> None:
    merged = profiles.merge(PARAMS, profiles.overrides(name))
    assert set(profiles.flatten(merged)) == set(profiles.flatten(PARAMS))
    args = profiles.set_args(name)
    assert args[0] == "-S" and len(args) == 2 * len(profiles.flatten(profiles.overrides(name)))


def test_profile_typo_and_unknown_profile_are_clear_errors() -> None:
    with pytest.raises(BTDConfigError, match="data.ct.patch_sise"):
        profiles.merge(PARAMS, {"data": {"ct": {"patch_sise": 3}}})
    with pytest.raises(BTDConfigError, match="unknown profile"):
        profiles.overrides("huge")


def test_profile_apply_rewrites_params(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    profiles.apply("tiny", p)
    assert yaml.safe_load(p.read_text())["data"]["ct"]["patch_size"] == 24


@pytest.mark.parametrize("stage,cmd", _papermill_cmds(), ids=lambda v: v if len(v) < 30 else "")
def test_notebook_defaults_equal_params_yaml(stage: str, cmd: str) -> None:
    """ "Run All" in JupyterLab runs the default experiment: every parameter a stage passes from
    params.yaml has that value as the notebook's own default."""
    import ast

    tokens = shlex.split(re.sub(r"\$\{(pm|strip)\}", "", cmd))
    declared = papermill.inspect_notebook(str(ROOT / tokens[1]))
    for i, t in enumerate(tokens):
        if t not in ("-p", "-r"):
            continue
        name, value = tokens[i + 1], tokens[i + 2]
        ref = re.fullmatch(r"\$\{([^}]+)\}", value)
        if not ref or ref.group(1).startswith("item") or ref.group(1) == "key":
            continue
        expected = _lookup(PARAMS, ref.group(1))
        default = ast.literal_eval(declared[name]["default"])
        assert default == expected, (
            f"{stage}: notebook default {name} = {default!r}, params.yaml {expected!r}"
        )


def test_runtime_knobs_are_not_notebook_parameters() -> None:
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        declared = set(papermill.inspect_notebook(str(nb)))
        knobs = {"threads", "device", "n_jobs", "val_every", "ckpt_every"}
        assert not declared & knobs, (
            f"{nb.name}: runtime knobs {declared & knobs} (use btd.runinfo)"
        )


def test_trainconfig_and_cli_defaults_are_the_default_profile(tmp_path: Path) -> None:
    """A bare `btd train` trains the pipeline's model: TrainConfig's and the CLI's defaults are
    params.yaml's (ddpm, detect, runtime)."""
    from btd import cli
    from btd.detect.train_options import run_config
    from btd.diffusion.config import TrainConfig
    from btd.params import parse_list

    ddpm, runtime = PARAMS["ddpm"], PARAMS["runtime"]
    cfg = TrainConfig()
    for key in ("dim", "attn_heads", "attn_dim_head", "batch_size", "steps", "lr", "ema_decay"):
        assert getattr(cfg, key) == ddpm[key], (
            f"TrainConfig.{key} = {getattr(cfg, key)!r}, params {ddpm[key]!r}"
        )
    # a bare `btd train` trains a CT-sized model, so it takes CT's sampler (as it takes CT's window)
    assert cfg.timestep_sampler == ddpm["ct_timestep_sampler"]
    assert cfg.dim_mults == tuple(parse_list(ddpm["dim_mults"], "ddpm.dim_mults", int))
    assert cfg.image_size == PARAMS["data"]["ct"]["patch_size"]
    for key in ("val_every", "ckpt_every", "device"):
        assert getattr(cfg, key) == runtime[key], key
    assert cli.DEFAULT_WINDOW == PARAMS["detect"]["ct_window"]
    args = cli.build_parser().parse_args(
        ["train", "--patches", str(tmp_path), "--out", str(tmp_path)]
    )
    overrides = {k: getattr(args, k) for k in ("steps", "lr", "dim", "batch_size")}
    config = run_config(overrides, cfg.image_size, tmp_path / "none.pt", fresh=False)
    assert config.steps == ddpm["steps"] and config.lr == ddpm["lr"]
    args = cli.build_parser().parse_args(["calibrate", "--checkpoint", "c", "--patches", "p"])
    assert args.target_fpr == PARAMS["detect"]["target_fpr"] and args.window == DEFAULT_WINDOW
    # one rule for a scanner's own BTD+ reference: params, the library and the CLI agree
    assert args.min_count == PARAMS["detect"]["min_scanner_count"] == MIN_COUNT


DEFAULT_WINDOW = PARAMS["detect"]["ct_window"]


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_each_detector_trains_with_its_own_modalitys_sampler(modality: str) -> None:
    """The timestep sampler is chosen per modality: each train_ddpm item passes its own key, and a
    bad value fails naming that key (not TrainConfig's field)."""
    from btd.pipeline import train_ddpm as stage

    item = DVC["stages"]["train_ddpm"]["foreach"][modality]
    assert item["sampler"] == f"${{ddpm.{modality}_timestep_sampler}}"
    assert f"ddpm.{modality}_timestep_sampler" in DVC["stages"]["train_ddpm"]["do"]["params"]
    flat = dict(image_size=16, seed=0, modality=modality, dim=8, dim_mults="1,2", attn_heads=1,
                attn_dim_head=8, batch_size=2, steps=2, lr=1e-3, ema_decay=0.9)  # fmt: skip
    sampler = PARAMS["ddpm"][f"{modality}_timestep_sampler"]
    assert stage.train_config(**flat, timestep_sampler=sampler).timestep_sampler == sampler
    with pytest.raises(BTDConfigError, match=rf"ddpm\.{modality}_timestep_sampler"):
        stage.train_config(**flat, timestep_sampler="bogus")
