"""Deepfake test sets: contract round trip, consistency checks, splits, attack success, realism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from btd.attacks.testsets import (
    META_COLUMNS,
    TumourClassifier,
    attack_success,
    build_testset,
    check_disjoint,
    load_testset,
    realism_stats,
    sample_sites,
    write_testset,
)
from btd.errors import BTDConfigError, BTDInputError

torch.set_num_threads(1)
P = 16


def rows(n: int, label: str, split: str = "holdout") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "index": range(n), "patient": [f"h{i}" for i in range(n)], "scanner": "s1",
            "split": split, "slice": 1, "cy": 50, "cx": 60, "py": P // 2, "px": P // 2,
            "diameter_mm": 10.0 if label == "TM" else 0.0, "label": label,
        }
    )  # fmt: skip


def fake_parts(n: int, rng: np.random.Generator):
    images = rng.random((n, 1, P, P)).astype(np.float32)
    masks = np.zeros((n, P, P), np.uint8)
    masks[:, 4:12, 4:12] = 1
    meta = rows(n, "TB").drop(columns=["label", "index"])
    return images, masks, meta


@pytest.fixture
def injection_set():
    rng = np.random.default_rng(0)
    reals = (rng.random((3, 1, P, P)).astype(np.float32), rows(3, "TM"))
    return build_testset("DIFF-CT-Inject", reals, fake_parts(2, rng))


def test_build_write_load_roundtrip(tmp_path, injection_set):
    images, masks, meta = injection_set
    assert list(meta.columns) == META_COLUMNS
    assert meta["label"].tolist() == ["TM", "TM", "TM", "FM", "FM"]
    assert meta["fake"].tolist() == [0, 0, 0, 1, 1] and (meta["attack"] == "inject").all()
    assert masks[:3].sum() == 0 and (masks[3:].sum(axis=(1, 2)) == 64).all()
    folder = write_testset(tmp_path / "DIFF-CT-Inject", images, masks, meta)
    im2, m2, meta2 = load_testset(folder)
    assert np.array_equal(im2, images) and np.array_equal(m2, masks)
    pd.testing.assert_frame_equal(meta2, meta, check_dtype=False)
    write_testset(folder, images[:4], masks[:4], meta.iloc[:4])  # overwrite: swapped in whole
    assert len(load_testset(folder)[0]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIFF-CT-Inject"]  # no temp left


def test_removal_labels():
    rng = np.random.default_rng(1)
    _, masks, meta = build_testset("DIFF-MRI-Remove", (rng.random((2, 1, P, P)), rows(2, "TB")),
                                   fake_parts(3, rng))  # fmt: skip
    assert meta["label"].tolist() == ["TB", "TB", "FB", "FB", "FB"]
    with pytest.raises(BTDConfigError):
        build_testset(
            "DIFF-MRI-Swap", (rng.random((2, 1, P, P)), rows(2, "TB")), fake_parts(3, rng)
        )


def test_build_rejects_inconsistent_inputs():
    rng = np.random.default_rng(2)
    imgs = rng.random((2, 1, P, P))
    with pytest.raises(BTDInputError, match="must all be TM"):
        build_testset("DIFF-CT-Inject", (imgs, rows(2, "TB")), fake_parts(1, rng))
    with pytest.raises(BTDInputError, match="holdout"):
        build_testset("DIFF-CT-Inject", (imgs, rows(2, "TM", split="train")), fake_parts(1, rng))
    f_img, f_mask, f_meta = fake_parts(1, rng)
    with pytest.raises(BTDInputError, match="empty mask"):
        build_testset("DIFF-CT-Inject", (imgs, rows(2, "TM")), (f_img, 0 * f_mask, f_meta))


def test_load_detects_broken_files(tmp_path, injection_set):
    images, masks, meta = injection_set
    folder = write_testset(tmp_path / "set", images, masks, meta)
    bad = meta.copy()
    bad.loc[0, "label"] = "FM"
    bad.to_csv(folder / "meta.csv", index=False)
    with pytest.raises(BTDInputError, match="labels must be TM"):
        load_testset(folder)
    meta.to_csv(folder / "meta.csv", index=False)
    m = masks.copy()
    m[0, 0, 0] = 1
    np.save(folder / "masks.npy", m)
    with pytest.raises(BTDInputError, match="real samples must have empty masks"):
        load_testset(folder)
    (folder / "images.npy").unlink()
    with pytest.raises(BTDInputError, match="images.npy"):
        load_testset(folder)


def test_check_disjoint_and_sampling():
    check_disjoint(["a", "b"], ["c"])
    with pytest.raises(BTDInputError, match="1 patient"):
        check_disjoint(["a", "b"], ["b", "c"])
    man = pd.concat(
        [rows(10, "TM"), rows(5, "TB"), rows(4, "TM", split="train")], ignore_index=True
    )
    picked = sample_sites(man, "TM", 4, seed=0)
    assert len(picked) == 4 and (picked["split"] == "holdout").all()
    assert picked.equals(sample_sites(man, "TM", 4, seed=0))
    assert len(sample_sites(man, "TB", 50, seed=0)) == 5


def disc_patches(n: int, malign: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 0.3 + 0.05 * rng.standard_normal((n, 1, P, P))
    if malign:
        yy, xx = np.mgrid[:P, :P]
        x[:, 0][:, (yy - 8) ** 2 + (xx - 8) ** 2 <= 9] += 0.5
    return np.clip(x, 0, 1).astype(np.float32)


def test_tumour_classifier_learns_separable_task():
    x = np.concatenate([disc_patches(48, True, 0), disc_patches(48, False, 1)])
    y = ["TM"] * 48 + ["TB"] * 48
    vx = np.concatenate([disc_patches(16, True, 2), disc_patches(16, False, 3)])
    vy = [1] * 16 + [0] * 16
    clf = TumourClassifier(width=8, seed=0)
    hist = clf.fit(x, y, val=(vx, vy), epochs=8, batch_size=32, lr=5e-3)
    assert clf.val_accuracy is not None and clf.val_accuracy >= 0.95
    assert hist["loss"][-1] < hist["loss"][0]
    assert attack_success(clf, disc_patches(10, True, 4), "inject") >= 0.9
    assert attack_success(clf, disc_patches(10, False, 5), "remove") >= 0.9


class _Stub:
    def __init__(self, p):
        self.p = np.asarray(p)

    def predict_proba(self, patches):
        return self.p


def test_attack_success_known_answer():
    fakes = np.zeros((4, 1, P, P), np.float32)
    assert attack_success(_Stub([0.9, 0.6, 0.2, 0.5]), fakes, "inject") == 0.75
    assert attack_success(_Stub([0.9, 0.6, 0.2, 0.5]), fakes, "remove") == 0.25
    with pytest.raises(BTDConfigError):
        attack_success(_Stub([0.1] * 4), fakes, "swap")


def test_realism_stats_known_answer():
    rng = np.random.default_rng(0)
    n = 6
    images = 0.3 + 0.05 * rng.standard_normal((n, 1, 32, 32))
    masks = np.zeros((n, 32, 32), np.uint8)
    masks[3:, 12:20, 12:20] = 1  # fakes: the square is smooth and bright
    images[3:, 0, 12:20, 12:20] = 0.8
    meta = pd.DataFrame({"fake": [0, 0, 0, 1, 1, 1], "py": 16, "px": 16})
    stats = realism_stats(images, masks, meta, sigma=1.0)
    assert stats.loc["real", "n"] == 3 and stats.loc["fake", "n"] == 3
    assert abs(stats.loc["fake", "mean_in"] - 0.8) < 1e-9
    assert abs(stats.loc["real", "mean_in"] - 0.3) < 0.02
    assert abs(stats.loc["real", "noise_ratio"] - 1.0) < 0.25  # same noise in and out
    assert stats.loc["fake", "noise_ratio"] < 0.6 * stats.loc["real", "noise_ratio"]


def test_load_testsets_requires_the_paper_sets_and_takes_the_extras_that_exist(
    tmp_path, injection_set
):
    from btd.pipeline.score import load_testsets
    from btd.scenarios import PAPER_SCENARIOS

    images, masks, meta = injection_set
    for name in PAPER_SCENARIOS + ("LDM-CT-Inject-Paste",):
        write_testset(tmp_path / name, images, masks, meta)
    assert list(load_testsets(tmp_path)) == [*PAPER_SCENARIOS, "LDM-CT-Inject-Paste"]  # no DIFF
    (tmp_path / "LDM-MRI-Remove" / "images.npy").unlink()
    with pytest.raises(BTDInputError, match="LDM-MRI-Remove"):
        load_testsets(tmp_path)
