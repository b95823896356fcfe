"""CT-GAN (Mirsky et al., USENIX Security 2019) reimplemented in PyTorch: 3-D in-painting cGANs.

Two independent pix2pix-style conditional GANs on isotropic CT cubes (32^3 at 1 mm by default): an
*injector* trained only on cubes centred on real tumours and a *remover* trained only on cubes at
healthy sites. Both learn the same task -- complete a cube whose centre was zeroed -- so at attack
time the injector can only complete a healthy site with a tumour and the remover a tumour site with
healthy tissue. Facts follow the Keras reference (reference/attacks_baselines.md, section 1):

- preprocessing: histogram equalisation fitted on the training cubes (10 000 bins, np.interp both
  ways), then an affine map of the CDF to [-1, 1] (CT-GAN: (x - mean)/(max - min), about +-0.5; the
  full tanh range is used here). Each model keeps its own equaliser.
- input: the cube with its centre zeroed (6:26 of 32 on every axis; scaled for other sizes).
- generator: 3-D U-Net, down = Conv3d(k4, s2) -> LeakyReLU(0.2) -> BN (none on the first), up =
  Upsample(2) -> Conv3d(k4, s1) -> ReLU -> Dropout -> BN -> concat(skip), tanh output; filters
  gf, 2gf, 4gf, 8gf, 8gf. Keras BN (momentum 0.8, eps 1e-3) -> PyTorch momentum 0.2.
- discriminator: 3-D PatchGAN on concat(cube, masked cube), 4 x [Conv3d(k4, s2) -> LeakyReLU -> BN]
  then Conv3d(1, k4, s1), no sigmoid.
- loss: least squares GAN (MSE) + 100 x L1 over the whole cube; Adam(2e-4, beta1 0.5) for G.
- augmentation: in-plane flips and 90 degree rotations, small random shifts (CT-GAN: flips, +-4 px
  shifts and 6-degree rotations, precomputed).

Deviations, all parameters (`PAPER_SETTINGS` holds CT-GAN's values): the CPU defaults train a few
hundred steps instead of ~40k, so `base_filters` is 8 (CT-GAN: 100), dropout is 0 (CT-GAN: 0.5 in
every up block; it slowed learning the centre markedly at this budget) and D's lr is 2e-5 (CT-GAN
compiles D with 1e-6, likely a slip; with 1e-6 D barely learns). One D step on (real + fake) / 2
per iteration instead of two Keras calls. `centre_weight` > 1 would up-weight the in-painted centre
in the L1 (default 1 = CT-GAN). Channels-last memory layout: about 2x faster 3-D convs on CPU.
"""

from __future__ import annotations

import math
import pickle
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from btd.atomic import atomic_path
from btd.attacks.cubes import ROLES, check_cube_geometry, cut_cube
from btd.attacks.postprocess import fix_hu, paste_back
from btd.data.records import ScanVolume
from btd.errors import BTDConfigError, BTDInputError

FORMAT = "btd-ctgan-v1"
PAPER_BASE_FILTERS = 100  # CT-GAN's gf = df = 100
# CT-GAN's own training settings (Keras reference): fit(batch_size=32) for 200 epochs of its
# ~67x augmented set. For the `paper` profile on a GPU.
PAPER_SETTINGS: dict[str, Any] = {
    "base_filters": PAPER_BASE_FILTERS, "dropout": 0.5, "g_lr": 2e-4, "d_lr": 1e-6,
    "beta1": 0.5, "l1_weight": 100.0, "centre_weight": 1.0, "batch_size": 32,
}  # fmt: skip
_BN = {"momentum": 0.2, "eps": 1e-3}  # Keras BatchNormalization(momentum=0.8), epsilon 1e-3


# ---------------------------------------------------------------------------------------------
# Histogram equalisation
# ---------------------------------------------------------------------------------------------


class HistogramEqualizer:
    """CT-GAN's `histEq`: HU -> CDF of the training voxels (then to [-1, 1]) and back.

    A tiny pseudo-count per bin keeps the CDF strictly increasing, so empty HU ranges still invert.
    """

    def __init__(self, bins: np.ndarray | None = None, cdf: np.ndarray | None = None):
        self.bins = None if bins is None else np.asarray(bins, dtype=np.float64)
        self.cdf = None if cdf is None else np.asarray(cdf, dtype=np.float64)

    @property
    def fitted(self) -> bool:
        return self.bins is not None

    def fit(self, cubes: np.ndarray, n_bins: int = 10_000) -> HistogramEqualizer:
        values = np.asarray(cubes, dtype=np.float64).ravel()
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise BTDInputError("cubes", "histogram equalisation needs finite training voxels")
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1.0
        hist, edges = np.histogram(values, bins=n_bins, range=(lo, hi))
        hist = hist / hist.sum() + 1e-6 / n_bins
        self.bins = (edges[:-1] + edges[1:]) / 2.0
        cdf = np.cumsum(hist)
        self.cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
        return self

    def _check(self) -> None:
        if not self.fitted:
            raise BTDConfigError(
                "ctgan.equalizer", "not fitted: call fit() on training cubes first"
            )

    def equalize(self, hu: np.ndarray) -> np.ndarray:
        """HU -> [-1, 1] (values beyond the fitted range saturate)."""
        self._check()
        return (np.interp(hu, self.bins, self.cdf) * 2.0 - 1.0).astype(np.float32)

    def dequalize(self, y: np.ndarray) -> np.ndarray:
        """[-1, 1] -> HU, the inverse of `equalize`."""
        self._check()
        return np.interp((np.asarray(y, np.float64) + 1.0) / 2.0, self.cdf, self.bins).astype(
            np.float32
        )


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def mask_bounds(cube_vox: int) -> tuple[int, int]:
    """The in-painted centre [lo, hi) on each axis: CT-GAN's 6:26 of 32, scaled."""
    lo = int(round(cube_vox * 6 / 32))
    return lo, cube_vox - lo


def _filters(base: int, level: int) -> int:
    return base * min(2**level, 8)


def _same_conv(cin: int, cout: int) -> nn.Sequential:
    """Conv3d(k4, s1) with TF/Keras 'same' padding (1 before, 2 after on each axis)."""
    return nn.Sequential(nn.ConstantPad3d((1, 2, 1, 2, 1, 2), 0.0), nn.Conv3d(cin, cout, 4))


class _Down(nn.Sequential):
    def __init__(self, cin: int, cout: int, bn: bool = True):
        layers: list[nn.Module] = [nn.Conv3d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        if bn:
            layers.append(nn.BatchNorm3d(cout, **_BN))
        super().__init__(*layers)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            _same_conv(cin, cout),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.BatchNorm3d(cout, **_BN),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.block(x), skip], dim=1)


class UNetGenerator3D(nn.Module):
    """CT-GAN's U-Net: log2(cube) stride-2 downs to a 1^3 bottleneck, mirrored ups with skips."""

    def __init__(self, cube_vox: int = 32, base_filters: int = 8, dropout: float = 0.0):
        super().__init__()
        depth = int(math.log2(cube_vox))
        chans = [_filters(base_filters, i) for i in range(depth)]
        self.downs = nn.ModuleList(
            [_Down(1 if i == 0 else chans[i - 1], chans[i], bn=i > 0) for i in range(depth)]
        )
        ups, cin = [], chans[-1]
        for i in range(depth - 2, -1, -1):
            ups.append(_Up(cin, chans[i], dropout))
            cin = 2 * chans[i]
        self.ups = nn.ModuleList(ups)
        self.out = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            _same_conv(cin, 1),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        for up, skip in zip(self.ups, reversed(skips[:-1]), strict=True):
            x = up(x, skip)
        return self.out(x)


class PatchDiscriminator3D(nn.Module):
    """CT-GAN's 3-D PatchGAN on (cube, masked cube); 4 stride-2 levels at 32^3 (fewer below)."""

    def __init__(self, cube_vox: int = 32, base_filters: int = 8):
        super().__init__()
        depth = min(4, int(math.log2(cube_vox)) - 1)
        layers, cin = [], 2
        for i in range(depth):
            layers.append(_Down(cin, _filters(base_filters, i), bn=i > 0))
            cin = _filters(base_filters, i)
        layers.append(_same_conv(cin, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, cube: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([cube, masked], dim=1))


def _init_weights(module: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels, zero biases."""
    if isinstance(module, nn.Conv3d):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def augment_batch(
    cubes: np.ndarray, idx: np.ndarray, cube_vox: int, rng: np.random.Generator
) -> np.ndarray:
    """Random crop (shift), in-plane flips and 90-degree rotations of the chosen cubes."""
    m = cubes.shape[1]
    slack = m - cube_vox
    out = np.empty((len(idx), cube_vox, cube_vox, cube_vox), dtype=np.float32)
    for k, i in enumerate(idx):
        o = rng.integers(0, slack + 1, 3) if slack else np.zeros(3, int)
        c = cubes[i, o[0] : o[0] + cube_vox, o[1] : o[1] + cube_vox, o[2] : o[2] + cube_vox]
        if rng.random() < 0.5:
            c = c[:, ::-1, :]
        if rng.random() < 0.5:
            c = c[:, :, ::-1]
        out[k] = np.rot90(c, int(rng.integers(4)), axes=(1, 2))
    return out


# ---------------------------------------------------------------------------------------------
# The attacker
# ---------------------------------------------------------------------------------------------


class CTGANAttacker:
    """One CT-GAN model (injector or remover) with its own equaliser: train, in-paint, save."""

    def __init__(
        self,
        role: str = "inject",
        cube_vox: int = 32,
        cube_mm: float = 32.0,
        base_filters: int = 8,
        g_lr: float = 2e-4,
        d_lr: float = 2e-5,
        beta1: float = 0.5,
        l1_weight: float = 100.0,
        centre_weight: float = 1.0,
        dropout: float = 0.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        if role not in ROLES:
            raise BTDConfigError("ctgan.role", f"must be one of {ROLES}, got '{role}'")
        check_cube_geometry(cube_mm, cube_vox)
        if not isinstance(base_filters, int) or base_filters < 1:
            raise BTDConfigError(
                "ctgan.base_filters", f"must be a positive integer, got {base_filters}"
            )
        for name, v in (
            ("g_lr", g_lr),
            ("d_lr", d_lr),
            ("l1_weight", l1_weight),
            ("centre_weight", centre_weight),
        ):
            if not v >= 0:
                raise BTDConfigError(f"ctgan.{name}", f"must be >= 0, got {v}")
        self.config: dict[str, Any] = {
            "role": role, "cube_vox": int(cube_vox), "cube_mm": float(cube_mm),
            "base_filters": int(base_filters), "g_lr": float(g_lr), "d_lr": float(d_lr),
            "beta1": float(beta1), "l1_weight": float(l1_weight),
            "centre_weight": float(centre_weight), "dropout": float(dropout), "seed": int(seed),
        }  # fmt: skip
        self.device = torch.device(device)
        self.equalizer = HistogramEqualizer()
        self.steps_trained = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = UNetGenerator3D(cube_vox, base_filters, dropout).to(self.device)
            self.discriminator = PatchDiscriminator3D(cube_vox, base_filters).to(self.device)
            self.generator.apply(_init_weights)
            self.discriminator.apply(_init_weights)
        # channels-last 3-D tensors take oneDNN's fast path for conv3d on CPU (about 2x)
        self.generator.to(memory_format=torch.channels_last_3d)
        self.discriminator.to(memory_format=torch.channels_last_3d)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=g_lr, betas=(beta1, 0.999))
        self.opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=d_lr, betas=(beta1, 0.999)
        )

    # -- properties ------------------------------------------------------------------------
    @property
    def role(self) -> str:
        return self.config["role"]

    @property
    def cube_vox(self) -> int:
        return self.config["cube_vox"]

    @property
    def cube_mm(self) -> float:
        return self.config["cube_mm"]

    @property
    def mask_mm(self) -> float:
        """Edge length of the in-painted centre in mm (20 mm for CT-GAN's 32 mm cube)."""
        lo, hi = mask_bounds(self.cube_vox)
        return (hi - lo) * self.cube_mm / self.cube_vox

    def n_parameters(self) -> tuple[int, int]:
        """(generator, discriminator) parameter counts."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return count(self.generator), count(self.discriminator)

    # -- data ------------------------------------------------------------------------------
    def mask_input(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the centre (normalised units), as CT-GAN's loader does for both models."""
        lo, hi = mask_bounds(self.cube_vox)
        out = x.clone()
        out[..., lo:hi, lo:hi, lo:hi] = 0.0
        return out

    def _l1_weights(self) -> torch.Tensor:
        """Per-voxel L1 weights: `centre_weight` in the in-painted centre, 1 elsewhere, mean 1."""
        n = self.cube_vox
        w = torch.ones(n, n, n, device=self.device)
        lo, hi = mask_bounds(n)
        w[lo:hi, lo:hi, lo:hi] = self.config["centre_weight"]
        return w / w.mean()

    def _check_cubes(self, cubes: np.ndarray, source: str) -> np.ndarray:
        cubes = np.asarray(cubes, dtype=np.float32)
        if cubes.ndim == 3:
            cubes = cubes[None]
        n = self.cube_vox
        if cubes.ndim != 4 or len(set(cubes.shape[1:])) != 1 or cubes.shape[1] < n:
            raise BTDInputError(source, f"need cubes (N, m, m, m) with m >= {n}, got {cubes.shape}")
        if not np.all(np.isfinite(cubes)):
            raise BTDInputError(source, "cubes contain NaN or inf")
        return cubes

    # -- training --------------------------------------------------------------------------
    def _train_step(self, real: torch.Tensor) -> dict[str, float]:
        masked = self.mask_input(real)
        fake = self.generator(masked)
        # discriminator: LSGAN, real -> 1, fake -> 0 (CT-GAN uses 0/1; MSE makes it symmetric)
        self.opt_d.zero_grad(set_to_none=True)
        d_real = self.discriminator(real, masked)
        d_fake = self.discriminator(fake.detach(), masked)
        d_loss = 0.5 * (((d_real - 1) ** 2).mean() + (d_fake**2).mean())
        d_loss.backward()
        self.opt_d.step()
        # generator: fool D + 100 x L1 over the whole cube
        self.opt_g.zero_grad(set_to_none=True)
        g_adv = ((self.discriminator(fake, masked) - 1) ** 2).mean()
        l1 = ((fake - real).abs() * self._l1_weights()).mean()
        g_loss = g_adv + self.config["l1_weight"] * l1
        g_loss.backward()
        self.opt_g.step()
        losses = {"d_loss": d_loss, "g_loss": g_loss, "g_adv": g_adv, "l1": l1}
        return {k: float(v.detach()) for k, v in losses.items()}

    def fit(
        self,
        cubes: np.ndarray,
        steps: int,
        batch_size: int = 8,
        time_limit_s: float | None = None,
        callback: Callable[[dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train on HU cubes (N, m, m, m), m >= cube_vox (the slack gives random shifts).

        The equaliser is fitted on the first call. Returns one dict per step (step, d_loss, g_loss,
        g_adv, l1, seconds). Deterministic for a given seed, data and call sequence (same device).
        `time_limit_s` stops early (the history shows how far it got).
        """
        cubes = self._check_cubes(cubes, "training cubes")
        if batch_size < 2:
            raise BTDConfigError("ctgan.batch_size", f"must be >= 2 (batch norm), got {batch_size}")
        if steps < 0:
            raise BTDConfigError("ctgan.steps", f"must be >= 0, got {steps}")
        if not self.equalizer.fitted:
            self.equalizer.fit(cubes)
        eq = self.equalizer.equalize(cubes)
        seed = self.config["seed"] * 1_000_003 + self.steps_trained
        rng = np.random.default_rng(seed)
        history: list[dict[str, float]] = []
        devices = [self.device] if self.device.type == "cuda" else []
        self.generator.train()
        self.discriminator.train()
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for _ in tqdm(range(steps), desc="CT-GAN training", mininterval=5):
                idx = rng.integers(0, len(eq), batch_size)
                batch = augment_batch(eq, idx, self.cube_vox, rng)
                real = torch.from_numpy(batch[:, None]).to(self.device)
                rec = self._train_step(real)
                self.steps_trained += 1
                rec = {"step": self.steps_trained, **rec, "seconds": time.perf_counter() - t0}
                history.append(rec)
                if callback is not None:
                    callback(rec)
                if time_limit_s is not None and rec["seconds"] >= time_limit_s:
                    break
        return history

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def inpaint(self, cube_hu: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """In-paint the centre of one cube (n, n, n) or a batch (N, n, n, n); HU in, HU out."""
        single = np.ndim(cube_hu) == 3
        cubes = self._check_cubes(cube_hu, "cube")
        if cubes.shape[1] != self.cube_vox:
            raise BTDInputError("cube", f"need {self.cube_vox}^3 cubes, got {cubes.shape[1:]}")
        self.equalizer._check()
        self.generator.eval()
        out = np.empty_like(cubes)
        for i in range(0, len(cubes), batch_size):
            x = torch.from_numpy(self.equalizer.equalize(cubes[i : i + batch_size])[:, None])
            y = self.generator(self.mask_input(x.to(self.device))).clamp(-1, 1)
            out[i : i + batch_size] = self.equalizer.dequalize(y[:, 0].cpu().numpy())
        return out[0] if single else out

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write config, weights and equaliser as one torch file (loadable with weights_only)."""
        self.equalizer._check()
        state = {
            "format": FORMAT,
            "config": dict(self.config),
            "steps_trained": int(self.steps_trained),
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "equalizer": {
                "bins": torch.from_numpy(self.equalizer.bins),
                "cdf": torch.from_numpy(self.equalizer.cdf),
            },
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> CTGANAttacker:
        """Read a model written by `save` (torch.load with weights_only=True)."""
        path = Path(path)
        if not path.is_file():
            raise BTDInputError(path, "missing CT-GAN model file; run the deepfakes stage first")
        try:
            state = torch.load(path, map_location=torch.device(device), weights_only=True)
            if state.get("format") != FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {FORMAT!r}")
            model = cls(**state["config"], device=device)
            model.generator.load_state_dict(state["generator"])
            model.discriminator.load_state_dict(state["discriminator"])
            eq = state["equalizer"]
            model.equalizer = HistogramEqualizer(eq["bins"].numpy(), eq["cdf"].numpy())
            model.steps_trained = int(state["steps_trained"])
        except (
            OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, EOFError,
            pickle.UnpicklingError, zipfile.BadZipFile,
        ) as exc:  # fmt: skip
            raise BTDInputError(
                path, f"not a readable CT-GAN model ({exc.__class__.__name__}: {exc})"
            ) from None
        return model


# ---------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------


def tamper_ct(
    scan: ScanVolume,
    z: float,
    y: float,
    x: float,
    attacker: CTGANAttacker,
    rng: np.random.Generator,
    *,
    attack: str | None = None,
    noise: str = "copy",
    inner_mm: float | None = None,
    outer_mm: float | None = None,
    cube_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inject (at a healthy site) or remove (at a tumour) with CT-GAN: (tampered int16 HU, mask).

    Cut the 1 mm cube, in-paint its centre, fix HU artefacts, resample back and paste with noise
    touch-up and spherical alpha blending (btd.attacks.postprocess). `attack` defaults to the
    attacker's role. Blend radii default to half the in-painted edge (10 mm) and 15 mm (inside the
    32 mm cube). The mask marks every voxel whose value changed; all others are bit-identical.

    `cube_mm` (default: the attacker's, 32 mm) cuts a larger cube at the same voxel count, i.e. the
    site is shown to the model zoomed out, and scales the default blend radii with it. CT-GAN's
    20 mm in-painted centre cannot hide a tumour wider than that; `removal_cube_mm` picks a cube
    that fits a given tumour (a deviation from CT-GAN, which only ever used 32 mm). An injected
    nodule only shows in aerated lung: pick injection sites with
    `btd.attacks.cubes.local_mean_hu` between about -950 and -600 HU (not airway, not tissue).
    """
    if scan.modality != "ct":
        raise BTDInputError(scan.patient, f"CT-GAN tampers CT scans, got {scan.modality}")
    attack = attacker.role if attack is None else attack
    cube = attacker.cube_mm if cube_mm is None else float(cube_mm)
    zoom = cube / attacker.cube_mm
    half = (attacker.cube_vox - 1) / 2.0 * cube / attacker.cube_vox
    outer = min(15.0 * zoom, half) if outer_mm is None else float(outer_mm)
    inner = min(attacker.mask_mm / 2.0 * zoom, 0.7 * outer) if inner_mm is None else float(inner_mm)
    centre = (float(z), float(y), float(x))
    clean = cut_cube(scan.volume, scan.spacing, centre, cube, attacker.cube_vox, scan.patient)
    generated = fix_hu(attacker.inpaint(clean))
    avoid = [(t.y, t.x) for t in scan.tumours]
    return paste_back(
        scan.volume, scan.spacing, centre, generated, attack, rng,
        cube_mm=cube, inner_mm=inner, outer_mm=outer, noise=noise, avoid=avoid,
    )  # fmt: skip


def removal_cube_mm(diameter_mm: float, attacker: CTGANAttacker, margin_mm: float = 4.0) -> float:
    """The cube size (mm) whose in-painted centre covers a tumour of `diameter_mm` plus a margin.

    Never smaller than the attacker's own cube: tumours that fit are handled exactly as CT-GAN does.
    """
    need = (float(diameter_mm) + margin_mm) / attacker.mask_mm * attacker.cube_mm
    return max(attacker.cube_mm, need)
