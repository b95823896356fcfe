"""Reconstruction baselines of the paper's Table 1: AE, U-Net AE, In-Paint AE and OC-VAE.

All four are trained on real patches only and score a patch by how badly they reconstruct it.
They share one seeded training loop (`TorchReconstructor`): Adam, a few epochs, shuffling from a
`torch.Generator`, every other random draw (init, dropout, VAE sampling) inside a forked and
seeded torch RNG, so a fit is reproducible and never disturbs the caller's random state. The
weights of the epoch with the lowest validation loss are kept (validation is real patches only).

Patch sizes that the strided networks cannot divide (e.g. 24 for the `tiny` profile) are padded
by edge replication to the next multiple and the output is cropped back, so every size works.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from btd.baselines.base import Baseline, check_patches, require_fitted
from btd.errors import BTDConfigError, BTDInputError

# --------------------------------------------------------------------------------------------------
# shared helpers


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """Edge-replicate (B,C,P,P) up to a multiple of `multiple`; return it and the offset to crop."""
    size = x.shape[-1]
    target = -(-size // multiple) * multiple
    if target == size:
        return x, 0
    lo = (target - size) // 2
    hi = target - size - lo
    return F.pad(x, (lo, hi, lo, hi), mode="replicate"), lo


def crop(x: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    """Undo `pad_to_multiple`."""
    return x[..., offset : offset + size, offset : offset + size]


def _positive_int(value: Any, field: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise BTDConfigError(field, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive_float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise BTDConfigError(field, f"must be a positive number, got {value!r}")
    return float(value)


def _fraction(value: Any, field: str, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low < value < high:
        raise BTDConfigError(field, f"must be a number in ({low}, {high}), got {value!r}")
    return float(value)


def _device(value: Any, field: str) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise BTDConfigError(field, f"not a torch device: {value!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BTDConfigError(field, "CUDA requested but no GPU is available")
    return device


def conv_block(
    c_in: int, c_out: int, stride: int = 1, kernel: int = 3, dilation: int = 1
) -> nn.Sequential:
    """Conv -> BatchNorm -> LeakyReLU (the workhorse of all encoders here)."""
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Transposed conv doubling the resolution -> BatchNorm -> LeakyReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


# --------------------------------------------------------------------------------------------------
# the shared training loop


class TorchReconstructor(Baseline):
    """A reconstruction baseline: train a network on real patches, score by reconstruction error.

    Subclasses define `_build(size)`, `_loss(x, gen)` (training objective on a [0,1] batch),
    `_reconstruct(x)` (eval-mode output in [0,1]) and may override `_error_map` / `_reduce` (how a
    per-pixel error becomes a score) and the `_prepare` / `_finish` hooks around training.
    """

    def __init__(
        self,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        device: str,
        progress: bool,
        **extra: Any,
    ):
        super().__init__(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            progress=progress,
            **extra,
        )
        self.epochs = _positive_int(epochs, f"{self.name}.epochs")
        self.batch_size = _positive_int(batch_size, f"{self.name}.batch_size")
        self.lr = _positive_float(lr, f"{self.name}.lr")
        self.seed = _positive_int(seed, f"{self.name}.seed", minimum=0)
        self.device = _device(device, f"{self.name}.device")
        self.progress = bool(progress)
        self.size: int | None = None
        self.net: nn.Module | None = None

    # -- hooks --------------------------------------------------------------------------------------
    def _build(self, size: int) -> nn.Module:
        raise NotImplementedError

    def _loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Training objective for a [0,1] batch (default: MSE of the reconstruction)."""
        return F.mse_loss(self._reconstruct(x), x)

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)

    def _error_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B,P,P) per-pixel error; default squared error of the reconstruction."""
        return (self._reconstruct(x) - x).pow(2)[:, 0]

    def _reduce(self, emap: torch.Tensor) -> torch.Tensor:
        """(B,P,P) -> (B,) score; default mean over the patch (= the patch MSE)."""
        return emap.flatten(1).mean(1)

    def _prepare(self, train: np.ndarray) -> None:
        """Statistics of the training data needed before the network is built."""

    def _output_bias(self, mean: float) -> float | None:
        """Initial bias of the last conv (sigmoid nets: logit of the data mean), None = keep.

        Without it a sigmoid head starts at 0.5 while CT patches are mostly 0 (air below the
        -700 HU window); a 1x1 head (U-Net) then needs hundreds of steps just to learn the offset.
        """
        m = min(max(mean, 0.01), 0.99)
        return float(np.log(m / (1 - m)))

    def _init_output_bias(self, mean: float) -> None:
        bias = self._output_bias(mean)
        assert self.net is not None
        convs = [m for m in self.net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
        if bias is not None and convs and convs[-1].bias is not None:
            with torch.no_grad():
                convs[-1].bias.fill_(bias)

    def _finish(self, val: np.ndarray) -> None:
        """Anything fitted on validation data after training (e.g. a threshold)."""

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        """Restore what `_extra_state` returned."""

    # -- public API ---------------------------------------------------------------------------------
    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        train_meta: pd.DataFrame | None = None,
        val_meta: pd.DataFrame | None = None,
    ) -> list[dict]:
        """Train from scratch with Adam; keep the weights of the best validation epoch."""
        train = check_patches(train, f"{self.name}.fit(train)")
        val = check_patches(val, f"{self.name}.fit(val)", size=train.shape[-1])
        if len(train) < 2:
            raise BTDInputError(f"{self.name}.fit(train)", "need at least 2 training patches")
        self.size = int(train.shape[-1])
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(self.seed)
            self._prepare(train)
            self.net = self._place(self._build(self.size))
            self._init_output_bias(float(train.mean()))
            history = self._train(train, val)
            self._finish(val)
        return history

    def score(self, x: np.ndarray) -> np.ndarray:
        """Reconstruction-error score per patch (N,), higher = more anomalous."""
        return self._batched(x, lambda xb: self._reduce(self._error_map(xb)))

    def anomaly_map(self, x: np.ndarray) -> np.ndarray:
        """Per-pixel reconstruction error (N,P,P)."""
        return self._batched(x, self._error_map)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The network's reconstruction (N,1,P,P) in [0,1] (for figures)."""
        return self._batched(x, self._reconstruct)

    def state(self) -> dict:
        require_fitted(self.net is not None, self.name)
        assert self.net is not None
        weights = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return {"size": self.size, "weights": weights, **self._extra_state()}

    def load_state(self, state: dict) -> None:
        self.size = int(state["size"])
        self._load_extra_state(state)
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(self.seed)
            net = self._build(self.size)
        net.load_state_dict(state["weights"])
        self.net = self._place(net).eval()

    # -- internals ----------------------------------------------------------------------------------
    def _place(self, net: nn.Module) -> nn.Module:
        """Move to the device; channels-last makes the CPU (oneDNN) convolutions ~25% faster."""
        return net.to(self.device, memory_format=torch.channels_last)

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def _to_tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.device)

    @torch.no_grad()
    def _batched(self, x: np.ndarray, fn: Any) -> np.ndarray:
        """Apply `fn` to eval-mode batches of checked patches; concatenate on CPU as numpy."""
        require_fitted(self.net is not None, self.name)
        assert self.net is not None
        x = check_patches(x, f"{self.name} input", size=self.size)
        self.net.eval()
        outs = [fn(self._to_tensor(x[i : i + 256])).cpu() for i in range(0, len(x), 256)]
        return torch.cat(outs).numpy().astype(np.float32)

    def _train(self, train: np.ndarray, val: np.ndarray) -> list[dict]:
        assert self.net is not None
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        data = torch.from_numpy(train)
        history: list[dict] = []
        best = (float("inf"), copy.deepcopy(self.net.state_dict()))
        bar = tqdm(range(1, self.epochs + 1), desc=f"fit {self.name}", disable=not self.progress)
        for epoch in bar:
            t0 = time.perf_counter()
            self.net.train()
            order = torch.randperm(len(data), generator=gen)
            total = 0.0
            for i in range(0, len(data), self.batch_size):
                xb = data[order[i : i + self.batch_size]].to(self.device)
                if len(xb) < 2 and i > 0:  # a lone sample breaks BatchNorm statistics
                    continue
                loss = self._loss(xb, gen)
                if not torch.isfinite(loss):
                    raise BTDConfigError(
                        f"{self.name}.lr",
                        f"training diverged (loss {float(loss)}) at epoch {epoch}",
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(xb)
            val_loss = self._val_loss(val)
            row = {
                "epoch": epoch,
                "train_loss": total / len(data),
                "val_loss": val_loss,
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            bar.set_postfix(train=f"{row['train_loss']:.4g}", val=f"{val_loss:.4g}")
            if val_loss < best[0]:
                best = (val_loss, copy.deepcopy(self.net.state_dict()))
        self.net.load_state_dict(best[1])
        self.net.eval()
        return history

    @torch.no_grad()
    def _val_loss(self, val: np.ndarray) -> float:
        """Training objective on validation patches, eval mode, fixed noise (comparable epochs)."""
        assert self.net is not None
        self.net.eval()
        gen = torch.Generator().manual_seed(self.seed + 1)
        total = 0.0
        for i in range(0, len(val), 256):
            xb = self._to_tensor(val[i : i + 256])
            total += float(self._loss(xb, gen)) * len(xb)
        return total / len(val)


# --------------------------------------------------------------------------------------------------
# 1. plain convolutional AE


class _ConvAENet(nn.Module):
    """4 strided conv encoder layers -> `latent` channels at P/16 -> 4 transposed-conv layers."""

    def __init__(self, width: int, latent: int):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            conv_block(1, w, 2, kernel=4),
            conv_block(w, 2 * w, 2, kernel=4),
            conv_block(2 * w, 4 * w, 2, kernel=4),
            nn.Conv2d(4 * w, latent, 4, stride=2, padding=1),
        )
        self.decoder = nn.Sequential(
            up_block(latent, 4 * w),
            up_block(4 * w, 2 * w),
            up_block(2 * w, w),
            nn.ConvTranspose2d(w, 1, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        xp, off = pad_to_multiple(x, 16)
        out = torch.sigmoid(self.decoder(self.encoder(xp)))
        return crop(out, off, size)


class ConvAE(TorchReconstructor):
    """AE (paper ref. [47], Zhou & Paffenroth 2017): a standard convolutional autoencoder.

    4 encoder layers (k4 s2 convs: width, 2w, 4w, then `latent` channels at P/16) and 4 decoder
    layers (k4 s2 transposed convs), BatchNorm + LeakyReLU, sigmoid output; MSE loss; score = MSE
    of the reconstruction over the whole patch; anomaly map = squared error.
    Deviations: the paper gives only "4 encoder and 4 decoder layers"; widths, kernel sizes and the
    spatial (fully-convolutional) latent are our choice. The robust-AE (L1 outlier split) part of
    [47] is not used: like the paper we use it as a plain AE.
    """

    name = "ae"

    def __init__(
        self,
        epochs: int = 20,
        batch_size: int = 16,
        lr: float = 1e-3,
        width: int = 16,
        latent: int = 32,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ):
        super().__init__(epochs, batch_size, lr, seed, device, progress, width=width, latent=latent)
        self.width = _positive_int(width, "ae.width")
        self.latent = _positive_int(latent, "ae.latent")

    def _build(self, size: int) -> nn.Module:
        return _ConvAENet(self.width, self.latent)


# --------------------------------------------------------------------------------------------------
# 2. U-Net AE


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """The U-Net block of mateuszbuda/brain-segmentation-pytorch: 2 x (conv3 -> BN -> ReLU)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _UNetNet(nn.Module):
    """4-level U-Net (features f, 2f, 4f, 8f, bottleneck 16f); skips only at the deepest levels."""

    def __init__(self, features: int, skip_levels: int):
        super().__init__()
        f = features
        chans = [f, 2 * f, 4 * f, 8 * f]
        self.skip = [level >= 4 - skip_levels for level in range(4)]  # level 0 = full resolution
        self.enc = nn.ModuleList()
        c_in = 1
        for c in chans:
            self.enc.append(_double_conv(c_in, c))
            c_in = c
        self.bottleneck = _double_conv(8 * f, 16 * f)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        c_in = 16 * f
        for level in reversed(range(4)):
            c = chans[level]
            self.up.append(nn.ConvTranspose2d(c_in, c, 2, stride=2))
            self.dec.append(_double_conv(2 * c if self.skip[level] else c, c))
            c_in = c
        self.head = nn.Conv2d(f, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        h, off = pad_to_multiple(x, 16)
        feats = []
        for enc in self.enc:
            h = enc(h)
            feats.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottleneck(h)
        for i, level in enumerate(reversed(range(4))):
            h = self.up[i](h)
            if self.skip[level]:
                h = torch.cat([h, feats[level]], dim=1)
            h = self.dec[i](h)
        return crop(torch.sigmoid(self.head(h)), off, size)


class UNetAE(TorchReconstructor):
    """U-Net AE (paper ref. [36]): the 4-level U-Net of brain-segmentation-pytorch, 16 init features.

    Double 3x3 conv + BN + ReLU blocks, max-pool down, 2x2 transposed-conv up, 1x1 conv + sigmoid
    head, trained as an autoencoder (target = input, MSE); score = patch MSE; map = squared error.
    Deviation (documented choice): a U-Net with all skip connections learns the identity (the
    full-resolution skip carries the input past the bottleneck), which would make every score ~0.
    The paper does not say how this was avoided; we keep skips only at the `skip_levels` deepest
    levels (default 2: at P/4 and P/8 resolution, none at P and P/2), so fine detail must pass
    through a compressed path. `skip_levels=4` gives the unmodified U-Net. Measured on simulated
    CT (48 px): both reach a validation MSE of ~3e-4, but the full U-Net ranks a pasted smooth
    blob *below* real patches (AUC 0.35, it copies the blob) while `skip_levels=2` flags it
    (AUC 1.00); `skip_levels=0` (a plain conv AE) reconstructs 8x worse.
    """

    name = "unet_ae"

    def __init__(
        self,
        epochs: int = 3,
        batch_size: int = 16,
        lr: float = 1e-3,
        init_features: int = 16,
        skip_levels: int = 2,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ):
        super().__init__(
            epochs,
            batch_size,
            lr,
            seed,
            device,
            progress,
            init_features=init_features,
            skip_levels=skip_levels,
        )
        self.init_features = _positive_int(init_features, "unet_ae.init_features")
        self.skip_levels = _positive_int(skip_levels, "unet_ae.skip_levels", minimum=0)
        if self.skip_levels > 4:
            raise BTDConfigError("unet_ae.skip_levels", f"must be 0..4, got {skip_levels}")

    def _build(self, size: int) -> nn.Module:
        return _UNetNet(self.init_features, self.skip_levels)


# --------------------------------------------------------------------------------------------------
# 3. In-Paint AE


def centre_hole(size: int, fraction: float) -> tuple[int, int]:
    """(start, stop) of the centred square hole covering `fraction` of the patch side."""
    side = min(size - 2, max(2, int(round(size * fraction))))
    start = (size - side) // 2
    return start, start + side


class _InpaintNet(nn.Module):
    """Haselmann-style completion net, shortened: conv, one stride-2 stage, dilated convs, upsample."""

    def __init__(self, width: int, dilations: tuple[int, ...]):
        super().__init__()
        w = width

        def elu_conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation, padding_mode="replicate"),
                nn.BatchNorm2d(c_out),
                nn.ELU(inplace=True),
            )

        layers = [
            nn.Conv2d(1, w, 5, padding=2, padding_mode="replicate"),
            nn.BatchNorm2d(w),
            nn.ELU(inplace=True),
            elu_conv(w, 2 * w, stride=2),
            elu_conv(2 * w, 2 * w),
        ]
        layers += [elu_conv(2 * w, 2 * w, dilation=d) for d in dilations]
        layers += [elu_conv(2 * w, 2 * w)]
        self.down = nn.Sequential(*layers)
        self.up = nn.Sequential(elu_conv(2 * w, w), nn.Conv2d(w, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        xp, off = pad_to_multiple(x, 2)
        h = self.down(xp)
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        return crop(torch.sigmoid(self.up(h)), off, size)


class InpaintAE(TorchReconstructor):
    """In-Paint AE (Haselmann, Gruber, Tabatabai, ICMLA 2018): complete a masked centre.

    The centred square hole (`hole_fraction` of the patch side) is filled with the training mean
    (Haselmann normalise to zero mean and zero the hole: the same thing) both in training and at
    inference; the network sees only the context. Loss = 0.9 * L1 in the hole + 0.1 * L1 outside
    (their lambda = 0.9). Anomaly map = |x - x_hat| inside the hole, 0 outside; score = its mean
    over the hole (the tamper is centred in BTD patches, so the hole covers it).
    Deviations: 9 conv layers of width `width`/2*`width` instead of 17 layers of 32..128 (CPU
    budget), dilations (2, 4, 8) instead of (2, 4, 8, 16) (patches are 24..64 px, not 128),
    sigmoid instead of tanh output ([0,1] data), one centred hole instead of sliding windows, no
    flip/affine augmentation.
    """

    name = "inpaint_ae"

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 16,
        lr: float = 1e-3,
        width: int = 16,
        hole_fraction: float = 0.375,
        hole_weight: float = 0.9,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ):
        super().__init__(
            epochs,
            batch_size,
            lr,
            seed,
            device,
            progress,
            width=width,
            hole_fraction=hole_fraction,
            hole_weight=hole_weight,
        )
        self.width = _positive_int(width, "inpaint_ae.width")
        self.hole_fraction = _fraction(hole_fraction, "inpaint_ae.hole_fraction", 0.0, 0.9)
        self.hole_weight = _fraction(hole_weight, "inpaint_ae.hole_weight", 0.0, 1.0 + 1e-9)
        self.fill = 0.5

    def _prepare(self, train: np.ndarray) -> None:
        self.fill = float(train.mean())

    def _extra_state(self) -> dict:
        return {"fill": self.fill}

    def _load_extra_state(self, state: dict) -> None:
        self.fill = float(state["fill"])

    def _build(self, size: int) -> nn.Module:
        return _InpaintNet(self.width, (2, 4, 8))

    def hole_mask(self, size: int) -> torch.Tensor:
        """(P,P) float mask, 1 in the hole."""
        lo, hi = centre_hole(size, self.hole_fraction)
        mask = torch.zeros(size, size, device=self.device)
        mask[lo:hi, lo:hi] = 1.0
        return mask

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        mask = self.hole_mask(x.shape[-1])
        return self.net(x * (1 - mask) + self.fill * mask)

    def _loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        mask = self.hole_mask(x.shape[-1])
        err = (self._reconstruct(x) - x).abs()
        inside = (err * mask).sum() / (mask.sum() * len(x))
        outside = (err * (1 - mask)).sum() / ((1 - mask).sum() * len(x))
        return self.hole_weight * inside + (1 - self.hole_weight) * outside

    def _error_map(self, x: torch.Tensor) -> torch.Tensor:
        return (self._reconstruct(x) - x).abs()[:, 0] * self.hole_mask(x.shape[-1])

    def _reduce(self, emap: torch.Tensor) -> torch.Tensor:
        lo, hi = centre_hole(emap.shape[-1], self.hole_fraction)
        return emap[:, lo:hi, lo:hi].flatten(1).mean(1)


# --------------------------------------------------------------------------------------------------
# 4. OC-VAE (OC-FakeDect)


class _VAENet(nn.Module):
    """OC-FakeDect VAE: 4 convs (s1, s2, s1, s2) -> FC -> (mu, logvar); mirrored decoder."""

    def __init__(self, size: int, width: int, hidden: int, latent: int):
        super().__init__()
        w = width
        self.padded = -(-size // 4) * 4
        self.grid = self.padded // 4
        flat = self.grid * self.grid * w
        self.encoder = nn.Sequential(
            conv_block(1, w),
            conv_block(w, 2 * w, 2),
            conv_block(2 * w, 4 * w),
            conv_block(4 * w, w, 2),
        )
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True))
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.dec_fc = nn.Sequential(
            nn.Linear(latent, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(True),
            nn.Linear(hidden, flat),
            nn.BatchNorm1d(flat),
            nn.ReLU(True),
        )

        def tconv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            out_pad = stride - 1
            return nn.Sequential(
                nn.ConvTranspose2d(c_in, c_out, 3, stride, 1, output_padding=out_pad, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            )

        self.decoder = nn.Sequential(
            tconv(w, 4 * w, 1),
            tconv(4 * w, 2 * w, 2),
            tconv(2 * w, w, 1),
            nn.ConvTranspose2d(w, 1, 3, 2, 1, output_padding=1),
        )
        self.width = w

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        xp, off = pad_to_multiple(x, 4)
        h = self.fc(self.encoder(xp).flatten(1))
        return self.mu(h), self.logvar(h).clamp(-20, 20), off

    def decode(self, z: torch.Tensor, off: int, size: int) -> torch.Tensor:
        h = self.dec_fc(z).view(-1, self.width, self.grid, self.grid)
        return crop(self.decoder(h), off, size)


class OCVAE(TorchReconstructor):
    """OC-VAE = OC-FakeDect-1 (Khalid & Woo, CVPR-W 2020): one-class VAE, reconstruction score.

    Layers as in the authors' model (conv 3x3 w s1, 2w s2, 4w s1, w s2 with BN+ReLU, FC hidden ->
    mu/logvar; decoder FC -> FC -> transposed convs mirrored, no output activation), inputs mapped
    to [-1, 1], loss = summed squared error + KL divergence (their `MSE(sum) + KLD`, here divided
    by the batch size), Adam. At scoring the posterior mean mu is decoded (no sampling); score =
    RMSE between x and x_hat over the patch (in [0,1] units); map = squared error.
    Deviations: width 16 -> `width`, FC 1024/latent 1024 -> `hidden`/`latent` (CPU budget, and
    patches of 24..64 px instead of 100 px faces), no random flips, `beta` weight on the KL term
    (1 = original). OC-FakeDect-2 (second encoder on x_hat) is not implemented.
    """

    name = "oc_vae"

    def __init__(
        self,
        epochs: int = 8,
        batch_size: int = 16,
        lr: float = 1e-3,
        width: int = 16,
        hidden: int = 256,
        latent: int = 64,
        beta: float = 1.0,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ):
        super().__init__(
            epochs,
            batch_size,
            lr,
            seed,
            device,
            progress,
            width=width,
            hidden=hidden,
            latent=latent,
            beta=beta,
        )
        self.width = _positive_int(width, "oc_vae.width")
        self.hidden = _positive_int(hidden, "oc_vae.hidden")
        self.latent = _positive_int(latent, "oc_vae.latent")
        self.beta = _positive_float(beta, "oc_vae.beta")

    def _build(self, size: int) -> nn.Module:
        return _VAENet(size, self.width, self.hidden, self.latent)

    def _output_bias(self, mean: float) -> float | None:
        return 2 * mean - 1  # linear output in [-1, 1] units

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        mu, _, off = self.net.encode(x * 2 - 1)
        return ((self.net.decode(mu, off, x.shape[-1]) + 1) / 2).clamp(0, 1)

    def _loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        assert self.net is not None
        x11 = x * 2 - 1
        mu, logvar, off = self.net.encode(x11)
        eps = torch.randn(mu.shape, generator=gen).to(mu.device)
        z = mu + (0.5 * logvar).exp() * eps
        recon = self.net.decode(z, off, x.shape[-1])
        sse = (recon - x11).pow(2).sum()
        kld = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()
        return (sse + self.beta * kld) / len(x)

    def _error_map(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        mu, _, off = self.net.encode(x * 2 - 1)
        recon = (self.net.decode(mu, off, x.shape[-1]) + 1) / 2  # unclamped: errors stay graded
        return (recon - x).pow(2)[:, 0]

    def _reduce(self, emap: torch.Tensor) -> torch.Tensor:
        return emap.flatten(1).mean(1).sqrt()


__all__ = ["ConvAE", "InpaintAE", "OCVAE", "TorchReconstructor", "UNetAE"]
