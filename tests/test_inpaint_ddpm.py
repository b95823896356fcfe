"""Diffusion in-painting attacker: RePaint exactness, masks, training, persistence, fakes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from btd.attacks.inpaint_ddpm import (
    AttackerConfig,
    StableDiffusionInpainter,
    build_attacker,
    class_indices,
    fit,
    inpaint_sites,
    load_attacker,
    make_diffusion_fakes,
    repaint,
    repaint_evaluations,
    repaint_schedule,
    save_attacker,
)
from btd.attacks.masks import (
    disc_mask,
    sample_tumour_diameters,
    scaled_mask_px,
    site_masks,
    soft_blend,
    square_mask,
)
from btd.errors import BTDConfigError, BTDInputError

torch.set_num_threads(1)


def blobs(n: int, size: int, malign: bool, seed: int) -> np.ndarray:
    """Noisy flat tissue; malign patches carry a bright centred disc."""
    rng = np.random.default_rng(seed)
    x = 0.3 + 0.05 * rng.standard_normal((n, 1, size, size))
    if malign:
        yy, xx = np.mgrid[:size, :size]
        x[:, 0][:, (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= (size // 6) ** 2] += 0.5
    return np.clip(x, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_model():
    return build_attacker(AttackerConfig(image_size=16, channels=(8, 16), timesteps=10), seed=0)


# ------------------------------------------------------------------------------------ RePaint


def test_repaint_keeps_known_pixels_exactly_and_is_deterministic(tiny_model):
    img = blobs(3, 16, True, seed=1)
    keep = np.ones((3, 16, 16), np.uint8)
    keep[:, 4:12, 5:11] = 0
    out = repaint(tiny_model, img, keep, "malign", jumps=2, jump_length=3, seed=7)
    k = keep.astype(bool)[:, None]
    assert out.shape == img.shape and out.dtype == np.float32
    assert np.array_equal(out[k], img[k])  # bit-exact, not just close
    assert not np.allclose(out[~k], img[~k])  # the hole was really regenerated
    assert 0 <= out.min() and out.max() <= 1
    again = repaint(tiny_model, img, keep, "malign", jumps=2, jump_length=3, seed=7)
    other = repaint(tiny_model, img, keep, "malign", jumps=2, jump_length=3, seed=8)
    assert np.array_equal(out, again)
    assert not np.array_equal(out[~k], other[~k])


def test_repaint_schedule_shape():
    seq = repaint_schedule(20, 5, 1)
    assert seq[0] == 19 and seq[-1] == -1
    assert all(abs(a - b) == 1 for a, b in zip(seq[:-1], seq[1:], strict=True))
    assert repaint_schedule(10, 3, 0) == list(range(9, -2, -1))  # no jumps = plain reverse chain
    # RePaint cost: T + jumps * jump_length * (number of jump points)
    assert repaint_evaluations(100, 10, 1) == 100 + 1 * 10 * 9
    assert repaint_evaluations(100, 10, 2) == 100 + 2 * 10 * 9


def test_repaint_rejects_bad_inputs(tiny_model):
    img = blobs(2, 16, False, seed=0)
    with pytest.raises(BTDInputError, match="known_mask"):
        repaint(tiny_model, img, np.full((2, 16, 16), 0.5), 0)
    with pytest.raises(BTDInputError, match="attacker window"):
        repaint(tiny_model, blobs(2, 24, False, 0), np.ones((2, 24, 24)), 0)
    with pytest.raises(BTDInputError, match="unknown label"):
        class_indices(["XX", "TM"], 2)
    assert class_indices(["TM", "TB", None], 3).tolist() == [1, 0, 2]


# -------------------------------------------------------------------------------------- masks


def test_ct_mask_is_uniform_square_scaled_with_pixel_size():
    assert scaled_mask_px(0.7) == 32 and scaled_mask_px(1.4) == 16
    m = square_mask(48, 24, 24, 16)
    assert m.sum() == 256
    ys, xs = np.nonzero(m)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (16, 31, 16, 31)
    masks = site_masks("ct", 48, np.array([[24, 24], [20, 30]]), [5.0, 30.0], pixel_mm=1.4)
    assert masks.sum(axis=(1, 2)).tolist() == [256, 256]  # size does not follow the tumour


def test_mri_mask_follows_tumour_size():
    sizes = [6.0, 12.0, 24.0]
    masks = site_masks("mri", 64, np.array([[32, 32]] * 3), sizes, pixel_mm=1.4, mri_margin_mm=2.0)
    areas = masks.sum(axis=(1, 2))
    assert areas[0] < areas[1] < areas[2]
    d_px = (24.0 + 4.0) / 1.4
    assert abs(areas[2] - np.pi * (d_px / 2) ** 2) < 0.1 * areas[2]
    assert masks[2, 32, 32] == 1 and masks[2, 0, 0] == 0
    ell = disc_mask(64, 32, 32, 10, aspect=2.0)
    ys, xs = np.nonzero(ell)
    assert np.ptp(xs) > 1.8 * np.ptp(ys)
    d = sample_tumour_diameters([0.0, 10.0, 20.0], 50, np.random.default_rng(0))
    assert set(np.unique(d)) <= {10.0, 20.0}


def test_soft_blend_border():
    m = square_mask(32, 16, 16, 8)
    alpha, region = soft_blend(m, 3)
    assert np.all(alpha[m == 1] == 1.0)
    assert region.sum() > m.sum() and np.all(region[m == 1] == 1)
    assert alpha[16, 16 + 4 + 4] == 0  # 4 px beyond the edge: outside a 3 px border
    assert 0 < alpha[16, 20] < 1
    hard_alpha, hard_region = soft_blend(m, 0)
    assert np.array_equal(hard_region, m) and np.array_equal(hard_alpha, m.astype(np.float32))


# ----------------------------------------------------------------------------------- training


def test_loss_drops_in_a_few_dozen_steps():
    x = np.concatenate([blobs(32, 16, False, 0), blobs(32, 16, True, 1)])
    y = [0] * 32 + [1] * 32
    model = build_attacker(AttackerConfig(image_size=16, channels=(8, 16), timesteps=20), seed=0)
    hist = fit(model, x, y, steps=40, batch_size=16, lr=3e-3, seed=0, ema_decay=0.0, log_every=10,
               val=(x[::4], y[::4], None))  # fmt: skip
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert hist["val_loss"][-1] < hist["val_loss"][0]
    assert hist["steps_per_s"] > 0 and hist["step"][-1] == 40


def test_fit_is_seeded_and_crops_windows():
    x = blobs(8, 24, True, 0)
    y = ["TM"] * 8
    centres = np.full((8, 2), 12)
    runs = []
    for _ in range(2):
        m = build_attacker(AttackerConfig(image_size=16, channels=(8, 16), timesteps=10), seed=3)
        fit(m, x, y, steps=3, batch_size=4, seed=5, centres=centres)
        runs.append(torch.cat([p.flatten() for p in m.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_save_load_roundtrip(tmp_path, tiny_model):
    path = save_attacker(tmp_path / "att.pt", tiny_model, {"loss": [1.0]})
    loaded = load_attacker(path)
    assert loaded.config == tiny_model.config
    img, keep = blobs(2, 16, False, 0), np.ones((2, 16, 16))
    keep[:, 5:9, 5:9] = 0
    a = repaint(tiny_model, img, keep, 0, jumps=1, jump_length=2, seed=1)
    b = repaint(loaded, img, keep, 0, jumps=1, jump_length=2, seed=1)
    assert np.array_equal(a, b)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(BTDInputError, match="bad.pt"):
        load_attacker(tmp_path / "bad.pt")
    with pytest.raises(BTDInputError, match="not found"):
        load_attacker(tmp_path / "missing.pt")


def test_config_validation_and_lucidrains_backbone():
    with pytest.raises(BTDConfigError, match="image_size"):
        AttackerConfig(image_size=18, channels=(8, 16, 32))
    with pytest.raises(BTDConfigError, match="backbone"):
        AttackerConfig(image_size=16, backbone="sd")
    cfg = AttackerConfig(image_size=16, channels=(8, 16), timesteps=5, backbone="lucidrains")
    model = build_attacker(cfg, seed=0)
    out = model.eps(torch.zeros(2, 1, 16, 16), torch.tensor([0, 4]), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 16, 16)


# ----------------------------------------------------------------------------- sites -> fakes


def manifest_rows(n: int, label: str, size: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "index": range(n), "patient": [f"p{i % 3}" for i in range(n)], "scanner": "s1",
            "split": "holdout", "slice": 2, "cy": 100, "cx": 90,
            "py": [size // 2, 3, size - 2][:n], "px": [size // 2, size - 3, 4][:n],
            "diameter_mm": 12.0 if label == "TM" else 0.0, "label": label,
        }
    )  # fmt: skip


def test_inpaint_sites_changes_only_the_region(tiny_model):
    patches = blobs(3, 24, False, seed=2)
    centres = np.array([[12, 12], [3, 21], [22, 4]])  # two near the border: window shifts inside
    masks = site_masks("ct", 24, centres, [0, 0, 0], pixel_mm=1.4, ct_mask_px=8)
    fakes, region = inpaint_sites(tiny_model, patches, centres, masks, "malign", blend_border_px=1,
                                  jumps=1, jump_length=2, seed=0)  # fmt: skip
    out = ~region.astype(bool)[:, None]
    assert np.array_equal(fakes[out], patches[out])
    assert np.all(region[masks.astype(bool)] == 1)  # mask inside the window: fully covered
    assert (fakes != patches).any(axis=(1, 2, 3)).all()


def test_make_diffusion_fakes_labels_and_sizes(tiny_model):
    size = 24
    patches = blobs(3, size, False, seed=4)
    rows = manifest_rows(3, "TB", size)
    fakes, masks, meta = make_diffusion_fakes(
        tiny_model, patches, rows, "inject", "mri", pixel_mm=1.4, train_diameters_mm=[6.0, 9.0],
        seed=0, jumps=0, jump_length=1,
    )  # fmt: skip
    assert fakes.shape == patches.shape and masks.shape == (3, size, size)
    assert set(meta["diameter_mm"]) <= {6.0, 9.0} and (meta["attack"] == "inject").all()
    assert (masks.sum(axis=(1, 2)) > 0).all()
    with pytest.raises(BTDInputError, match="needs TM sites"):
        make_diffusion_fakes(tiny_model, patches, rows, "remove", "ct", 1.4, [6.0])
    rm = manifest_rows(3, "TM", size)
    _, _, meta_rm = make_diffusion_fakes(
        tiny_model, patches, rm, "remove", "ct", 1.4, [6.0], ct_mask_px=8,
        removal_condition="unconditional", jumps=0, jump_length=1,
    )  # fmt: skip
    assert (meta_rm["diameter_mm"] == 12.0).all()


def test_stable_diffusion_path_fails_clearly(tmp_path):
    with pytest.raises(BTDConfigError, match="model_index.json"):
        StableDiffusionInpainter(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(BTDConfigError, match="diffusers"):
            StableDiffusionInpainter(tmp_path)


@pytest.mark.slow
def test_trained_attacker_injects_and_removes_blobs():
    """End to end on synthetic data: malign conditioning paints a bright disc, benign erases it."""
    x = np.concatenate([blobs(64, 16, False, 0), blobs(64, 16, True, 1)])
    y = [0] * 64 + [1] * 64
    model = build_attacker(AttackerConfig(image_size=16, channels=(16, 32), timesteps=50), seed=0)
    fit(model, x, y, steps=400, batch_size=32, lr=3e-3, seed=0)
    keep = np.ones((8, 16, 16), np.uint8)
    keep[:, 4:12, 4:12] = 0
    core = (slice(None), 0, slice(6, 10), slice(6, 10))
    injected = repaint(model, blobs(8, 16, False, 2), keep, "malign", jumps=1, jump_length=5,
                       seed=0, cond_scale=2.0)  # fmt: skip
    removed = repaint(model, blobs(8, 16, True, 3), keep, "benign", jumps=1, jump_length=5, seed=0)
    assert injected[core].mean() > 0.55  # healthy tissue is 0.3, the disc 0.8
    assert removed[core].mean() < 0.45
