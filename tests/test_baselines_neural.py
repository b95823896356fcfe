"""The neural reconstruction baselines (AE, U-Net AE, In-Paint AE, OC-VAE, Satellite ViT),
the baseline interface (save/load) and the registry."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from btd.baselines import Baseline, load_baseline, make_baseline, save_baseline
from btd.baselines.autoencoders import centre_hole
from btd.baselines.registry import REGISTRY
from btd.baselines.storage import _decode, _encode
from btd.errors import BTDConfigError, BTDInputError

P = 20  # not a multiple of 16 (AE, U-Net) or 8 (ViT): the padding paths run
NEURAL = ["ae", "unet_ae", "inpaint_ae", "oc_vae", "vit_ae"]
SMALL = {
    "ae": dict(width=8, latent=8, epochs=12, lr=3e-3),
    "unet_ae": dict(init_features=8, epochs=6, lr=3e-3),
    "inpaint_ae": dict(width=8, epochs=12, lr=3e-3),
    "oc_vae": dict(width=8, hidden=64, latent=16, epochs=12, lr=3e-3),
    "vit_ae": dict(dim=32, depth=2, heads=2, patch_size=4, epochs=12, lr=3e-3),
}


def blobs(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random Gaussian blobs plus faint noise: the 'real' distribution of these tests."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.uniform(0, size, 2)
            s, a = rng.uniform(size / 8, size / 3), rng.uniform(0.2, 0.6)
            out[i, 0] += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    out += 0.01 * rng.standard_normal(out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def outliers(size: int) -> np.ndarray:
    """A checkerboard and strong white noise: nothing like smooth blobs."""
    checker = (np.indices((size, size)).sum(0) % 2).astype(np.float32)
    noise = np.random.default_rng(99).uniform(0, 1, (size, size)).astype(np.float32)
    return np.stack([checker, noise])[:, None]


def build(name: str, seed: int = 0, **over) -> Baseline:
    return make_baseline(
        name, **{**SMALL[name], "seed": seed, "batch_size": 8, "progress": False, **over}
    )


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return {"train": blobs(96, P, 0), "val": blobs(32, P, 1), "test": blobs(16, P, 2)}


@pytest.fixture(scope="module")
def fitted(data) -> dict[str, tuple[Baseline, list[dict]]]:
    torch.set_num_threads(1)  # small nets: threads only add contention
    out = {}
    for name in NEURAL:
        model = build(name)
        out[name] = (model, model.fit(data["train"], data["val"]))
    return out


@pytest.mark.parametrize("name", NEURAL)
def test_outliers_score_above_real_patches(fitted, data, name):
    model, history = fitted[name]
    real = model.score(data["test"])
    odd = model.score(outliers(P))
    assert real.shape == (16,) and odd.shape == (2,)
    assert odd.min() > real.max(), (name, odd, real.max())


@pytest.mark.parametrize("name", NEURAL)
def test_history_has_decreasing_val_loss(fitted, name):
    _, history = fitted[name]
    assert [row["epoch"] for row in history] == list(range(1, SMALL[name]["epochs"] + 1))
    assert {"train_loss", "val_loss", "seconds"} <= set(history[0])
    assert min(r["val_loss"] for r in history) < history[0]["val_loss"]


@pytest.mark.parametrize("name", NEURAL)
def test_anomaly_map_shape_and_score_consistency(fitted, data, name):
    model, _ = fitted[name]
    heat = model.anomaly_map(data["test"])
    assert heat.shape == (16, P, P) and (heat >= 0).all()
    if name in ("ae", "unet_ae"):  # score = patch MSE = mean of the squared-error map
        np.testing.assert_allclose(model.score(data["test"]), heat.mean((1, 2)), rtol=1e-5)
    if name == "oc_vae":  # RMSE
        np.testing.assert_allclose(model.score(data["test"]), np.sqrt(heat.mean((1, 2))), rtol=1e-5)


@pytest.mark.parametrize("name", NEURAL)
def test_save_load_round_trip_gives_identical_scores(fitted, data, name, tmp_path):
    model, _ = fitted[name]
    path = save_baseline(model, tmp_path / f"{name}.pt")
    loaded = load_baseline(path)
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.score(data["test"]), model.score(data["test"]))
    np.testing.assert_array_equal(loaded.anomaly_map(data["test"]), model.anomaly_map(data["test"]))


@pytest.mark.parametrize("name", ["ae", "oc_vae", "vit_ae"])
def test_training_is_deterministic_given_the_seed(data, name):
    train, val, test = data["train"][:32], data["val"][:8], data["test"]
    runs = []
    for seed in (0, 0, 1):
        model = build(name, seed=seed, epochs=2)
        history = model.fit(train, val)
        runs.append(([r["val_loss"] for r in history], model.score(test)))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][1], runs[2][1])


def test_fit_leaves_the_global_torch_rng_alone(data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build("ae", epochs=1).fit(data["train"][:8], data["val"][:4])
    assert torch.equal(torch.rand(3), expected)


def test_inpaint_prediction_ignores_the_hole_and_scores_only_the_hole(fitted, data):
    model, _ = fitted["inpaint_ae"]
    lo, hi = centre_hole(P, model.hole_fraction)
    x = data["test"].copy()
    y = x.copy()
    y[:, :, lo:hi, lo:hi] = np.random.default_rng(5).uniform(0, 1, (16, 1, hi - lo, hi - lo))
    # the network never sees the hole: identical predictions whatever the hole holds
    np.testing.assert_array_equal(model.reconstruct(x), model.reconstruct(y))
    heat = model.anomaly_map(y)
    outside = np.ones((P, P), bool)
    outside[lo:hi, lo:hi] = False
    assert (heat[:, outside] == 0).all()
    np.testing.assert_allclose(model.score(y), heat[:, lo:hi, lo:hi].mean((1, 2)), rtol=1e-5)
    assert (model.score(y) > model.score(x)).all()
    # noise outside the hole only enters through the completion, not as error pixels
    z = x.copy()
    z[:, :, :2, :2] = 1.0
    np.testing.assert_array_equal(model.anomaly_map(z)[:, outside], 0)


def test_vit_threshold_is_fitted_on_validation(fitted, data):
    model, _ = fitted["vit_ae"]
    heat_val = model.anomaly_map(data["val"])
    assert model.threshold == pytest.approx(np.percentile(heat_val, 99.0), rel=1e-6)
    heat = model.anomaly_map(data["test"])
    expected = np.where(heat > model.threshold, heat, 0).sum((1, 2))
    np.testing.assert_allclose(model.score(data["test"]), expected, rtol=1e-5)
    # noisier validation data -> higher threshold; same weights (training does not see val)
    noisy_val = np.clip(
        data["val"] + 0.2 * np.random.default_rng(3).standard_normal(data["val"].shape), 0, 1
    )
    other = build("vit_ae")
    other.fit(data["train"], noisy_val.astype(np.float32))
    assert other.threshold > 2 * model.threshold


def test_vit_image_mode_compares_derivatives(data):
    model = build("vit_ae", input_mode="image")
    model.fit(data["train"], data["val"])
    assert model.reconstruct(data["test"]).shape == (16, 1, P, P)
    assert model.score(outliers(P)).min() > model.score(data["test"]).max()
    with pytest.raises(BTDConfigError, match="input_mode"):
        build("vit_ae", input_mode="fft")


@pytest.mark.parametrize("name", NEURAL)
@pytest.mark.parametrize("size", [18, 32])
def test_other_patch_sizes_work(name, size):
    x = blobs(6, size, 4)
    model = build(name, epochs=1)
    model.fit(x[:4], x[4:])
    assert model.anomaly_map(x).shape == (6, size, size)
    assert model.reconstruct(x).shape[-2:] == (size, size)
    with pytest.raises(BTDInputError, match=r"\(6, 1, 16, 16\)"):
        model.score(blobs(6, 16, 4))


@pytest.mark.parametrize("name", NEURAL)
def test_wrong_input_shape_names_the_shape(name):
    model = build(name)
    with pytest.raises(BTDInputError, match=r"\(4, 20, 20\)"):
        model.fit(np.zeros((4, P, P), np.float32), np.zeros((2, 1, P, P), np.float32))
    with pytest.raises(BTDInputError, match=r"\(2, 3, 20, 20\)"):
        model.fit(np.zeros((4, 1, P, P), np.float32), np.zeros((2, 3, P, P), np.float32))
    bad = np.zeros((4, 1, P, P), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(BTDInputError, match="non-finite"):
        model.fit(bad, bad)


def test_scoring_before_fit_is_a_config_error():
    with pytest.raises(BTDConfigError, match="not fitted"):
        build("ae").score(np.zeros((2, 1, P, P), np.float32))


def test_registry_unknown_name_and_parameter():
    with pytest.raises(BTDConfigError, match="unknown baseline 'nope'"):
        make_baseline("nope")
    with pytest.raises(BTDConfigError, match=r"baselines\.ae\.widht"):
        make_baseline("ae", widht=3)
    with pytest.raises(BTDConfigError, match="ae.epochs"):
        make_baseline("ae", epochs=0)
    assert {"ae", "unet_ae", "inpaint_ae", "oc_vae", "vit_ae", "splicebuster"} <= set(REGISTRY)


def test_load_baseline_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(BTDInputError, match="bad.pt"):
        load_baseline(bad)
    with pytest.raises(BTDInputError, match="not found"):
        load_baseline(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(BTDInputError, match="not a BTD baseline"):
        load_baseline(tmp_path / "other.pt")


class _Dummy(Baseline):
    """A non-torch baseline whose state holds numpy arrays (like SpliceBuster's statistics)."""

    name = "dummy"

    def __init__(self, k: int = 2):
        super().__init__(k=k)
        self.stats: dict = {}

    def fit(self, train, val, train_meta=None, val_meta=None):
        self.stats = {"mean": train.mean((0, 1)), "n": np.int64(len(train)), "tags": ["a", 1.5]}
        return []

    def score(self, x):
        return np.abs(x[:, 0] - self.stats["mean"]).mean((1, 2)) * self.params["k"]

    def state(self):
        return self.stats

    def load_state(self, state):
        self.stats = state


def test_numpy_state_round_trips_through_weights_only_file(monkeypatch, tmp_path, data):
    module = types.ModuleType("btd_test_dummy")
    module._Dummy = _Dummy
    monkeypatch.setitem(sys.modules, "btd_test_dummy", module)
    monkeypatch.setitem(REGISTRY, "dummy", "btd_test_dummy:_Dummy")
    model = make_baseline("dummy", k=3)
    model.fit(data["train"], data["val"])
    loaded = load_baseline(save_baseline(model, tmp_path / "d.pt"))
    assert isinstance(loaded.stats["mean"], np.ndarray) and loaded.stats["n"] == 96
    np.testing.assert_array_equal(loaded.score(data["test"]), model.score(data["test"]))
    assert _decode(_encode({"a": [np.ones(2)]}))["a"][0].tolist() == [1.0, 1.0]
    with pytest.raises(BTDConfigError, match="params.k"):
        _Dummy(k=np.ones(2))
