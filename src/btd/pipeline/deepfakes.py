"""The deepfakes stage: train the attackers on validation patients, tamper holdout patients, write test sets.

Data hygiene (paper §4, issue): the BTD detector trains on `train` patients; the attackers train on `val`
patients (which the detector never trained on); every test image comes from `holdout` patients.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

from btd.attacks import autoencoder_kl as akl
from btd.attacks import inpaint_ddpm as diff
from btd.attacks import latent_inpaint as ldm
from btd.attacks.ctgan import CTGANAttacker, removal_cube_mm, tamper_ct
from btd.attacks.cubes import local_mean_hu, training_cubes
from btd.attacks.masks import sample_tumour_diameters
from btd.attacks.testsets import (
    SITE_COLUMNS,
    attack_success,
    build_testset,
    check_disjoint,
    realism_stats,
)
from btd.data.patches import extract_patch
from btd.data.preprocess import normalize_ct, to_stored_grid
from btd.data.records import ScanVolume
from btd.errors import BTDConfigError
from btd.params import parse_list
from btd.scenarios import (
    ATTACKS,
    BENIGN_LABEL,
    SCENARIOS,
    SITE_LABEL,
    attack_of,
    modality_of,
    scenario_name,
)

log = logging.getLogger(__name__)


def pick_sites(manifest: pd.DataFrame, label: str, n: int, seed: int) -> pd.DataFrame:
    """Up to `n` holdout rows of one label, spread over scanners (seeded)."""
    rows = manifest[manifest["label"] == label]
    if len(rows) <= n:
        return rows
    frac = n / len(rows)
    rng = np.random.default_rng(seed)
    keep = [
        rng.choice(idx, size=max(1, round(frac * len(idx))), replace=False)
        for idx in rows.groupby("scanner").groups.values()
    ]
    return rows.loc[np.sort(np.concatenate(keep))[:n]]


def aerated_sites(
    manifest: pd.DataFrame,
    scans: dict[str, ScanVolume],
    lo_hu: float = -950.0,
    hi_hu: float = -600.0,
    radius_mm: float = 4.0,
) -> pd.DataFrame:
    """The CT rows whose site lies in aerated lung (local mean HU in (lo_hu, hi_hu)).

    TB sites come from the pool of tumour locations of *other* patients, so some land in the chest wall
    or mediastinum, where an injected nodule is invisible. CT-GAN's authors injected into lung only.
    Falls back to all rows if none passes, so a cohort without aerated lung (e.g. a water phantom) still
    gets its injections.
    """
    keep = [
        lo_hu < local_mean_hu(scans[r.patient].volume, scans[r.patient].spacing,
                              (float(r.slice), float(r.cy), float(r.cx)), radius_mm) < hi_hu
        for r in manifest.itertuples()
    ]  # fmt: skip
    keep = np.asarray(keep, dtype=bool)
    return manifest[keep] if keep.any() else manifest


def fit_ctgan(
    scans: list[ScanVolume], role: str, cfg: dict, seed: int
) -> tuple[CTGANAttacker, list[dict]]:
    """Train CT-GAN's injector (on tumour cubes) or remover (on healthy cubes) of the attacker's scans."""
    rng = np.random.default_rng(seed)
    # the injector learns from tumours >= 10 mm: smaller ones, blurred by thick slices, teach it a faint blob
    min_d = 10.0 if role == "inject" else 0.0
    cubes = training_cubes(
        scans, role, rng, cube_mm=cfg["cube_mm"], cube_vox=cfg["cube_vox"], min_diameter_mm=min_d
    )
    gan = CTGANAttacker(role, cube_vox=cfg["cube_vox"], cube_mm=cfg["cube_mm"],
                        base_filters=cfg["base_filters"], seed=seed)  # fmt: skip
    history = gan.fit(cubes, steps=cfg["steps"], batch_size=cfg["batch_size"])
    return gan, history


def ctgan_fakes(
    scans: dict[str, ScanVolume],
    sites: pd.DataFrame,
    attacker: CTGANAttacker,
    attack: str,
    patch_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Tamper each holdout site in its 3-D scan with CT-GAN; cut the fake patch and its tamper mask.

    Removal is centred on the tumour's 3-D centre (the whole nodule goes); injection on the healthy
    site. The patch is cut from the tampered slice exactly as the preprocess stage cuts real patches.
    """
    rng = np.random.default_rng(seed)
    images, masks, rows = [], [], []
    for site in tqdm(sites.itertuples(), total=len(sites), desc=f"CT-GAN {attack}", leave=False):
        scan = scans[site.patient]
        z, y, x = float(site.slice), float(site.cy), float(site.cx)
        cube_mm = None
        if (
            attack == "remove"
        ):  # a cube that covers the whole tumour (CT-GAN's 20 mm centre hides <= 16 mm)
            t = min(scan.tumours, key=lambda t: (t.z - z) ** 2 + (t.y - y) ** 2 + (t.x - x) ** 2)
            z, y, x = t.z, t.y, t.x
            cube_mm = removal_cube_mm(t.diameter_mm, attacker)
        tampered, mask = tamper_ct(scan, z, y, x, attacker, rng, attack=attack, cube_mm=cube_mm)
        img, py, px = extract_patch(
            normalize_ct(tampered[site.slice]), site.cy, site.cx, patch_size
        )
        m, _, _ = extract_patch(mask[site.slice].astype(np.uint8), site.cy, site.cx, patch_size)
        if not m.any():  # the edit left this slice's patch untouched: not a fake sample
            continue
        images.append(img)
        masks.append(m)
        row = {c: getattr(site, c) for c in SITE_COLUMNS}
        row.update(py=py, px=px, diameter_mm=site.diameter_mm if attack == "remove" else np.nan)
        rows.append(row)
    return np.stack(images)[:, None], np.stack(masks), pd.DataFrame(rows, columns=SITE_COLUMNS)


def fit_diffusion_attacker(
    patches: np.ndarray, manifest: pd.DataFrame, cfg: dict, seed: int
) -> tuple[diff.InpaintDDPM, dict]:
    """Train the class-conditional in-painting DDPM on the attacker's TM (malign) and TB (benign) patches."""
    config = diff.AttackerConfig(
        image_size=cfg["window"], channels=tuple(cfg["channels"]), timesteps=cfg["timesteps"]
    )
    model = diff.build_attacker(config, seed=seed)
    centres = manifest[["py", "px"]].to_numpy()
    history = diff.fit(model, patches, manifest["label"].tolist(), cfg["steps"],
                       batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, centres=centres)  # fmt: skip
    return model, history


#: params.yaml deepfakes keys the LDM attacker (`ldm_config`) and its guidance search read
LDM_KEYS = ("ldm_ae_data", "ldm_ae_channels", "ldm_ae_steps", "ldm_unet_channels", "ldm_unet_steps",
            "ldm_finetune_steps", "ldm_batch_size", "ldm_lr", "ct_mask_px", "mri_margin_mm",
            "ldm_remover", "ldm_remover_max_hu")  # fmt: skip
LDM_SEARCH_KEYS = ("ldm_guidance_grid", "ldm_guidance_sites", "ct_mask_px", "mri_margin_mm",
                   "ldm_sample_steps", "ldm_negative")  # fmt: skip


def _require(deepfakes: Mapping[str, Any], keys: tuple[str, ...]) -> Mapping[str, Any]:
    """`deepfakes` itself, or a clear error naming the first key it lacks."""
    missing = [k for k in keys if k not in deepfakes]
    if missing:
        raise BTDConfigError(f"deepfakes.{missing[0]}", "missing")
    return deepfakes


def ldm_config(deepfakes: Mapping[str, Any]) -> dict[str, Any]:
    """`fit_ldm`'s config from params.yaml's `deepfakes` keys (ldm_*, ct_mask_px, mri_margin_mm).

    The stage notebook and the LDM benchmarks all build the attacker here, so a benchmark measures
    the attacker the pipeline runs.
    """
    p = _require(deepfakes, LDM_KEYS)
    ints = lambda key: parse_list(p[key], f"deepfakes.{key}", int)  # noqa: E731
    return {
        "ae_data": p["ldm_ae_data"], "ae_channels": ints("ldm_ae_channels"),
        "ae_steps": int(p["ldm_ae_steps"]), "unet_channels": ints("ldm_unet_channels"),
        "unet_steps": int(p["ldm_unet_steps"]), "finetune_steps": int(p["ldm_finetune_steps"]),
        "batch_size": int(p["ldm_batch_size"]), "lr": float(p["ldm_lr"]),
        "ct_mask_px": int(p["ct_mask_px"]), "mri_margin_mm": float(p["mri_margin_mm"]),
        "remover": p["ldm_remover"], "remover_max_hu": float(p["ldm_remover_max_hu"]),
    }  # fmt: skip


def ldm_search_config(deepfakes: Mapping[str, Any]) -> tuple[list[float], dict[str, Any]]:
    """The guidance grid and `ldm_guidance_study`'s sampling config from params.yaml's `deepfakes`."""
    p = _require(deepfakes, LDM_SEARCH_KEYS)
    grid = parse_list(p["ldm_guidance_grid"], "deepfakes.ldm_guidance_grid", float)
    return grid, {
        "ldm_sites": int(p["ldm_guidance_sites"]), "ct_mask_px": int(p["ct_mask_px"]),
        "mri_margin_mm": float(p["mri_margin_mm"]), "ldm_sample_steps": int(p["ldm_sample_steps"]),
        "ldm_negative": negative_modes(p["ldm_negative"]),
    }  # fmt: skip


def negative_modes(value: Any) -> list[str]:
    """params.yaml `deepfakes.ldm_negative`: the guidance modes the attacker tries, in order of
    preference (`latent_inpaint.NEGATIVE_MODES`), or a clear error naming the key."""
    modes = parse_list(value, "deepfakes.ldm_negative", str)
    bad = [v for v in modes if v not in ldm.NEGATIVE_MODES]
    if not modes or bad or len(set(modes)) < len(modes):
        raise BTDConfigError(
            "deepfakes.ldm_negative",
            f"a comma-separated list of distinct {ldm.NEGATIVE_MODES}, got {value!r}",
        )
    return modes


def fit_ldm(
    patches: np.ndarray,
    manifest: pd.DataFrame,
    modality: str,
    pixel_mm: float,
    cfg: dict,
    seed: int,
) -> tuple[dict[str, ldm.LatentInpainter], dict[str, list[dict]]]:
    """SD's in-painting path on the attacker's patches: autoencoder -> generic U-Net -> fine-tunes.

    `cfg`: ae_data ('attacker' | 'natural'), ae_channels, ae_steps, unet_channels, unet_steps,
    finetune_steps, batch_size, lr, ct_mask_px, mri_margin_mm, remover ('dreambooth' | 'generic'),
    remover_max_hu. Returns ({'inject': DreamBooth injector, 'remove': DreamBooth remover, or the
    generic model -- the paper's "off-the-shelf" role}, histories with each part's seconds).
    """
    if cfg["remover"] not in ("dreambooth", "generic"):
        raise BTDConfigError(
            "deepfakes.ldm_remover", f"must be 'dreambooth' or 'generic', got {cfg['remover']!r}"
        )
    ae_cfg = akl.AutoencoderConfig(channels=tuple(cfg["ae_channels"]))
    ae = akl.build_autoencoder(ae_cfg, seed=seed)
    if cfg["ae_data"] == "natural":
        ae_images = akl.natural_crops(patches.shape[-1], 4096, seed=seed)
    elif cfg["ae_data"] == "attacker":
        ae_images = patches
    else:
        raise BTDConfigError(
            "deepfakes.ldm_ae_data", f"must be 'attacker' or 'natural', got {cfg['ae_data']!r}"
        )
    hist = {"autoencoder": akl.fit_autoencoder(ae, ae_images, cfg["ae_steps"], seed=seed)}
    generic = ldm.build_inpainter(ae, ae_cfg, ldm.LDMConfig(unet_channels=tuple(cfg["unet_channels"])),
                                  patches.shape[-1], patches, seed=seed)  # fmt: skip
    prior = ldm.generic_sampler(generic, patches, manifest["label"].tolist())
    hist["generic"] = ldm.fit(generic, prior, cfg["unet_steps"], batch_size=cfg["batch_size"],
                              lr=cfg["lr"], seed=seed)  # fmt: skip
    size, labels = patches.shape[-1], manifest["label"].to_numpy()
    masks = ldm.tumour_masks(manifest[labels == "TM"], size, modality, pixel_mm,
                             cfg["ct_mask_px"], cfg["mri_margin_mm"])  # fmt: skip
    tune = dict(batch_size=cfg["batch_size"], lr=cfg["lr"] / 4, seed=seed)
    models = {}
    models["inject"], hist["injector"] = ldm.dreambooth_finetune(
        generic, patches[labels == "TM"], masks, prior, cfg["finetune_steps"], "malign", **tune
    )
    models["remove"] = generic
    if cfg["remover"] == "dreambooth":
        healthy = manifest[labels == "TB"].assign(  # the attack's own mask sizes at healthy sites
            diameter_mm=sample_tumour_diameters(
                manifest.loc[labels == "TM", "diameter_mm"],
                int((labels == "TB").sum()),
                np.random.default_rng(seed),
            )  # fmt: skip
        )
        hmasks = ldm.tumour_masks(healthy, size, modality, pixel_mm, cfg["ct_mask_px"],
                                  cfg["mri_margin_mm"])  # fmt: skip
        keep = ldm.healthy_instance(
            patches[labels == "TB"], hmasks, modality, cfg["remover_max_hu"]
        )
        if not keep.any():  # e.g. a cohort without aerated healthy sites: every TB site, said so
            log.warning("LDM remover: no healthy %s site below %s HU; using all", modality,
                        cfg["remover_max_hu"])  # fmt: skip
            keep[:] = True
        models["remove"], hist["remover"] = ldm.dreambooth_finetune(
            generic, patches[labels == "TB"][keep], hmasks[keep], prior, cfg["finetune_steps"],
            "benign", **tune,
        )  # fmt: skip
    return models, hist


def ldm_fakes(
    models: dict[str, ldm.LatentInpainter],
    holdout: tuple[np.ndarray, pd.DataFrame],
    sites: pd.DataFrame,
    attack: str,
    modality: str,
    pixel_mm: float,
    train_diameters_mm: np.ndarray,
    cfg: dict,
    seed: int,
) -> tuple[tuple, tuple]:
    """One LDM in-painting run -> (decoded fakes, pasted-back fakes), each (images, masks, meta)."""
    patches = holdout[0][sites.index.to_numpy()]
    decoded, pasted, masks, meta = ldm.make_ldm_fakes(
        models[attack], patches, sites.reset_index(drop=True), attack, modality, pixel_mm,
        train_diameters_mm, ct_mask_px=cfg["ct_mask_px"], mri_margin_mm=cfg["mri_margin_mm"],
        guidance=cfg["ldm_guidance"][modality][attack],
        negative=cfg["ldm_negative"][modality][attack],
        sample_steps=cfg["ldm_sample_steps"], seed=seed,
    )  # fmt: skip
    return (decoded, masks, meta), (pasted, masks, meta)


def attacker_sites(
    split: tuple[np.ndarray, pd.DataFrame],
    scans: dict[str, ScanVolume],
    modality: str,
    attack: str,
    n: int,
    seed: int,
) -> pd.DataFrame:
    """Up to `n` sites an attack tampers in one split: aerated-lung TB sites for CT injection (a
    nodule is planted in lung, as CT-GAN does), TB sites for MRI injection, TM sites for removal."""
    man = split[1]
    if modality == "ct" and attack == "inject":
        man = aerated_sites(man.query("label == 'TB'"), scans)
    return pick_sites(man, SITE_LABEL[attack], n, seed)


def ldm_guidance_study(
    models: dict[str, dict[str, ldm.LatentInpainter]],
    val: dict[str, tuple[np.ndarray, pd.DataFrame]],
    scans: dict[str, dict[str, ScanVolume]],
    classifiers: dict,
    grid: list[float],
    cfg: dict,
    seed: int,
) -> tuple[pd.DataFrame, dict[tuple[str, str, str, float], tuple[tuple, tuple]]]:
    """Attack success of each guidance setting on the attacker's OWN patients (validation).

    An SD user turns the guidance scale, with or without a negative prompt, until the result shows
    what was asked for; our attacker does the same with the tumour classifier (trained on train
    patients), on validation sites only, so the holdout patients the test sets come from play no
    part in the choice. `cfg`: ldm_sites (sites per modality and attack), ct_mask_px,
    mri_margin_mm, ldm_sample_steps, ldm_negative (the modes tried, `negative_modes`). Returns (one
    row per modality, attack, mode and scale: success of the decoded and of the pasted-back fakes,
    n) and the fakes ({(modality, attack, mode, scale): (decoded, pasted)}, re-quantised as written).
    """
    rows, fakes, row_of = [], {}, {}  # row_of: the study row of each fakes key
    for m in models:
        pixel_mm = next(iter(scans[m].values())).spacing[1]
        train_d = val[m][1].query("label == 'TM'")["diameter_mm"].to_numpy()
        for attack in ATTACKS:
            sites = attacker_sites(val[m], scans[m], m, attack, cfg["ldm_sites"], seed)
            table = sites.reset_index(drop=True)
            settings = [(neg, float(g)) for neg in cfg["ldm_negative"] for g in grid]
            first = cfg["ldm_negative"][0]
            if sites.empty:  # nothing to try on: recorded, and the first setting is used
                rows += [{"modality": m, "attack": attack, "negative": neg, "guidance": g, "n": 0,
                          "success": np.nan, "paste_success": np.nan} for neg, g in settings]  # fmt: skip
                continue
            for neg, g in tqdm(settings, desc=f"LDM guidance {m} {attack}", leave=False):
                if g == 1.0 and neg != first and (m, attack, first, g) in fakes:
                    # scale 1 is the conditional prediction alone: every mode gives the same fakes
                    fakes[(m, attack, neg, g)] = fakes[(m, attack, first, g)]
                    rows.append(row_of[(m, attack, first, g)] | {"negative": neg})
                    continue
                run_cfg = dict(cfg, ldm_guidance={m: {attack: g}}, ldm_negative={m: {attack: neg}})
                sets = ldm_fakes(models[m], val[m], sites, attack, m, pixel_mm, train_d,
                                 run_cfg, seed)  # fmt: skip
                sets = tuple(
                    (requantise(images, table, m, scans[m]), masks, meta)
                    for images, masks, meta in sets
                )
                fakes[(m, attack, neg, g)] = sets
                decoded, pasted = (s[0] for s in sets)
                row_of[(m, attack, neg, g)] = {
                    "modality": m, "attack": attack, "negative": neg, "guidance": g,
                    "n": len(sites),
                    "success": attack_success(classifiers[m], decoded, attack),
                    "paste_success": attack_success(classifiers[m], pasted, attack),
                }  # fmt: skip
                rows.append(row_of[(m, attack, neg, g)])
    return pd.DataFrame(rows), fakes


def success_lower_bound(success: Any, n: Any, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a success rate seen on `n` sites, at `confidence`
    (0: the observed rate itself). An attacker who wants the attack to work on NEW patients asks
    this of its validation sites: 0.80 seen on 30 sites is as likely 0.70 as 0.90 elsewhere."""
    success, n = np.asarray(success, float), np.asarray(n, float)
    if not 0.0 <= confidence < 1.0:
        raise BTDConfigError(
            "deepfakes.ldm_target_confidence", f"must be in [0, 1), got {confidence}"
        )
    if confidence == 0.0:
        return success
    k = np.round(success * n)
    with np.errstate(invalid="ignore"):
        lower = stats.beta.ppf(1.0 - confidence, k, n - k + 1)
    return np.where(k > 0, lower, 0.0)


def with_lower_bound(study: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """The guidance study with `success_lower`: each setting's `success_lower_bound`, which
    `choose_guidance` and the reading compare with the target."""
    return study.assign(success_lower=success_lower_bound(study["success"], study["n"], confidence))


def choose_guidance(
    study: pd.DataFrame, target: float
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """Per modality and attack: the smallest scale whose validation success (decoded fakes, as SD
    returns them) reaches `target` -- its `success_lower` bound where the study has one
    (`with_lower_bound`) -- else the most successful setting (the first setting where there was no
    validation site). Stronger guidance costs realism (it over-saturates), so an attacker stops at
    "enough"; ties go to the smaller scale, then to the negative mode listed first in the study.
    Returns ({modality: {attack: scale}}, {modality: {attack: mode}})."""
    scales: dict[str, dict[str, float]] = {}
    modes: dict[str, dict[str, str]] = {}
    for (m, attack), g in study.groupby(["modality", "attack"], sort=False):
        order = {neg: i for i, neg in enumerate(dict.fromkeys(g["negative"]))}
        g = g.assign(_mode=g["negative"].map(order)).sort_values(
            ["guidance", "_mode"], kind="stable"
        )
        ok = g[g.get("success_lower", g["success"]) >= target - 1e-9]
        if g["success"].isna().all():  # no validation site to try on
            best = g.iloc[0]
        else:
            best = ok.iloc[0] if len(ok) else g.loc[g["success"].idxmax()]
        scales.setdefault(m, {})[attack] = float(best["guidance"])
        modes.setdefault(m, {})[attack] = str(best["negative"])
    return scales, modes


def validation_sets(
    fakes: dict[tuple[str, str, str, float], tuple[tuple, tuple]],
    chosen: tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]],
    val: dict[str, tuple[np.ndarray, pd.DataFrame]],
    n_real: int,
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]]:
    """The LDM scenarios on validation patients at the chosen settings (`choose_guidance`): the
    fakes a detector's choices (BTD+'s default variant) are made on, never the test sets."""
    scales, modes = chosen
    out = {}
    for (m, attack, neg, g), sets in fakes.items():
        if (scales[m][attack], modes[m][attack]) != (g, neg):
            continue
        for paste, set_ in zip((False, True), sets, strict=True):
            name = scenario_name("LDM", m, attack, paste_back=paste)
            out[name] = scenario_testset(name, val[m], set_, n_real, seed, split="val")
    return {name: out[name] for name in SCENARIOS if name in out}


def scenario_testset(
    scenario: str,
    holdout: tuple[np.ndarray, pd.DataFrame],
    fakes: tuple[np.ndarray, np.ndarray, pd.DataFrame],
    n_real: int,
    seed: int,
    split: str = "holdout",
):
    """Reals of the scenario's real label (up to n_real) from `split`'s patients + the fakes ->
    one test set (or, with split "val", one validation set)."""
    patches, manifest = holdout
    attack = attack_of(scenario)
    reals = pick_sites(manifest, BENIGN_LABEL[attack], n_real, seed)
    return build_testset(
        scenario, (patches[reals.index.to_numpy()], reals.reset_index(drop=True)), fakes, split
    )


def hygiene(manifest: pd.DataFrame) -> dict[str, int]:
    """Patient counts per split and a hard check that attacker/detector/test patients are disjoint."""
    by = {
        s: set(manifest.loc[manifest["split"] == s, "patient"]) for s in ("train", "val", "holdout")
    }
    check_disjoint(by["train"] | by["val"], by["holdout"])
    check_disjoint(by["train"], by["val"])
    return {s: len(p) for s, p in by.items()}


def save_json_history(history, path: Path) -> None:
    """Training history rows as CSV beside the attacker (for the notebook's curves)."""
    pd.DataFrame(history).to_csv(path, index=False)


def requantise(
    fakes: np.ndarray, sites: pd.DataFrame, modality: str, scans: dict[str, ScanVolume]
) -> np.ndarray:
    """Fake patches as they read after being written into the scan in its stored integer type."""
    out = np.empty_like(fakes, dtype=np.float32)
    for i, patient in enumerate(sites["patient"].to_numpy()):
        volume = scans[patient].volume if modality == "mri" else None
        out[i] = to_stored_grid(fakes[i], modality, volume)
    return out


DIFF_SETS = ("make", "skip")


def diff_sets_enabled(value: str) -> bool:
    """`deepfakes.diff_sets` -> whether the optional DIFF-* sets are made ('make' | 'skip')."""
    if value not in DIFF_SETS:
        raise BTDConfigError("deepfakes.diff_sets", f"must be 'make' or 'skip', got {value!r}")
    return value == "make"


def build_testsets(
    holdout: dict[str, tuple[np.ndarray, pd.DataFrame]],
    val: dict[str, tuple[np.ndarray, pd.DataFrame]],
    scans: dict[str, dict[str, ScanVolume]],
    gans: dict[str, CTGANAttacker],
    attackers: dict[str, diff.InpaintDDPM],
    cfg: dict,
    seed: int,
    ldm_models: dict[str, dict[str, ldm.LatentInpainter]] | None = None,
    seconds: dict[str, float] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]]:
    """Every scenario's test set (`btd.scenarios.SCENARIOS`) from holdout patients.

    CT injections go into aerated lung only. Every fake is written in the scanner's stored type
    (CT-GAN tampers the int16 volume itself; the in-painted fakes are re-quantised), so fakes and
    reals share one value grid. The LDM and DIFF attackers in-paint the same sites; `attackers`
    holds the DIFF models of the modalities whose DIFF sets are made (empty: none). `cfg`:
    n_per_class, ct_mask_px, mri_margin_mm, jumps, jump_length, inject_cond_scale, ldm_guidance
    ({modality: {attack: scale}}) and ldm_negative ({modality: {attack: mode}}), both from
    `choose_guidance`, ldm_sample_steps. Without `ldm_models`
    the LDM sets are left out.
    `seconds`, if given, accumulates each attacker's generation time (CTGAN, DIFF, LDM).
    """
    seconds = {} if seconds is None else seconds

    def clock(attacker: str, t0: float) -> None:
        seconds[attacker] = seconds.get(attacker, 0.0) + time.perf_counter() - t0

    pixel_mm = {m: next(iter(scans[m].values())).spacing[1] for m in ("ct", "mri")}
    n = cfg["n_per_class"]
    testsets = {}
    for attack in ATTACKS:
        sites = attacker_sites(holdout["ct"], scans["ct"], "ct", attack, n, seed)
        t0 = time.perf_counter()
        fakes = ctgan_fakes(
            scans["ct"], sites, gans[attack], attack, holdout["ct"][0].shape[-1], seed
        )
        clock("CTGAN", t0)
        name = scenario_name("CTGAN", "ct", attack)
        testsets[name] = scenario_testset(name, holdout["ct"], fakes, n, seed)
        for m in ("ct", "mri"):
            patches, man = holdout[m]
            sites = attacker_sites(holdout[m], scans[m], m, attack, n, seed)
            train_d = val[m][1].query("label == 'TM'")["diameter_mm"].to_numpy()
            if m in attackers:  # the DIFF sets are optional (deepfakes.diff_sets)
                t0 = time.perf_counter()
                images, masks, meta = diff.make_diffusion_fakes(
                    attackers[m], patches[sites.index.to_numpy()], sites.reset_index(drop=True),
                    attack, m, pixel_mm[m], train_d, ct_mask_px=cfg["ct_mask_px"],
                    mri_margin_mm=cfg["mri_margin_mm"], seed=seed, jumps=cfg["jumps"],
                    jump_length=cfg["jump_length"],
                    cond_scale=cfg["inject_cond_scale"] if attack == "inject" else 1.0,
                )  # fmt: skip
                clock("DIFF", t0)
                images = requantise(images, sites.reset_index(drop=True), m, scans[m])
                name = scenario_name("DIFF", m, attack)
                testsets[name] = scenario_testset(name, holdout[m], (images, masks, meta), n, seed)
            if ldm_models is None:
                continue
            t0 = time.perf_counter()
            sets = ldm_fakes(
                ldm_models[m], holdout[m], sites, attack, m, pixel_mm[m], train_d, cfg, seed
            )
            clock("LDM", t0)
            for paste, (images, masks, meta) in zip((False, True), sets, strict=True):
                images = requantise(images, sites.reset_index(drop=True), m, scans[m])
                name = scenario_name("LDM", m, attack, paste_back=paste)
                testsets[name] = scenario_testset(name, holdout[m], (images, masks, meta), n, seed)
    return {name: testsets[name] for name in SCENARIOS if name in testsets}


def before_after_rows(
    testsets: dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]],
    holdout: dict[str, tuple[np.ndarray, pd.DataFrame]],
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(scenario, before, after, mask) of each scenario's first fake, for the Fig. 3 panel."""
    rows = []
    for name, (images, masks, meta) in testsets.items():
        i = int(np.flatnonzero(meta["fake"].to_numpy() == 1)[0])
        patches, man = holdout[modality_of(name)]
        r = meta.iloc[i]
        src = man[(man["patient"] == r["patient"]) & (man["slice"] == r["slice"])
                  & (man["cy"] == r["cy"]) & (man["cx"] == r["cx"])]  # fmt: skip
        before = patches[src.index[0], 0] if len(src) else images[i, 0]
        rows.append((name, before, images[i, 0], masks[i]))
    return rows


def judge_attacks(
    testsets: dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]], classifiers: dict
) -> tuple[dict[str, float], pd.DataFrame]:
    """Attack success (share of fakes the real-data tumour classifier calls what the attack claims)
    and realism (intensity and noise inside vs outside the tamper mask) per scenario."""
    success, realism = {}, []
    for name, (images, masks, meta) in testsets.items():
        fake = meta["fake"].to_numpy() == 1
        success[name] = attack_success(
            classifiers[modality_of(name)], images[fake], attack_of(name)
        )
        realism.append(realism_stats(images, masks, meta).assign(scenario=name))
    return success, pd.concat(realism)


def real_success(
    testsets: dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]], classifiers: dict
) -> dict[str, float]:
    """`attack_success`'s rate on each set's REAL samples: how often the classifier calls a real
    tumour malign (injection sets) or a real healthy site benign (removal sets).

    This is the ceiling of "attack success" for that classifier: a fake that fools it as often as a
    real sample of the claimed class convinces it is as good as the classifier can tell.
    """
    out = {}
    for name, (images, _, meta) in testsets.items():
        real = meta["fake"].to_numpy() == 0
        out[name] = attack_success(classifiers[modality_of(name)], images[real], attack_of(name))
    return out
