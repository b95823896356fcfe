"""The deepfakes stage: train the attackers on validation patients, tamper holdout patients, write test sets.

Data hygiene (paper §4, issue): the BTD detector trains on `train` patients; the attackers train on `val`
patients (which the detector never trained on); every test image comes from `holdout` patients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from btd.attacks import inpaint_ddpm as diff
from btd.attacks.ctgan import CTGANAttacker, removal_cube_mm, tamper_ct
from btd.attacks.cubes import local_mean_hu, training_cubes
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
from btd.scenarios import attack_of, modality_of, scenario_name

#: attack -> (label of the holdout sites tampered, label of the holdout reals in the test set)
SITES = {"inject": ("TB", "TM"), "remove": ("TM", "TB")}


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


def scenario_testset(
    scenario: str,
    holdout: tuple[np.ndarray, pd.DataFrame],
    fakes: tuple[np.ndarray, np.ndarray, pd.DataFrame],
    n_real: int,
    seed: int,
):
    """Holdout reals of the scenario's real label (up to n_real) + the fakes -> one test set."""
    patches, manifest = holdout
    attack = attack_of(scenario)
    reals = pick_sites(manifest, SITES[attack][1], n_real, seed)
    return build_testset(
        scenario, (patches[reals.index.to_numpy()], reals.reset_index(drop=True)), fakes
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


def build_testsets(
    holdout: dict[str, tuple[np.ndarray, pd.DataFrame]],
    val: dict[str, tuple[np.ndarray, pd.DataFrame]],
    scans: dict[str, dict[str, ScanVolume]],
    gans: dict[str, CTGANAttacker],
    attackers: dict[str, diff.InpaintDDPM],
    cfg: dict,
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]]:
    """The six test sets (CT-GAN CT, diffusion CT and MRI; inject and remove) from holdout patients.

    CT injections go into aerated lung only. Every fake is written in the scanner's stored type
    (CT-GAN tampers the int16 volume itself; the diffusion fakes are re-quantised), so fakes and reals
    share one value grid. `cfg`: n_per_class, ct_mask_px, mri_margin_mm, jumps, jump_length,
    inject_cond_scale.
    """
    pixel_mm = {m: next(iter(scans[m].values())).spacing[1] for m in ("ct", "mri")}
    n = cfg["n_per_class"]
    ct_inject_pool = aerated_sites(holdout["ct"][1].query("label == 'TB'"), scans["ct"])
    testsets = {}
    for attack in ("inject", "remove"):
        site_label = SITES[attack][0]
        ct_pool = ct_inject_pool if attack == "inject" else holdout["ct"][1]
        sites = pick_sites(ct_pool, site_label, n, seed)
        fakes = ctgan_fakes(
            scans["ct"], sites, gans[attack], attack, holdout["ct"][0].shape[-1], seed
        )
        name = scenario_name("CTGAN", "ct", attack)
        testsets[name] = scenario_testset(name, holdout["ct"], fakes, n, seed)
        for m in ("ct", "mri"):
            patches, man = holdout[m]
            sites = pick_sites(ct_pool if m == "ct" else man, site_label, n, seed)
            train_d = val[m][1].query("label == 'TM'")["diameter_mm"].to_numpy()
            images, masks, meta = diff.make_diffusion_fakes(
                attackers[m], patches[sites.index.to_numpy()], sites.reset_index(drop=True),
                attack, m, pixel_mm[m], train_d, ct_mask_px=cfg["ct_mask_px"],
                mri_margin_mm=cfg["mri_margin_mm"], seed=seed, jumps=cfg["jumps"],
                jump_length=cfg["jump_length"],
                cond_scale=cfg["inject_cond_scale"] if attack == "inject" else 1.0,
            )  # fmt: skip
            images = requantise(images, sites.reset_index(drop=True), m, scans[m])
            name = scenario_name("DIFF", m, attack)
            testsets[name] = scenario_testset(name, holdout[m], (images, masks, meta), n, seed)
    return testsets


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
