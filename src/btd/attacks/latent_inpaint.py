"""The `LDM` attack: Stable Diffusion's in-painting path, trained from scratch (no weights exist here).

SD-inpainting (diffusers `StableDiffusionInpaintPipeline`) denoises a *latent*; its U-Net sees 9
channels: the noisy latent (4), the mask resized to the latent grid (1) and the latent of the image
with the mask blanked (4). The result is decoded by the autoencoder, so **every pixel of the output
comes from the decoder**, inside the mask and out; `apply_overlay` (our `paste_back`) restores the
original outside the mask. Both are test sets (`LDM-*`, `LDM-*-Paste`): the difference between
them is what image-forensics papers report (AEROBLADE; Mandelli et al. 2024).

Roles, as in the paper's SD attack:
- the *generic* model ("off-the-shelf" SD-inpainting) is trained on the attacker's patches with
  random masks and a class token (benign / malign / none, the prompt's role);
- the *remover* is the generic model fine-tuned the same way on healthy sites (benign token, the
  attack's mask; CT: aerated lung only). The paper removes with off-the-shelf SD, whose prior was
  learnt from billions of images; ours knows only the attacker's patches and, on CT validation
  sites, fooled the tumour classifier 0.57 of the time (0.77 fine-tuned). `generic` stays an option;
- the *injector* is the generic model fine-tuned DreamBooth-style on the attacker's malignant patches
  (mask over the tumour, malign token), with prior preservation: every batch also holds generic
  random-mask samples of both classes (real patches, not model samples: cheaper on a CPU).

Deviations from SD, each for a reason: a class embedding replaces CLIP text; the mask is max-pooled
to the latent grid (nearest resizing, diffusers' choice, can drop a 3-pixel mask entirely); DDIM with
classifier-free guidance as in diffusers; `scaled_linear` betas and 1000 training steps as SD.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from btd.atomic import atomic_path
from btd.attacks import autoencoder_kl as akl
from btd.attacks.inpaint_ddpm import CLASS_OF, NULL_CLASS, class_indices, plan_fakes
from btd.attacks.masks import disc_mask, site_masks
from btd.data.preprocess import CT_HU_MAX, CT_HU_MIN
from btd.errors import BTDConfigError, BTDInputError

log = logging.getLogger(__name__)

FORMAT = "btd-ldm-attacker"
FORMAT_VERSION = 1
#: params.yaml deepfakes.ldm_negative: what classifier-free guidance steers away from
NEGATIVE_MODES = ("none", "opposite")
#: a batch source: (rng, batch size) -> (images (B,1,P,P) in [0,1], masks (B,P,P), class ids (B,),
#: the images' scaled latents (B,4,p,p))
Batch = tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]
Sampler = Callable[[np.random.Generator, int], Batch]


@dataclass(frozen=True)
class LDMConfig:
    """The latent U-Net and its noise schedule (SD's: scaled-linear betas, 1000 steps)."""

    unet_channels: tuple[int, ...] = (64, 128)
    train_timesteps: int = 1000
    class_dropout: float = 0.1  # classifier-free guidance needs the null token during training
    context_weight: float = (
        1.0  # loss weight of latent pixels outside the mask (1 = SD's objective)
    )

    def __post_init__(self) -> None:
        if len(self.unet_channels) < 1 or any(c % 16 for c in self.unet_channels):
            raise BTDConfigError("ldm_unet_channels", "widths must be multiples of 16")
        if not 0 <= self.class_dropout < 1:
            raise BTDConfigError("ldm_class_dropout", "must be in [0, 1)")
        if not 0 < self.context_weight <= 1:
            raise BTDConfigError("ldm_context_weight", "must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LDMConfig:
        return cls(**{**d, "unet_channels": tuple(int(c) for c in d["unet_channels"])})


def _scheduler(config: LDMConfig):
    from diffusers import DDPMScheduler

    # SD's scheduler config: scaled-linear betas, and no clipping of the predicted x0 -- a latent
    # has no [-1, 1] range (diffusers' default clip_sample=True squeezed every in-painted latent
    # towards 0, so the mask was filled with the decoder's "average" patch whatever its context).
    return DDPMScheduler(
        num_train_timesteps=config.train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
    )


class LatentInpainter(nn.Module):
    """Frozen autoencoder + 9-channel latent U-Net (+ the latent scale SD computes as 1/std)."""

    def __init__(
        self,
        ae: nn.Module,
        ae_config: akl.AutoencoderConfig,
        config: LDMConfig,
        patch_size: int,
        scale: float = 1.0,
    ):
        super().__init__()
        from diffusers import UNet2DModel

        if patch_size % ae_config.factor:
            raise BTDConfigError(
                "patch_size",
                f"{patch_size} is not a multiple of the latent factor {ae_config.factor}",
            )
        self.ae, self.ae_config, self.config = ae.eval().requires_grad_(False), ae_config, config
        self.patch_size, self.scale = patch_size, float(scale)
        lc, n = ae_config.latent_channels, len(config.unet_channels)
        self.unet = UNet2DModel(
            sample_size=patch_size // ae_config.factor,
            in_channels=2 * lc + 1,
            out_channels=lc,
            block_out_channels=config.unet_channels,
            down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            layers_per_block=1,
            norm_num_groups=16,
            num_class_embeds=NULL_CLASS + 1,
            attention_head_dim=32,
        )
        self.scheduler = _scheduler(config)

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents."""
        return akl.latent_mean(self.ae, images) * self.scale

    def conditioning(
        self, images: np.ndarray, masks: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent mask, latent of the masked image): SD-inpainting's 5 extra input channels."""
        m = torch.as_tensor(np.asarray(masks, dtype=np.float32)).reshape(
            len(images), 1, *images.shape[-2:]
        )
        masked = (
            torch.as_tensor(images, dtype=torch.float32) * (1 - m) + 0.5 * m
        )  # 0.5 = 0 in [-1, 1]
        return F.max_pool2d(m, self.ae_config.factor), self.encode(masked)

    def eps(self, z: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor],
            classes: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The U-Net's noise prediction from the 9-channel input."""
        return self.unet(torch.cat([z, *cond], dim=1), t, class_labels=classes).sample


def build_inpainter(
    ae: nn.Module, ae_config: akl.AutoencoderConfig, config: LDMConfig, patch_size: int,
    scale_images: np.ndarray, seed: int = 0,
) -> LatentInpainter:  # fmt: skip
    """A fresh U-Net over a trained autoencoder; the latent scale is 1/std of `scale_images`' latents."""
    torch.manual_seed(seed)
    model = LatentInpainter(ae, ae_config, config, patch_size)
    model.scale = float(1.0 / akl.latent_mean(ae, scale_images).std().clamp_min(1e-6))
    return model


# ------------------------------------------------------------------------------------ training


def random_masks(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """SD-inpainting-style training masks: boxes and discs of 6-60 % of the side, anywhere."""
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        side = int(rng.integers(max(3, size // 16), int(0.6 * size) + 1))
        cy, cx = rng.integers(side // 2, size - side // 2, size=2)
        if rng.random() < 0.5:
            out[
                i, cy - side // 2 : cy - side // 2 + side, cx - side // 2 : cx - side // 2 + side
            ] = 1
        else:
            out[i] = disc_mask(size, float(cy), float(cx), float(side))
    return out


def _dihedral(images: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """One of the 8 rotations/flips of the last two axes (tissue has no orientation)."""
    out = np.rot90(images, k, (-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if flip else out)


class _LatentCache:
    """The scaled latents of every patch under each of the 8 rotations/flips, encoded once.

    The autoencoder is frozen, so encoding the clean patches at every step (as SD's training
    script does) would repeat the same work; only the masked image changes from step to step.
    """

    def __init__(self, model: LatentInpainter, patches: np.ndarray):
        self.patches = patches
        self.latents = [
            [model.encode(_dihedral(patches, k, f)) for f in (False, True)] for k in range(4)
        ]

    def draw(
        self, idx: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, torch.Tensor, int, bool]:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        return _dihedral(self.patches[idx], k, flip), self.latents[k][flip][idx], k, flip


def generic_sampler(model: LatentInpainter, patches: np.ndarray, labels: list[str]) -> Sampler:
    """Random-mask batches of the attacker's patches with their class token (the generic model)."""
    classes = class_indices(labels, len(patches)).numpy()
    cache = _LatentCache(model, patches)

    def sample(rng: np.random.Generator, b: int) -> Batch:
        idx = rng.integers(len(patches), size=b)
        images, z0, _, _ = cache.draw(idx, rng)
        return images, random_masks(b, patches.shape[-1], rng), classes[idx], z0

    return sample


def dreambooth_sampler(
    model: LatentInpainter, instance: np.ndarray, instance_masks: np.ndarray, prior: Sampler,
    condition: str = "malign",
) -> Sampler:  # fmt: skip
    """Half the batch: the instance patches, mask over the site, `condition`'s token; half: the prior."""
    cache = _LatentCache(model, instance)
    token = CLASS_OF[condition]

    def sample(rng: np.random.Generator, b: int) -> Batch:
        idx = rng.integers(len(instance), size=b // 2)
        images, z0, k, flip = cache.draw(idx, rng)
        masks = _dihedral(instance_masks[idx], k, flip)
        p_img, p_mask, p_cls, p_z0 = prior(rng, b - b // 2)
        tokens = np.full(len(idx), token)
        return (np.concatenate([images, p_img]), np.concatenate([masks, p_mask]),
                np.concatenate([tokens, p_cls]), torch.cat([z0, p_z0]))  # fmt: skip

    return sample


def fit(
    model: LatentInpainter,
    sampler: Sampler,
    steps: int,
    *,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    desc: str = "latent in-painting U-Net",
) -> list[dict[str, float]]:
    """SD's objective: MSE between the true and predicted noise of the latent, random timestep.

    `config.context_weight` < 1 down-weights latent pixels outside the mask (sampling resets them to
    the original's latent anyway). The default, 1, is SD's objective: on MRI injection (val patients,
    800 + 250 steps) 0.2 did not raise the attack success (0.09 vs 0.19 pasted back).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1
    )
    history, t0 = [], time.perf_counter()
    model.unet.train()
    for step in tqdm(range(steps), desc=desc, leave=False):
        images, masks, classes, z0 = sampler(rng, batch_size)
        with torch.no_grad():
            cond = model.conditioning(images, masks)
        cls = torch.as_tensor(classes, dtype=torch.long)
        drop = torch.rand(len(cls), generator=gen) < model.config.class_dropout
        cls = torch.where(drop, torch.full_like(cls, NULL_CLASS), cls)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, model.config.train_timesteps, (len(z0),), generator=gen)
        err = (model.eps(model.scheduler.add_noise(z0, noise, t), t, cond, cls) - noise) ** 2
        w = model.config.context_weight + (1 - model.config.context_weight) * cond[0]
        loss = (err * w).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append({"step": step, "loss": float(loss), "seconds": time.perf_counter() - t0})
    model.unet.eval()
    return history


def dreambooth_finetune(
    generic: LatentInpainter, instance: np.ndarray, instance_masks: np.ndarray, prior: Sampler,
    steps: int, condition: str = "malign", *, batch_size: int = 32, lr: float = 2.5e-4,
    seed: int = 0,
) -> tuple[LatentInpainter, list[dict[str, float]]]:  # fmt: skip
    """A DreamBooth copy of the generic model (the generic one stays as it is).

    `condition` 'malign': the injector (malignant patches, mask over the tumour); 'benign': the
    remover (healthy patches, the attack's mask at a healthy site), see `healthy_instance`.
    """
    if len(instance) == 0:
        kind = "malignant (TM)" if condition == "malign" else "healthy (TB)"
        raise BTDInputError(f"LDM {condition} fine-tune", f"no {kind} patches to fine-tune on")
    model = copy.deepcopy(generic)
    sampler = dreambooth_sampler(model, instance, instance_masks, prior, condition)
    hist = fit(model, sampler, steps, batch_size=batch_size, lr=lr, seed=seed + 1,
               desc=f"DreamBooth fine-tune ({condition})")  # fmt: skip
    return model, hist


def finetune_injector(
    generic: LatentInpainter, instance: np.ndarray, instance_masks: np.ndarray, prior: Sampler,
    steps: int, *, batch_size: int = 32, lr: float = 2.5e-4, seed: int = 0,
) -> tuple[LatentInpainter, list[dict[str, float]]]:  # fmt: skip
    """The injector: `dreambooth_finetune` on malignant patches with the malign token."""
    return dreambooth_finetune(generic, instance, instance_masks, prior, steps, "malign",
                               batch_size=batch_size, lr=lr, seed=seed)  # fmt: skip


def healthy_instance(
    patches: np.ndarray, masks: np.ndarray, modality: str, max_hu: float
) -> np.ndarray:
    """Which healthy (TB) patches the remover learns from: a bool per patch.

    A tumour is removed by painting the tissue it sits in. Our CT nodules sit in aerated lung, but a
    third of the TB sites (drawn from the pool of tumour locations, in other slices) fall on vessels,
    wall or mediastinum; a remover taught on those paints soft tissue into the lung. CT keeps the
    sites whose masked region averages below `max_hu` (aerated lung); MRI keeps every TB patch.
    """
    if modality == "mri":
        return np.ones(len(patches), bool)
    m = np.asarray(masks).astype(bool).reshape(len(patches), *patches.shape[-2:])
    inside = (patches[:, 0] * m).sum((1, 2)) / np.maximum(m.sum((1, 2)), 1)
    return inside * (CT_HU_MAX - CT_HU_MIN) + CT_HU_MIN < max_hu


# ------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def inpaint(
    model: LatentInpainter,
    images: np.ndarray,
    masks: np.ndarray,
    condition: str | None,
    *,
    guidance: float = 1.0,
    negative: str | None = None,
    sample_steps: int = 50,
    seed: int = 0,
    batch_size: int = 64,
) -> np.ndarray:
    """SD's in-painting call: DDIM over the latent with classifier-free guidance, then decode.

    At every step the latent outside the (latent) mask is reset to the original's latent noised to
    that step -- what diffusers does for 4-channel in-painting U-Nets. A 9-channel U-Net trained
    for a few CPU minutes does not yet reproduce the context on its own; with the reset, every pixel
    outside the mask is the autoencoder's round trip of the original, the trace SD leaves there.
    `negative`: the class whose prediction guidance steers away from -- SD's negative prompt
    ("healthy tissue" when injecting, "nodule" when removing); None: the null token (SD's empty
    prompt). At guidance 1 neither matters (the conditional prediction alone).
    Returns the decoded patches (N, 1, P, P) in [0, 1]: every pixel is the decoder's (no overlay).
    """
    from diffusers import DDIMScheduler

    if negative is not None and negative not in CLASS_OF:
        raise BTDInputError("LDM negative class", f"{negative!r}; use one of {sorted(CLASS_OF)}")

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (1, model.patch_size, model.patch_size):
        raise BTDInputError(
            "LDM images", f"need (N, 1, {model.patch_size}, {model.patch_size}), got {images.shape}"
        )
    masks = np.asarray(masks).astype(np.uint8).reshape(len(images), *images.shape[-2:])
    ddim = DDIMScheduler.from_config(
        model.scheduler.config, clip_sample=False, set_alpha_to_one=False
    )
    ddim.set_timesteps(sample_steps)
    gen = torch.Generator().manual_seed(seed)
    lc, s = model.ae_config.latent_channels, model.patch_size // model.ae_config.factor
    cls_c = NULL_CLASS if condition is None else CLASS_OF[condition]
    cls_u = NULL_CLASS if negative is None else CLASS_OF[negative]
    out = []
    for lo in tqdm(range(0, len(images), batch_size), desc="LDM in-painting", leave=False):
        img, m = images[lo : lo + batch_size], masks[lo : lo + batch_size]
        cond = model.conditioning(img, m)
        z_known, keep = model.encode(img), 1 - cond[0]
        noise = torch.randn((len(img), lc, s, s), generator=gen)
        z = torch.randn((len(img), lc, s, s), generator=gen) * ddim.init_noise_sigma
        guided = guidance != 1.0 and cls_c != NULL_CLASS
        classes = torch.full((len(img),), cls_c, dtype=torch.long)
        if guided:
            classes = torch.cat([classes, torch.full_like(classes, cls_u)])
            cond = tuple(torch.cat([c, c]) for c in cond)
        steps = list(ddim.timesteps)
        for i, t in enumerate(steps):
            zin = torch.cat([z, z]) if guided else z
            e = model.eps(zin, t.expand(len(zin)), cond, classes)
            if guided:
                e_c, e_u = e.chunk(2)
                e = e_u + guidance * (e_c - e_u)
            z = ddim.step(e, t, z).prev_sample
            known = z_known if i + 1 == len(steps) else ddim.add_noise(z_known, noise, steps[i + 1])
            z = keep * known + (1 - keep) * z
        out.append(akl.decode(model.ae, z / model.scale))
    return np.concatenate(out) if out else np.zeros_like(images)


def paste_back(original: np.ndarray, decoded: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """diffusers' `apply_overlay`: the decoded pixels inside the mask, the original outside."""
    m = np.asarray(masks).astype(bool).reshape(len(original), 1, *original.shape[-2:])
    return np.where(m, decoded, original).astype(np.float32)


def make_ldm_fakes(
    model: LatentInpainter | dict[str, LatentInpainter],
    patches: np.ndarray,
    manifest: pd.DataFrame,
    attack: str,
    modality: str,
    pixel_mm: float,
    train_diameters_mm: Any,
    *,
    ct_mask_px: int | None = None,
    mri_margin_mm: float = 2.0,
    guidance: float = 1.0,
    negative: str = "none",
    sample_steps: int = 50,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """The paper's masks at `manifest`'s sites, in-painted: (decoded, pasted back, masks, metadata).

    `negative` (params.yaml deepfakes.ldm_negative): 'none' guides away from the null token,
    'opposite' from the other class (SD's negative prompt: 'healthy' when injecting, 'nodule'
    when removing).
    """
    if negative not in NEGATIVE_MODES:
        raise BTDConfigError(
            "deepfakes.ldm_negative", f"must be one of {NEGATIVE_MODES}, got {negative!r}"
        )
    masks, condition, meta = plan_fakes(
        patches, manifest, attack, modality, pixel_mm, train_diameters_mm,
        ct_mask_px=ct_mask_px, mri_margin_mm=mri_margin_mm, seed=seed,
    )  # fmt: skip
    opposite = {"malign": "benign", "benign": "malign"}.get(condition)
    decoded = inpaint(model, patches, masks, condition, guidance=guidance,
                      negative=opposite if negative == "opposite" else None,
                      sample_steps=sample_steps, seed=seed)  # fmt: skip
    return decoded, paste_back(patches, decoded, masks), masks, meta


def tumour_masks(manifest: pd.DataFrame, size: int, modality: str, pixel_mm: float,
                 ct_mask_px: int | None, mri_margin_mm: float) -> np.ndarray:  # fmt: skip
    """The attack's own masks over the attacker's real tumours (the DreamBooth instance masks)."""
    return site_masks(modality, size, manifest[["py", "px"]].to_numpy(),
                      manifest["diameter_mm"].to_numpy(np.float64), pixel_mm,
                      ct_mask_px, mri_margin_mm)  # fmt: skip


# --------------------------------------------------------------------------------- save / load


def save_inpainter(path: str | Path, model: LatentInpainter, history: dict | None = None) -> Path:
    """Weights + configs as plain tensors and lists (loads with `weights_only=True`)."""
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "ae_config": model.ae_config.to_dict(), "config": model.config.to_dict(),
        "patch_size": model.patch_size, "scale": model.scale,
        "ae": model.ae.state_dict(), "unet": model.unet.state_dict(), "history": history or {},
    }  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_inpainter(path: str | Path) -> LatentInpainter:
    """The inverse of `save_inpainter`; refuses other formats."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BTDInputError(Path(path).name, f"not a {FORMAT} checkpoint")
    ae_config = akl.AutoencoderConfig.from_dict(state["ae_config"])
    ae = akl.build_autoencoder(ae_config)
    ae.load_state_dict(state["ae"])
    model = LatentInpainter(ae, ae_config, LDMConfig.from_dict(state["config"]),
                            int(state["patch_size"]), float(state["scale"]))  # fmt: skip
    model.unet.load_state_dict(state["unet"])
    return model.eval()
