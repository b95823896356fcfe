"""Stable Diffusion's autoencoder role, trained from scratch: diffusers `AutoencoderKL` on grey images.

SD in-paints in the latent space of a KL-regularised autoencoder (4 latent channels, f = 8 at 512 px)
that was trained on natural photographs, never on CT or MRI. No weights can be downloaded here, so
ours has SD's architecture (diffusers' `AutoencoderKL`, built from a config) and SD's recipe as far as
it can be had offline (Rombach et al. 2022, taming-transformers' `LPIPSWithDiscriminator`):

- L1 reconstruction + KL (weight 1e-6) + a patch-GAN discriminator (hinge loss, adaptive weight,
  switched on after a warm-up);
- LPIPS needs downloaded VGG weights. It is replaced by an L1 loss on a Laplacian pyramid (the
  detail bands LPIPS mostly rewards), which needs none.

Training data (`natural_crops`): the natural images scikit-image ships with, grey, cropped at random
scales -- the same role as SD's (an autoencoder that never saw the modality), and images the detector
never sees. The reconstruction error on real patches is what the round trip leaves behind in every
decoded pixel (AEROBLADE, CVPR 2024): the trace the LDM test sets are for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from btd.attacks.testsets import highpass_residual
from btd.errors import BTDConfigError, BTDInputError

log = logging.getLogger(__name__)

#: scikit-image's bundled natural photographs (no download: they ship inside the wheel)
NATURAL_IMAGES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)  # fmt: skip


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture: `len(channels) - 1` down-samplings, so the latent factor f = 2**(len - 1)."""

    channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    layers_per_block: int = 1

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or any(c <= 0 or c % 16 for c in self.channels):
            raise BTDConfigError("ldm_ae_channels", "need >= 2 widths, each a multiple of 16")

    @property
    def factor(self) -> int:
        """Pixels per latent pixel along each axis."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderConfig:
        return cls(**{**d, "channels": tuple(int(c) for c in d["channels"])})


def build_autoencoder(config: AutoencoderConfig, seed: int = 0) -> nn.Module:
    """A diffusers `AutoencoderKL` for one grey channel (SD's block types, smaller widths)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(config.channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=config.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=16,
    )


def natural_crops(size: int, n: int, seed: int = 0) -> np.ndarray:
    """(n, 1, size, size) float32 in [0, 1]: grey crops of scikit-image's photos at random scales."""
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb

    rng = np.random.default_rng(seed)
    pool = []
    for name in NATURAL_IMAGES:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        if img.ndim == 3:
            img = rgb2gray(rgba2rgb(img) if img.shape[-1] == 4 else img / 255.0)
        else:
            img = img / 255.0
        pool.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)))
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        img = pool[rng.integers(len(pool))]
        side = int(rng.integers(size, min(img.shape) // 2 + size + 1))
        y, x = (int(rng.integers(0, s - side + 1)) for s in img.shape)
        crop = img[y : y + side, x : x + side][None, None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0, 0]
        crop = torch.rot90(crop, int(rng.integers(4)), (0, 1))
        out[i, 0] = crop.clamp(0, 1).numpy()
    return out


class PatchDiscriminator(nn.Module):
    """pix2pix / taming's N-layer patch-GAN: one real/fake logit per overlapping receptive field."""

    def __init__(self, width: int = 32, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def laplacian_pyramid_l1(x: torch.Tensor, y: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """L1 between the detail bands of two images (our weight-free stand-in for LPIPS)."""
    loss = x.new_zeros(())
    for _ in range(levels):
        xd, yd = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        xu = F.interpolate(xd, size=x.shape[-2:], mode="bilinear", align_corners=False)
        yu = F.interpolate(yd, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss + (x - xu - (y - yu)).abs().mean()
        x, y = xd, yd
    return loss


def _adaptive_weight(rec: torch.Tensor, g: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """taming's balance: scale the GAN gradient at the decoder's last layer to the reconstruction's."""
    gr = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    return (gr / (gg + 1e-4)).clamp(0.0, 1e4).detach()


def fit_autoencoder(
    ae: nn.Module,
    images: np.ndarray,
    steps: int,
    *,
    batch_size: int = 16,
    lr: float = 4.5e-4,
    kl_weight: float = 1e-6,
    disc_weight: float = 0.5,
    disc_start: int | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train with SD's losses (see module docstring); returns one history row per step."""
    if images.ndim != 4 or images.shape[1] != 1 or len(images) < batch_size:
        raise BTDInputError(
            "autoencoder images", f"need (N>={batch_size}, 1, H, W), got {images.shape}"
        )
    disc_start = steps // 2 if disc_start is None else disc_start
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    disc = PatchDiscriminator()
    opt = torch.optim.Adam(ae.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    data = torch.from_numpy(images) * 2 - 1
    last = ae.decoder.conv_out.weight
    history, t0 = [], time.perf_counter()
    ae.train()
    for step in tqdm(range(steps), desc="autoencoder (SD recipe)", leave=False):
        x = data[torch.randint(len(data), (batch_size,), generator=gen)]
        post = ae.encode(x).latent_dist
        rec = ae.decode(post.sample(generator=gen)).sample
        rec_loss = (rec - x).abs().mean() + laplacian_pyramid_l1(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec_loss + kl_weight * kl
        g_loss = torch.zeros(())
        use_gan = step >= disc_start
        if use_gan:
            g_loss = -disc(rec).mean()
            loss = loss + disc_weight * _adaptive_weight(rec_loss, g_loss, last) * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d_loss = torch.zeros(())
        if use_gan:
            d_loss = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        history.append({
            "step": step, "l1_pyramid": float(rec_loss), "kl": float(kl), "g_loss": float(g_loss),
            "d_loss": float(d_loss), "seconds": time.perf_counter() - t0,
        })  # fmt: skip
    ae.eval()
    return history


@torch.no_grad()
def latent_mean(ae: nn.Module, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """The posterior mean of images in [0, 1] (deterministic, as diffusers' `mode()`)."""
    x = torch.as_tensor(images, dtype=torch.float32) * 2 - 1
    return torch.cat([ae.encode(b).latent_dist.mode() for b in x.split(batch_size)])


@torch.no_grad()
def decode(ae: nn.Module, latents: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Latents -> images in [0, 1] (clipped, as SD's image processor does)."""
    out = torch.cat([ae.decode(b).sample for b in latents.split(batch_size)])
    return ((out + 1) / 2).clamp(0, 1).numpy().astype(np.float32)


def reconstruction_error(ae: nn.Module, images: np.ndarray) -> dict[str, float]:
    """Mean |x - D(E(x))| and the ratio of high-pass energy after/before the round trip."""
    rec = decode(ae, latent_mean(ae, images))
    energy = lambda a: float(np.square(highpass_residual(a)).mean())  # noqa: E731
    return {
        "mae": float(np.abs(rec - images).mean()),
        "highpass_energy_ratio": energy(rec) / max(energy(images), 1e-12),
    }
