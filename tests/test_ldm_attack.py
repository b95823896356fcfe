"""Known-answer tests of the LDM attack (SD's in-painting path) and of the trace measurements."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from btd.attacks import autoencoder_kl as akl
from btd.attacks import latent_inpaint as ldm
from btd.attacks import traces
from btd.errors import BTDConfigError, BTDInputError
from btd.scenarios import (
    PAPER_SCENARIOS,
    SCENARIOS,
    attack_of,
    attacker_of,
    is_paste_back,
    modality_of,
    scenario_name,
)

P = 16
AE = akl.AutoencoderConfig(channels=(16, 16))  # f = 2


@pytest.fixture(scope="module")
def model() -> ldm.LatentInpainter:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = rng.random((8, 1, P, P)).astype(np.float32)
    ae = akl.build_autoencoder(AE, seed=0)
    return ldm.build_inpainter(ae, AE, ldm.LDMConfig(unet_channels=(16, 32)), P, images, seed=0)


def test_scenario_names_with_paste_back():
    assert is_paste_back("LDM-CT-Inject-Paste") and not is_paste_back("LDM-CT-Inject")
    assert attacker_of("LDM-MRI-Remove-Paste") == "LDM"
    assert (
        modality_of("LDM-MRI-Remove-Paste") == "mri"
        and attack_of("LDM-CT-Inject-Paste") == "inject"
    )
    assert scenario_name("LDM", "ct", "remove", paste_back=True) == "LDM-CT-Remove-Paste"
    with pytest.raises(BTDConfigError):
        modality_of("LDM-CT-Inject-Overlay")
    assert set(PAPER_SCENARIOS) < set(SCENARIOS) and len(set(SCENARIOS)) == len(SCENARIOS) == 14
    assert not any(is_paste_back(s) or s.startswith("DIFF") for s in PAPER_SCENARIOS)


def test_autoencoder_config_factor_and_checks():
    assert akl.AutoencoderConfig().factor == 4 and AE.factor == 2
    with pytest.raises(BTDConfigError):
        akl.AutoencoderConfig(channels=(24, 32))
    assert akl.AutoencoderConfig.from_dict(AE.to_dict()) == AE


def test_natural_crops_are_seeded_grey_images_in_range():
    a, b = akl.natural_crops(P, 6, seed=3), akl.natural_crops(P, 6, seed=3)
    assert a.shape == (6, 1, P, P) and a.dtype == np.float32
    assert np.array_equal(a, b) and 0 <= a.min() and a.max() <= 1 and a.std() > 0.01


def test_laplacian_pyramid_loss_ignores_offsets_not_detail():
    x = torch.rand(2, 1, P, P)
    assert akl.laplacian_pyramid_l1(x, x).item() == 0
    assert akl.laplacian_pyramid_l1(x, x + 0.3).item() == pytest.approx(0, abs=1e-6)
    assert akl.laplacian_pyramid_l1(x, x + 0.1 * torch.randn_like(x)).item() > 0.01


def test_autoencoder_training_runs_with_gan_and_checks_input():
    ae = akl.build_autoencoder(AE, seed=0)
    images = np.random.default_rng(0).random((8, 1, P, P)).astype(np.float32)
    hist = akl.fit_autoencoder(ae, images, 3, batch_size=4, disc_start=1)
    assert len(hist) == 3 and hist[0]["g_loss"] == 0 and hist[2]["d_loss"] > 0
    with pytest.raises(BTDInputError):
        akl.fit_autoencoder(ae, images[:2], 1, batch_size=4)
    err = akl.reconstruction_error(ae, images)
    assert err["mae"] > 0 and err["highpass_energy_ratio"] > 0


def test_random_masks_are_seeded_and_inside():
    m = ldm.random_masks(20, P, np.random.default_rng(1))
    assert m.shape == (20, P, P) and m.dtype == np.uint8
    assert (m.reshape(20, -1).sum(1) > 0).all()
    assert np.array_equal(m, ldm.random_masks(20, P, np.random.default_rng(1)))


def test_unet_takes_sd_inpainting_nine_channels(model):
    assert model.unet.config.in_channels == 2 * 4 + 1 and model.unet.config.out_channels == 4
    imgs = np.random.default_rng(0).random((2, 1, P, P)).astype(np.float32)
    masks = np.zeros((2, P, P), np.uint8)
    masks[:, 0, 0] = 1  # a 1-pixel mask must survive the resize to the latent grid (max-pool)
    m_lat, masked = model.conditioning(imgs, masks)
    assert m_lat.shape == (2, 1, P // 2, P // 2) and m_lat[:, 0, 0, 0].eq(1).all()
    assert m_lat.sum() == 2 and masked.shape == (2, 4, P // 2, P // 2)


def test_inpaint_without_mask_is_the_autoencoder_round_trip(model):
    imgs = np.random.default_rng(0).random((3, 1, P, P)).astype(np.float32)
    out = ldm.inpaint(model, imgs, np.zeros((3, P, P)), "malign", guidance=2.0, sample_steps=3)
    round_trip = akl.decode(model.ae, model.encode(imgs) / model.scale)
    np.testing.assert_allclose(out, round_trip, atol=1e-5)


def test_inpaint_is_seeded_and_paste_back_restores_outside(model):
    rng = np.random.default_rng(1)
    imgs = rng.random((2, 1, P, P)).astype(np.float32)
    masks = np.zeros((2, P, P), np.uint8)
    masks[:, 4:10, 4:10] = 1
    a = ldm.inpaint(model, imgs, masks, "benign", sample_steps=3, seed=5)
    b = ldm.inpaint(model, imgs, masks, "benign", sample_steps=3, seed=5)
    assert np.array_equal(a, b) and a.shape == imgs.shape
    pasted = ldm.paste_back(imgs, a, masks)
    out = ~masks.astype(bool)[:, None]
    assert np.array_equal(pasted[out], imgs[out]) and np.array_equal(pasted[~out], a[~out])
    with pytest.raises(BTDInputError):
        ldm.inpaint(model, imgs[:, :, :8], masks, "benign")


def test_negative_class_is_what_guidance_steers_away_from(model):
    """SD's negative prompt: e = e_neg + g (e_cond - e_neg); negative = condition cancels guidance."""
    rng = np.random.default_rng(2)
    imgs = rng.random((2, 1, P, P)).astype(np.float32)
    masks = np.zeros((2, P, P), np.uint8)
    masks[:, 4:12, 4:12] = 1
    run = lambda **kw: ldm.inpaint(model, imgs, masks, "malign", sample_steps=3, seed=3, **kw)  # noqa: E731
    plain = run(guidance=1.0)
    np.testing.assert_allclose(run(guidance=5.0, negative="malign"), plain, atol=1e-5)
    assert np.array_equal(run(guidance=1.0, negative="benign"), plain)  # g = 1: no guidance
    assert not np.allclose(run(guidance=5.0, negative="benign"), run(guidance=5.0), atol=1e-4)
    with pytest.raises(BTDInputError, match="negative"):
        run(guidance=5.0, negative="tumour")
    with pytest.raises(BTDConfigError, match="deepfakes.ldm_negative"):
        ldm.make_ldm_fakes(model, imgs, pd.DataFrame(), "inject", "mri", 1.0, [4.0],
                           negative="healthy")  # fmt: skip


def test_save_load_round_trip(model, tmp_path):
    path = ldm.save_inpainter(tmp_path / "ldm.pt", model, {"loss": [1.0]})
    loaded = ldm.load_inpainter(path)
    imgs = np.random.default_rng(2).random((1, 1, P, P)).astype(np.float32)
    masks = np.ones((1, P, P), np.uint8)
    np.testing.assert_array_equal(
        ldm.inpaint(model, imgs, masks, None, sample_steps=2),
        ldm.inpaint(loaded, imgs, masks, None, sample_steps=2),
    )
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(BTDInputError, match="not a btd-ldm-attacker"):
        ldm.load_inpainter(tmp_path / "other.pt")


def _sites(n: int, label: str) -> pd.DataFrame:
    return pd.DataFrame({
        "patient": [f"p{i}" for i in range(n)], "scanner": "s", "split": "holdout", "slice": 0,
        "cy": 50.0, "cx": 50.0, "py": P // 2, "px": P // 2, "label": label, "diameter_mm": 6.0,
    })  # fmt: skip


def test_training_and_fakes_end_to_end(model):
    rng = np.random.default_rng(3)
    patches = rng.random((6, 1, P, P)).astype(np.float32)
    labels = ["TM", "TB"] * 3
    prior = ldm.generic_sampler(model, patches, labels)
    images, masks, classes, z0 = prior(np.random.default_rng(0), 4)
    assert images.shape == (4, 1, P, P) and masks.shape == (4, P, P) and z0.shape == (4, 4, 8, 8)
    hist = ldm.fit(model, prior, 2, batch_size=4)
    assert len(hist) == 2 and np.isfinite(hist[-1]["loss"])
    sites = _sites(6, "TM")
    inst_masks = ldm.tumour_masks(sites, P, "mri", 1.0, None, 1.0)
    injector, h = ldm.finetune_injector(model, patches, inst_masks, prior, 2, batch_size=4)
    assert injector is not model and len(h) == 2
    decoded, pasted, m, meta = ldm.make_ldm_fakes(
        injector, patches[:2], _sites(2, "TB"), "inject", "mri", 1.0, [6.0], sample_steps=2
    )
    assert decoded.shape == pasted.shape == (2, 1, P, P) and m.any()
    assert (meta["attack"] == "inject").all()
    with pytest.raises(BTDInputError):
        ldm.finetune_injector(model, patches[:0], inst_masks[:0], prior, 1)


def test_radial_nps_of_white_noise_is_flat_at_its_variance():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.1, (200, 1, 32, 32))
    regions = np.ones((200, 32, 32), bool)
    freq, nps = traces.radial_nps(noise, regions, n_bins=8)
    assert freq[0] > 0 and freq[-1] < 0.5 and len(nps) == 8
    np.testing.assert_allclose(nps[1:], 0.01, rtol=0.1)  # white: NPS = sigma^2 at every frequency


def test_energy_ratios_see_a_change_outside_the_mask_only_when_there_is_one():
    rng = np.random.default_rng(0)
    n = 10
    reals = rng.normal(0.5, 0.05, (n, 1, P, P))
    meta = pd.DataFrame({"fake": [0] * (n // 2) + [1] * (n // 2), "py": P // 2, "px": P // 2})
    masks = np.zeros((n, P, P), np.uint8)
    masks[n // 2 :, 6:10, 6:10] = 1
    pasted = reals.copy()
    smoothed = reals.copy()
    smoothed[n // 2 :] = 0.5  # a decoder that wipes the noise everywhere
    r = traces.energy_ratios(
        {"A-CT-Inject": (pasted, masks, meta), "B-CT-Inject": (smoothed, masks, meta)}
    )
    assert r.loc["A-CT-Inject", "highpass ratio outside mask"] == pytest.approx(1, abs=0.3)
    assert r.loc["B-CT-Inject", "highpass ratio outside mask"] < 0.01
    spec = traces.spectra({"LDM-CT-Inject-Paste": (pasted, masks, meta)}, n_bins=4)
    assert set(spec["attacker"]) == {"LDM-Paste"} and set(spec["region"]) == set(traces.REGIONS)


def test_nps_log_ratio_is_zero_for_the_same_noise_and_sees_smoothing():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(64, 24, 24))
    f, same = traces.nps_log_ratio(noise, noise)
    assert np.allclose(same, 0.0) and len(f) == len(same)
    from scipy import ndimage

    smooth = np.stack([ndimage.gaussian_filter(n, 1.5) for n in noise])
    _, ratio = traces.nps_log_ratio(smooth, noise)
    assert ratio[-1] < -1 and ratio[-1] < ratio[0]  # high frequencies lost, far more than low ones


def test_sampler_never_clips_the_predicted_latent(model):
    """Latents have no [-1, 1] range: diffusers' default clip_sample=True pulled every in-painted
    latent towards 0 (the mask got the decoder's average patch, whatever its context)."""
    assert model.scheduler.config.clip_sample is False


def test_remover_finetune_uses_the_benign_token_on_its_instances(model):
    rng = np.random.default_rng(4)
    patches = rng.random((6, 1, P, P)).astype(np.float32)
    prior = ldm.generic_sampler(model, patches, ["TM", "TB"] * 3)
    inst_masks = ldm.tumour_masks(_sites(6, "TB").assign(diameter_mm=6.0), P, "mri", 1.0, None, 1.0)
    sample = ldm.dreambooth_sampler(model, patches, inst_masks, prior, "benign")
    _, masks, classes, _ = sample(np.random.default_rng(0), 4)
    assert (classes[:2] == ldm.CLASS_OF["benign"]).all() and masks[:2].any()
    remover, hist = ldm.dreambooth_finetune(model, patches, inst_masks, prior, 2, "benign",
                                            batch_size=4)  # fmt: skip
    assert remover is not model and len(hist) == 2
    with pytest.raises(BTDInputError, match="healthy"):
        ldm.dreambooth_finetune(model, patches[:0], inst_masks[:0], prior, 1, "benign")


def test_healthy_instance_keeps_aerated_ct_sites_and_every_mri_site():
    from btd.data.preprocess import normalize_ct

    hu = np.full((4, 1, P, P), -1000.0, np.float32)  # aerated lung: the window floor, -700 HU
    hu[1] = 40.0  # soft tissue under the mask
    hu[2, 0, 6, 6:10] = 0.0  # 4 of the mask's 16 pixels at 0 HU: mean (12 * -700) / 16 = -525
    hu[3, 0, 6, 6:8] = 0.0  # 2 of 16: mean (14 * -700) / 16 = -612.5
    masks = np.zeros((4, P, P), np.uint8)
    masks[:, 6:10, 6:10] = 1
    images = normalize_ct(hu)
    np.testing.assert_array_equal(
        ldm.healthy_instance(images, masks, "ct", -600.0), [True, False, False, True]
    )
    assert ldm.healthy_instance(images, masks, "mri", -600.0).all()


def test_fit_ldm_names_a_bad_remover_before_training():
    from btd.pipeline.deepfakes import fit_ldm

    with pytest.raises(BTDConfigError, match="ldm_remover"):
        fit_ldm(np.zeros((2, 1, P, P), np.float32), _sites(2, "TB"), "ct", 1.0,
                {"remover": "stock"}, 0)  # fmt: skip


def test_diff_sets_switch_names_the_parameter():
    from btd.pipeline.deepfakes import diff_sets_enabled

    assert diff_sets_enabled("make") and not diff_sets_enabled("skip")
    with pytest.raises(BTDConfigError, match="deepfakes.diff_sets"):
        diff_sets_enabled("false")
