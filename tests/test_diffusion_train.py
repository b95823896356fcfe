"""Training loop: exact resume, validation loss, checkpoint errors, timestep samplers."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from btd.diffusion import TrainConfig, load_checkpoint, load_detector, make_sampler, train
from btd.diffusion.timesteps import low_t_pmf
from btd.errors import BTDConfigError, BTDInputError


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest single-threaded; OpenMP spinning on a busy machine costs 10-100x."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_config(**overrides) -> TrainConfig:
    base = dict(
        image_size=16,
        dim=8,
        dim_mults=(1, 2),
        batch_size=4,
        steps=10,
        lr=1e-3,
        ema_decay=0.9,
        ema_update_every=1,
        ema_update_after_step=2,  # so the EMA really averages within 10 steps
        timestep_sampler="low_t",
        timestep_kwargs={"p_low": 0.5, "scale": 10.0},
        val_every=5,
        ckpt_every=5,
        seed=3,
        hflip=True,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((24, 1, 16, 16), dtype=np.float32), rng.random(
        (8, 1, 16, 16), dtype=np.float32
    )


class Interrupt(Exception):
    pass


def _raise_at(step_to_stop: int):
    def hook(step: int) -> None:
        if step == step_to_stop:
            raise Interrupt

    return hook


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 10-step run."""
    train_x, val_x = data
    out = tmp_path_factory.mktemp("ref")
    return train(train_x, tiny_config(), out, val_patches=val_x, progress=False)


def test_resume_after_kill_is_bit_identical(data, reference, tmp_path):
    train_x, val_x = data
    with pytest.raises(Interrupt):  # killed at step 7: last checkpoint is step 5
        train(
            train_x,
            tiny_config(),
            tmp_path,
            val_patches=val_x,
            progress=False,
            on_step=_raise_at(7),
        )
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5
    resumed = train(train_x, tiny_config(), tmp_path, val_patches=val_x, progress=False)
    assert resumed.start_step == 5 and resumed.end_step == 10
    assert _same_tensors(resumed.model.state_dict(), reference.model.state_dict())
    assert _same_tensors(resumed.ema_model.state_dict(), reference.ema_model.state_dict())
    # the EMA really differs from the online weights (else the check above proves little)
    assert not _same_tensors(resumed.ema_model.state_dict(), resumed.model.state_dict())
    strip = [{k: v for k, v in e.items() if k != "wall_s"} for e in reference.loss_log]
    assert [{k: v for k, v in e.items() if k != "wall_s"} for e in resumed.loss_log] == strip


def test_train_5_then_extend_to_10_is_bit_identical(data, reference, tmp_path):
    train_x, val_x = data
    train(train_x, tiny_config(steps=5), tmp_path, val_patches=val_x, progress=False)
    extended = train(train_x, tiny_config(steps=10), tmp_path, val_patches=val_x, progress=False)
    assert _same_tensors(extended.model.state_dict(), reference.model.state_dict())
    ref_opt = load_checkpoint(reference.checkpoint)["optimizer"]
    ext_opt = load_checkpoint(extended.checkpoint)["optimizer"]
    assert all(
        torch.equal(ref_opt["state"][i]["exp_avg_sq"], ext_opt["state"][i]["exp_avg_sq"])
        for i in ref_opt["state"]
    )


def test_validation_loss_is_logged(reference):
    log = reference.loss_log
    assert [e["step"] for e in log] == [5, 10]
    for entry in log:
        assert math.isfinite(entry["train_loss"]) and math.isfinite(entry["val_loss"])
        assert math.isfinite(entry["val_loss_t0"])
    with open(reference.loss_log_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert float(rows[1]["val_loss"]) == pytest.approx(log[1]["val_loss"])


def test_load_detector_gives_ema_weights(reference):
    diffusion, config = load_detector(reference.checkpoint)
    assert config == tiny_config()
    assert _same_tensors(diffusion.state_dict(), reference.ema_model.state_dict())
    assert not diffusion.training


def test_training_reduces_loss(tmp_path):
    """Smooth images are easy to denoise: the fixed-set val loss must fall clearly."""
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 64, 1, 1))
    imgs = (0.5 + 0.4 * np.sin(3 * (a * yy + b * xx)))[:, None].astype(np.float32)
    cfg = tiny_config(
        steps=60, val_every=30, ckpt_every=60, timestep_sampler="uniform", timestep_kwargs={}
    )
    res = train(imgs, cfg, tmp_path, val_patches=imgs[:16], progress=False)
    first, last = res.loss_log[0]["val_loss"], res.loss_log[-1]["val_loss"]
    assert last < 0.7 * first, (first, last)


def test_resume_with_other_model_size_or_settings(reference, data, tmp_path):
    train_x, _ = data
    (tmp_path / "checkpoint.pt").write_bytes(reference.checkpoint.read_bytes())
    with pytest.raises(BTDInputError, match=r"checkpoint\.pt.*dim=8 \(checkpoint\) vs 16"):
        train(train_x, tiny_config(dim=16), tmp_path, progress=False)
    with pytest.raises(BTDInputError, match="dim_mults"):
        load_checkpoint(reference.checkpoint, expected=tiny_config(dim_mults=(1, 2, 2)).to_dict())
    with pytest.raises(BTDConfigError, match="'lr'"):
        train(train_x, tiny_config(lr=5e-4), tmp_path, progress=False)


def test_resume_refuses_a_checkpoint_of_other_data_and_the_stage_retrains(data, tmp_path):
    from btd.pipeline.train_ddpm import train_or_resume

    train_x, val_x = data
    first = {"data_sha256": "a" * 64}
    train(train_x, tiny_config(steps=5), tmp_path, progress=False, data=first)
    with pytest.raises(
        BTDInputError,
        match=r"checkpoint\.pt.*other data \(data_sha256 aaaaaaaaaaaa, now bbbbbbbbbbbb\)",
    ):
        train(
            train_x, tiny_config(steps=10), tmp_path, progress=False, data={"data_sha256": "b" * 64}
        )
    same = train(train_x, tiny_config(steps=6), tmp_path, progress=False, data=first)
    assert same.start_step == 5  # same fingerprint: resumed
    fresh = train_or_resume(
        train_x, val_x, tiny_config(steps=5), tmp_path, {"data_sha256": "b" * 64}
    )
    assert fresh.start_step == 0 and fresh.end_step == 5
    assert load_checkpoint(tmp_path / "checkpoint.pt")["data"]["data_sha256"] == "b" * 64


def test_bad_checkpoint_files(reference, tmp_path):
    blob = reference.checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(blob[: len(blob) // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    short = tmp_path / "short.pt"
    short.write_text("hello")
    foreign = tmp_path / "foreign.pt"
    torch.save({"step": 1, "model": {"w": torch.zeros(2)}}, foreign)
    for path, why in [
        (truncated, "corrupt"),
        (text, "corrupt"),
        (short, "corrupt"),
        (foreign, "not a BTD"),
        (tmp_path / "missing.pt", "not found"),
    ]:
        with pytest.raises(BTDInputError, match=why) as info:
            load_detector(path)
        assert str(path) in str(info.value)


def test_bad_training_inputs(tmp_path):
    with pytest.raises(BTDInputError, match="train_patches"):
        train(np.zeros((4, 1, 8, 8), np.float32), tiny_config(), tmp_path, progress=False)
    with pytest.raises(BTDConfigError, match="image_size"):
        tiny_config(image_size=18, dim_mults=(1, 2, 4)).validate()
    with pytest.raises(BTDConfigError, match="batch_size"):
        tiny_config(batch_size=0).validate()
    with pytest.raises(BTDConfigError, match="nope"):
        TrainConfig.from_dict({"nope": 1})


def test_low_t_sampler_concentrates_on_small_t():
    gen = torch.Generator().manual_seed(0)
    low = make_sampler("low_t", 1000, p_low=0.5, scale=20.0)
    uni = make_sampler("uniform", 1000)
    assert float(low.pmf.sum()) == pytest.approx(1.0)
    expected = float(low_t_pmf(1000, 0.5, 20.0)[:50].sum())
    assert expected == pytest.approx(0.5 * (1 - math.exp(-50 / 20)) + 0.5 * 0.05, rel=1e-6)
    n = 20000
    t_low, t_uni = low(n, gen), uni(n, gen)
    assert t_low.dtype == torch.long and 0 <= int(t_low.min()) and int(t_low.max()) <= 999
    frac_low = float((t_low < 50).float().mean())
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs(frac_low - expected) < 4 * sigma
    assert float((t_uni < 50).float().mean()) == pytest.approx(0.05, abs=0.01)
    assert float((t_low == 0).float().mean()) > 10 * float((t_uni == 0).float().mean() + 1e-4)


def test_sampler_errors():
    with pytest.raises(BTDConfigError, match="timestep_sampler"):
        make_sampler("cosine_fancy", 1000)
    with pytest.raises(BTDConfigError, match="p_low"):
        make_sampler("low_t", 1000, p_low=1.5)
    with pytest.raises(BTDConfigError, match="timestep_kwargs"):
        make_sampler("uniform", 1000, scale=3.0)
    with pytest.raises(BTDConfigError, match="timestep_sampler"):
        tiny_config(timestep_sampler="bogus").validate()


def test_load_split(tmp_path):
    import pandas as pd

    from btd.diffusion import load_split

    patches = np.stack([np.full((1, 8, 8), i / 10, np.float32) for i in range(5)])
    np.save(tmp_path / "patches.npy", patches)
    rows = [
        dict(
            index=i,
            patient=f"p{i}",
            scanner="s",
            split=s,
            slice=0,
            cy=4,
            cx=4,
            diameter_mm=0,
            label="TB",
        )
        for i, s in zip([4, 0, 2, 1, 3], ["val", "train", "val", "train", "holdout"], strict=True)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    x, manifest = load_split(tmp_path, "val")
    assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32
    assert manifest["index"].tolist() == [4, 2]
    np.testing.assert_allclose(x[:, 0, 0, 0], [0.4, 0.2])
    with pytest.raises(BTDConfigError, match="split"):
        load_split(tmp_path, "test")
    with pytest.raises(BTDInputError, match="patches.npy"):
        load_split(tmp_path / "nowhere", "val")
    pd.DataFrame(rows).drop(columns="label").to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(BTDInputError, match="label"):
        load_split(tmp_path, "val")


def test_accelerate_single_process_is_the_plain_loop(data, reference, tmp_path):
    """Through accelerate (1 process, CPU) the run is the plain loop, bit for bit, and resumable."""
    from accelerate import Accelerator

    train_x, val_x = data
    acc = Accelerator(cpu=True)
    train(
        train_x, tiny_config(steps=5), tmp_path, val_patches=val_x, progress=False, accelerator=acc
    )
    result = train(
        train_x, tiny_config(), tmp_path, val_patches=val_x, progress=False, accelerator=acc
    )
    assert result.start_step == 5 and result.end_step == 10
    assert _same_tensors(result.model.state_dict(), reference.model.state_dict())
    assert _same_tensors(result.ema_model.state_dict(), reference.ema_model.state_dict())
    diffusion, _ = load_detector(result.checkpoint)  # the usual checkpoint format
    assert _same_tensors(diffusion.state_dict(), reference.ema_model.state_dict())


def test_global_batch_is_split_across_processes():
    """Each process gets its slice of one global draw; world = 1 is the plain draw."""
    from btd.diffusion.train import _draw_batch

    cfg = tiny_config(batch_size=3)
    patches = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1).expand(20, 1, 16, 16)
    sampler = cfg.sampler()

    def draw(world, rank):
        return _draw_batch(patches, cfg, sampler, torch.Generator().manual_seed(0), world, rank)

    parts = [draw(2, r) for r in (0, 1)]
    whole = _draw_batch(
        patches, tiny_config(batch_size=6), sampler, torch.Generator().manual_seed(0)
    )
    for k in range(3):  # batch, times, noise
        assert torch.equal(torch.cat([parts[0][k], parts[1][k]]), whole[k])
    assert not torch.equal(parts[0][0], parts[1][0])


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_global_batch(data, tmp_path):
    """`torchrun` (what `accelerate launch` runs) with 2 CPU processes x batch 2 follows the
    single-process run with batch 4: DDP averages the two half-batch gradients."""
    import subprocess
    import sys

    from btd.diffusion.train import TrainConfig

    train_x, val_x = data
    folder = tmp_path / "patches"
    folder.mkdir()
    np.save(folder / "patches.npy", np.concatenate([train_x, val_x]))
    rows = ["index,patient,scanner,split,slice,cy,cx,py,px,diameter_mm,label"]
    for i in range(len(train_x) + len(val_x)):
        split = "train" if i < len(train_x) else "val"
        rows.append(f"{i},p{i % 4},s0,{split},0,8,8,8,8,,TB")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", "-m", "btd.cli", "train", "--accelerate",
           "--patches", str(folder), "--out", str(tmp_path / "m"), "--steps", "6",
           "--batch-size", "2", "--dim", "8", "--dim-mults", "1,2", "--device", "cpu", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate: 2 process(es)" in proc.stdout
    assert proc.stdout.count("checkpoint:") == 1  # printed by the main process only
    two = load_checkpoint(tmp_path / "m" / "checkpoint.pt")
    assert two["step"] == 6
    one_cfg = TrainConfig.from_dict({**two["config"], "batch_size": 4})
    one = train(train_x, one_cfg, tmp_path / "one", val_patches=val_x, progress=False)
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=1e-5)
    # control: one process with the per-process batch (2) ends elsewhere
    half = train(train_x, TrainConfig.from_dict(two["config"]), tmp_path / "half", progress=False)
    gap = max((two["model"][k] - v).abs().max().item() for k, v in half.model.state_dict().items())
    assert gap > 1e-4


def test_min_snr_weighting_reaches_the_library_and_changes_only_the_loss(data, tmp_path):
    from btd.diffusion.config import build_from_config

    plain, snr = build_from_config(tiny_config()), build_from_config(tiny_config(min_snr_gamma=5.0))
    assert _same_tensors(plain.model.state_dict(), snr.model.state_dict())  # same U-Net and start
    # pred_noise: weight = min(SNR, gamma) / SNR, i.e. small t (huge SNR) is down-weighted
    assert float(snr.loss_weight[0]) < 0.01 and float(plain.loss_weight[0]) == 1.0
    assert float(snr.loss_weight[-1]) == pytest.approx(1.0)
    with pytest.raises(BTDConfigError, match="min_snr_gamma"):
        tiny_config(min_snr_gamma=-1.0).validate()
    result = train(data[0], tiny_config(min_snr_gamma=5.0, steps=4), tmp_path, progress=False)
    assert result.config.min_snr_gamma == 5.0


def test_band_losses_are_fixed_problems_per_band(reference, data):
    from btd.diffusion.model import T_BANDS, band_losses

    model = reference.ema_model
    a = band_losses(model, data[1], seed=1)
    assert list(a) == list(T_BANDS) and all(np.isfinite(v) and v > 0 for v in a.values())
    assert band_losses(model, data[1], seed=1) == a  # same patches, times and noise
    assert band_losses(model, data[1], seed=2) != a
    one = band_losses(model, data[1], {"t=0": (0, 1)}, seed=1)
    assert one == {"t=0": a["t=0"]}
    with pytest.raises(BTDConfigError, match="bands"):
        band_losses(model, data[1], {"empty": (5, 5)})
