"""Diffusion in-painting attack: stands in for the paper's Stable Diffusion (SD) attack.

SD weights cannot be downloaded here, so the attacker is a *class-conditional pixel DDPM* (class 1 =
malign, the "fine-tuned on malignant slices" role; class 0 = benign), trained from scratch on the
attacker's patches (train/val patients only), and used with RePaint (Lugmayr et al., CVPR 2022):
at every reverse step the known pixels are replaced by the original noised to that step, and the
chain goes back up `jump_length` steps `jumps` times at each jump point so the generated region
harmonises with its context. Injection = in-paint a healthy site conditioned on malign; removal =
in-paint a tumour conditioned on benign (or unconditionally: the "off-the-shelf" role).

It deliberately differs from BTD's detector DDPM (lucidrains `Unet`, linear schedule, 1000 steps):
its own small U-Net (or, on a GPU, lucidrains' class-conditional `Unet`), a cosine schedule, a short
chain. To keep the CPU budget, the model works on a window of `image_size` pixels around the site
(`image_size` < patch size); only masked pixels ever change, so the pasted result is exact elsewhere.

Optional: `StableDiffusionInpainter` runs a *local* SD in-painting checkpoint through `diffusers`
(not a dependency of this project; nothing is downloaded).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from btd.atomic import atomic_path
from btd.attacks.masks import sample_tumour_diameters, site_masks, soft_blend
from btd.data.patches import patch_origin
from btd.errors import BTDConfigError, BTDInputError
from btd.scenarios import SITE_LABEL

FORMAT = "btd-inpaint-ddpm"
FORMAT_VERSION = 1
BACKBONES = ("small", "lucidrains")
SCHEDULES = ("cosine", "linear")
CLASS_OF = {"TB": 0, "benign": 0, "TM": 1, "malign": 1}
NULL_CLASS = 2  # "no condition" (classifier-free guidance / unconditional in-painting)


# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AttackerConfig:
    """Shape of the attacker: working window, U-Net widths, diffusion chain."""

    image_size: int  # working window (px) around the site; the patch size for the paper profile
    channels: tuple[int, ...] = (16, 32, 64)  # U-Net widths per resolution
    timesteps: int = 100  # short chain for CPU (the paper's SD/DDPMs use 1000)
    beta_schedule: str = "cosine"
    backbone: str = "small"  # "small" (fast on CPU) | "lucidrains" (classifier_free_guidance.Unet)
    cond_drop_prob: float = 0.1  # class dropped to NULL during training: enables unconditional use

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.backbone not in BACKBONES:
            raise BTDConfigError("backbone", f"must be one of {BACKBONES}, got {self.backbone!r}")
        if self.beta_schedule not in SCHEDULES:
            raise BTDConfigError("beta_schedule", f"must be one of {SCHEDULES}")
        if not self.channels or any(c < 4 for c in self.channels):
            raise BTDConfigError("channels", f"need >= 1 width, each >= 4, got {self.channels}")
        if self.backbone == "lucidrains" and any(c % self.channels[0] for c in self.channels):
            raise BTDConfigError("channels", "lucidrains widths must be multiples of the first")
        factor = 2 ** (len(self.channels) - 1)
        if self.image_size < 8 or self.image_size % factor:
            raise BTDConfigError(
                "image_size", f"{self.image_size} must be >= 8 and divisible by {factor}"
            )
        if self.timesteps < 2:
            raise BTDConfigError("timesteps", f"must be >= 2, got {self.timesteps}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise BTDConfigError("cond_drop_prob", "must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttackerConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---------------------------------------------------------------------------------------- U-Net


def _groups(c: int) -> int:
    return math.gcd(8, c)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; time+class embedding enters as FiLM (scale, shift)."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm2, self.conv2 = (
            nn.GroupNorm(_groups(cout), cout),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return h + self.skip(x)


class SmallCondUNet(nn.Module):
    """A compact class-conditional U-Net (one res block per level, no attention): ~10x cheaper on CPU
    than lucidrains' conditional Unet at the same widths (measured), which the CPU budget needs."""

    def __init__(self, channels: Sequence[int], num_classes: int = 2):
        super().__init__()
        ch = list(channels)
        emb = 4 * ch[0]
        self.emb_dim = ch[0] if ch[0] % 2 == 0 else ch[0] + 1
        self.time_mlp = nn.Sequential(nn.Linear(self.emb_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_emb = nn.Embedding(num_classes + 1, emb)  # last index = NULL
        self.inc = nn.Conv2d(1, ch[0], 3, padding=1)
        self.down = nn.ModuleList(_ResBlock(ch[max(i - 1, 0)], c, emb) for i, c in enumerate(ch))
        self.mid = _ResBlock(ch[-1], ch[-1], emb)
        self.up = nn.ModuleList(
            _ResBlock(2 * ch[i], ch[max(i - 1, 0)], emb) for i in reversed(range(len(ch)))
        )
        self.out_norm = nn.GroupNorm(_groups(ch[0]), ch[0])
        self.out = nn.Conv2d(ch[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim)) + self.class_emb(classes)
        h, skips = self.inc(x), []
        for i, block in enumerate(self.down):
            h = block(F.avg_pool2d(h, 2) if i else h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.up) - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.out(F.silu(self.out_norm(h)))


class LucidrainsCondUNet(nn.Module):
    """lucidrains' class-conditional `Unet`, with our NULL class mapped to its null embedding."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        from denoising_diffusion_pytorch.classifier_free_guidance import Unet

        mults = tuple(c // channels[0] for c in channels)
        self.net = Unet(dim=channels[0], num_classes=2, dim_mults=mults, channels=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        keep = classes != NULL_CLASS
        return self.net(x, t, classes.clamp(max=1), cond_keep_mask=keep)


# ------------------------------------------------------------------------------------ diffusion


def beta_schedule(kind: str, timesteps: int) -> torch.Tensor:
    """Cosine (Nichol & Dhariwal) or linear (scaled to the chain length, as lucidrains) betas."""
    if kind == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    s = 0.008
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    ac = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    return torch.clip(1 - ac[1:] / ac[:-1], 0, 0.999)


def _at(buf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return buf[t][:, None, None, None]


class InpaintDDPM(nn.Module):
    """Class-conditional epsilon-prediction DDPM on [-1, 1] images of `config.image_size`."""

    def __init__(self, config: AttackerConfig):
        super().__init__()
        self.config = config
        if config.backbone == "small":
            self.net: nn.Module = SmallCondUNet(config.channels)
        else:
            self.net = LucidrainsCondUNet(config.channels)
        betas = beta_schedule(config.beta_schedule, config.timesteps)
        ac = torch.cumprod(1 - betas, dim=0)
        ac_prev = F.pad(ac[:-1], (1, 0), value=1.0)
        bufs = {
            "betas": betas,
            "sqrt_ac": ac.sqrt(),
            "sqrt_1m_ac": (1 - ac).sqrt(),
            "sqrt_recip_ac": (1 / ac).sqrt(),
            "sqrt_recipm1_ac": (1 / ac - 1).sqrt(),
            "post_var": betas * (1 - ac_prev) / (1 - ac),
            "post_c1": betas * ac_prev.sqrt() / (1 - ac),
            "post_c2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
        }
        for name, value in bufs.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def timesteps(self) -> int:
        return self.config.timesteps

    def eps(
        self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor, cond_scale: float = 1.0
    ) -> torch.Tensor:
        """Noise prediction; `cond_scale` > 1 applies classifier-free guidance (2 evaluations)."""
        if cond_scale == 1.0:
            return self.net(x, t, classes)
        null = torch.full_like(classes, NULL_CLASS)
        both = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([classes, null]))
        cond, uncond = both.chunk(2)
        return uncond + cond_scale * (cond - uncond)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _at(self.sqrt_ac, t) * x0 + _at(self.sqrt_1m_ac, t) * noise

    def loss(self, x0: torch.Tensor, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Standard DDPM loss: MSE between true and predicted noise at a uniform random step."""
        t = torch.randint(0, self.timesteps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return F.mse_loss(self.net(self.q_sample(x0, t, noise), t, classes), noise)

    @torch.no_grad()
    def p_sample(
        self,
        x: torch.Tensor,
        t: int,
        classes: torch.Tensor,
        gen: torch.Generator,
        cond_scale: float = 1.0,
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (x0 estimate clipped to [-1, 1])."""
        tt = torch.full((len(x),), t, dtype=torch.long)
        eps = self.eps(x, tt, classes, cond_scale)
        x0 = (_at(self.sqrt_recip_ac, tt) * x - _at(self.sqrt_recipm1_ac, tt) * eps).clamp(-1, 1)
        mean = _at(self.post_c1, tt) * x0 + _at(self.post_c2, tt) * x
        if t == 0:
            return mean
        return mean + _at(self.post_var, tt).sqrt() * torch.randn(x.shape, generator=gen)


def build_attacker(config: AttackerConfig, seed: int = 0) -> InpaintDDPM:
    """A freshly initialised attacker; the seed fixes the initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InpaintDDPM(config)


# ------------------------------------------------------------------------------------- training


def class_indices(labels: Sequence[Any] | np.ndarray | int | str | None, n: int) -> torch.Tensor:
    """Labels (0/1, 'TB'/'TM', 'benign'/'malign', None = unconditional) -> LongTensor of n."""
    if labels is None or isinstance(labels, int | str | np.integer):
        labels = [labels] * n
    labels = list(labels)
    if len(labels) != n:
        raise BTDInputError("labels", f"{len(labels)} labels for {n} images")
    out = []
    for lab in labels:
        if lab is None:
            out.append(NULL_CLASS)
        elif isinstance(lab, str):
            if lab not in CLASS_OF:
                raise BTDInputError(
                    "labels", f"unknown label {lab!r}; use one of {sorted(CLASS_OF)}"
                )
            out.append(CLASS_OF[lab])
        elif int(lab) in (0, 1, NULL_CLASS):
            out.append(int(lab))
        else:
            raise BTDInputError("labels", f"class index must be 0, 1 or {NULL_CLASS}, got {lab}")
    return torch.tensor(out, dtype=torch.long)


def check_patches(patches: np.ndarray, source: str = "patches") -> np.ndarray:
    """(N, 1, P, P) finite float32 in [0, 1], or one readable BTDInputError."""
    arr = np.asarray(patches)
    if arr.ndim != 4 or arr.shape[1] != 1 or arr.shape[2] != arr.shape[3]:
        raise BTDInputError(source, f"expected (N, 1, P, P) patches, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise BTDInputError(source, "patches contain NaN or inf")
    if arr.size and (arr.min() < -1e-4 or arr.max() > 1 + 1e-4):
        raise BTDInputError(source, f"values outside [0, 1] ({arr.min():.3f}..{arr.max():.3f})")
    return arr


def crop_windows(
    patches: np.ndarray, centres: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a `size` window around each (py, px) (shifted to stay inside); returns windows, origins."""
    p = patches.shape[-1]
    if size > p:
        raise BTDConfigError("image_size", f"attacker window {size} larger than the patch {p}")
    origins = np.array([patch_origin(int(cy), int(cx), size, (p, p)) for cy, cx in centres])
    origins = origins.reshape(-1, 2)
    windows = (
        np.stack([patches[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(origins)])
        if len(origins)
        else np.zeros((0, 1, size, size), np.float32)
    )
    return windows, origins


def _augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and 90-degree turns (a site-centred window keeps its site at the centre)."""
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        img = np.rot90(img, k=int(rng.integers(4)), axes=(-2, -1))
        if rng.random() < 0.5:
            img = img[..., ::-1]
        out[i] = img
    return out


@dataclass
class FitHistory:
    """Loss trace and speed of one `fit` call (plain types: stored in the checkpoint)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_per_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _val_loss(model: InpaintDDPM, x0: torch.Tensor, cls: torch.Tensor, seed: int) -> float:
    """Loss on fixed (seeded) noise and steps, so successive values are comparable."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        value = float(model.loss(x0, cls, gen))
    model.train()
    return value


def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), net.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


def fit(
    model: InpaintDDPM,
    patches: np.ndarray,
    labels: Sequence[Any],
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    *,
    seed: int = 0,
    centres: np.ndarray | None = None,
    jitter_px: int = 2,
    augment: bool = True,
    ema_decay: float = 0.995,
    balance_classes: bool = True,
    val: tuple[np.ndarray, Sequence[Any], np.ndarray | None] | None = None,
    log_every: int = 50,
) -> dict[str, Any]:
    """Train on the attacker's patches (TM = malign 1, TB = benign 0); returns the history dict.

    Windows of `config.image_size` are cut around `centres` (py, px) (+- `jitter_px`), or the whole
    patch when the window equals the patch. With `ema_decay` > 0 the model ends with EMA weights
    (`val_loss`, on fixed noise, is of the online weights).
    `balance_classes` draws malign and benign windows equally often: healthy sites outnumber
    tumours several-fold, and the malign class is the one injection needs.
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise BTDConfigError("fit", f"steps {steps}, batch_size {batch_size} must be >= 1, lr > 0")
    patches = check_patches(patches)
    cls_all = class_indices(labels, len(patches))
    if len(patches) == 0:
        raise BTDInputError("patches", "no training patches")
    size, p = model.config.image_size, patches.shape[-1]
    if centres is None:
        centres = np.full((len(patches), 2), p // 2)
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, 2)
    if len(centres) != len(patches):
        raise BTDInputError("centres", f"{len(centres)} site centres for {len(patches)} patches")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))  # warm-up
    ema = copy.deepcopy(model.net).requires_grad_(False) if ema_decay > 0 else None
    val_data = None
    if val is not None:
        vp = check_patches(val[0], "validation patches")
        vc = val[2] if val[2] is not None else np.full((len(vp), 2), vp.shape[-1] // 2)
        vw, _ = crop_windows(vp, np.asarray(vc).reshape(-1, 2), size)
        val_data = (torch.from_numpy(vw * 2 - 1), class_indices(val[1], len(vp)))
    hist = FitHistory()
    running, start = [], time.perf_counter()
    model.train()
    pools = [np.flatnonzero(cls_all.numpy() == c) for c in (0, 1)]
    pools = [q for q in pools if len(q)] if balance_classes else [np.arange(len(patches))]
    for step in tqdm(range(1, steps + 1), desc="diffusion attacker training", mininterval=5):
        which = rng.integers(len(pools), size=batch_size)
        idx = np.array([pools[w][rng.integers(len(pools[w]))] for w in which])
        jit = rng.integers(-jitter_px, jitter_px + 1, size=(batch_size, 2)) if size < p else 0
        win, _ = crop_windows(patches[idx], centres[idx] + jit, size)
        if augment:
            win = _augment(win, rng)
        cls = cls_all[idx].clone()
        drop = torch.rand(batch_size, generator=gen) < model.config.cond_drop_prob
        cls[drop] = NULL_CLASS
        loss = model.loss(torch.from_numpy(np.ascontiguousarray(win) * 2 - 1), cls, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            _ema_update(ema, model.net, min(ema_decay, (1 + step) / (10 + step)))
        running.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            hist.step.append(step)
            hist.loss.append(float(np.mean(running)))
            running = []
            if val_data is not None:
                hist.val_loss.append(_val_loss(model, *val_data, seed=seed + 1))
    hist.seconds = time.perf_counter() - start
    hist.steps_per_s = steps / max(hist.seconds, 1e-9)
    if ema is not None:
        model.net.load_state_dict(ema.state_dict())
    model.eval()
    return hist.to_dict()


# ---------------------------------------------------------------------------------- persistence


def save_attacker(path: str | Path, model: InpaintDDPM, history: dict | None = None) -> Path:
    """Atomic torch.save of config + weights + history (plain types: loads with weights_only)."""
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": model.net.state_dict(),
        "history": history or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_attacker(path: str | Path, device: str | torch.device = "cpu") -> InpaintDDPM:
    """Rebuild a saved attacker in eval mode; BTDInputError if missing, corrupt or another format."""
    path = Path(path)
    if not path.is_file():
        raise BTDInputError(path, "attacker checkpoint not found (run the deepfakes stage)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on garbage
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BTDInputError(path, f"not a readable torch checkpoint: {line}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BTDInputError(path, f"not a diffusion-attacker checkpoint (format != {FORMAT!r})")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise BTDInputError(path, f"format v{state['format_version']} is newer than this code")
    model = InpaintDDPM(AttackerConfig.from_dict(state["config"]))
    try:
        model.net.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise BTDInputError(path, f"weights do not fit the model: {str(exc)[:200]}") from None
    return model.to(device).eval()


# -------------------------------------------------------------------------------------- RePaint


def repaint_schedule(timesteps: int, jump_length: int, jumps: int) -> list[int]:
    """RePaint's time sequence T-1 ... -1 (-1 = clean), going back up `jump_length` steps
    `jumps` times at every `jump_length`-th step (jumps = RePaint's r - 1; 0 = plain in-painting)."""
    if jump_length < 1 or jumps < 0:
        raise BTDConfigError("repaint", f"jump_length {jump_length} >= 1 and jumps {jumps} >= 0")
    pending = {j: jumps for j in range(0, timesteps - jump_length, jump_length)}
    t, seq = timesteps, []
    while t >= 1:
        t -= 1
        seq.append(t)
        if pending.get(t, 0) > 0:
            pending[t] -= 1
            for _ in range(jump_length):
                t += 1
                seq.append(t)
    seq.append(-1)
    return seq


def _check_masks(known_mask: np.ndarray, images: np.ndarray) -> np.ndarray:
    m = np.asarray(known_mask)
    if m.ndim == 3:
        m = m[:, None]
    if m.shape != images.shape:
        raise BTDInputError("known_mask", f"shape {m.shape} does not match images {images.shape}")
    if not np.isin(m, (0, 1)).all():
        raise BTDInputError("known_mask", "must be binary (1 = keep, 0 = in-paint)")
    return m.astype(bool)


@torch.no_grad()
def _repaint_batch(
    model: InpaintDDPM,
    x0: torch.Tensor,
    keep: torch.Tensor,
    cls: torch.Tensor,
    seq: list[int],
    gen: torch.Generator,
    cond_scale: float,
) -> torch.Tensor:
    """RePaint on one batch in [-1, 1]; returns the final x (known region = x0)."""
    t0 = torch.full((len(x0),), seq[0], dtype=torch.long)
    noise = torch.randn(x0.shape, generator=gen)
    x = torch.where(keep, model.q_sample(x0, t0, torch.randn(x0.shape, generator=gen)), noise)
    for t_last, t_cur in zip(seq[:-1], seq[1:], strict=True):
        if t_cur < t_last:  # reverse step, then paste the known region noised to t_cur
            x = model.p_sample(x, t_last, cls, gen, cond_scale)
            if t_cur >= 0:
                tt = torch.full((len(x0),), t_cur, dtype=torch.long)
                known = model.q_sample(x0, tt, torch.randn(x0.shape, generator=gen))
            else:
                known = x0
            x = torch.where(keep, known, x)
        else:  # resampling jump: one forward step q(x_{t_cur} | x_{t_last})
            beta = model.betas[t_cur]
            x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=gen)
    return x


def repaint(
    model: InpaintDDPM,
    image01: np.ndarray,
    known_mask: np.ndarray,
    label: Any,
    jumps: int = 1,
    jump_length: int = 10,
    seed: int = 0,
    *,
    cond_scale: float = 1.0,
    batch_size: int = 64,
) -> np.ndarray:
    """In-paint the pixels where `known_mask` == 0, conditioned on `label` (RePaint, batched).

    `image01` (N, 1, S, S) in [0, 1] with S = `config.image_size`; `known_mask` (N, [1,] S, S) with
    1 = keep. Returns (N, 1, S, S) float32 in [0, 1] whose known pixels equal the input exactly.
    Deterministic for a seed (and a fixed batch composition).
    """
    images = check_patches(image01, "repaint images")
    s = model.config.image_size
    if images.shape[-1] != s:
        raise BTDInputError("repaint images", f"size {images.shape[-1]} != attacker window {s}")
    keep = _check_masks(known_mask, images)
    cls = class_indices(label, len(images))
    seq = repaint_schedule(model.timesteps, jump_length, jumps)
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    out = np.empty_like(images)
    for a in tqdm(range(0, len(images), batch_size), desc="RePaint", mininterval=5):
        b = slice(a, a + batch_size)
        x0 = torch.from_numpy(images[b] * 2 - 1)
        x = _repaint_batch(model, x0, torch.from_numpy(keep[b]), cls[b], seq, gen, cond_scale)
        out[b] = ((x + 1) / 2).clamp(0, 1).numpy()
    out[keep] = images[keep]  # exact: no float round trip through [-1, 1]
    return out


def repaint_evaluations(timesteps: int, jump_length: int, jumps: int) -> int:
    """Network evaluations per image (doubles with classifier-free guidance)."""
    seq = repaint_schedule(timesteps, jump_length, jumps)
    return sum(1 for a, b in zip(seq[:-1], seq[1:], strict=True) if b < a)


# ----------------------------------------------------------------------------- sites -> fakes


def inpaint_sites(
    model: InpaintDDPM,
    patches: np.ndarray,
    centres: np.ndarray,
    tamper_masks: np.ndarray,
    label: Any,
    *,
    blend_border_px: float = 0.0,
    jumps: int = 1,
    jump_length: int = 10,
    seed: int = 0,
    cond_scale: float = 1.0,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """In-paint `tamper_masks` of whole patches through the attacker's window around each site.

    The mask (feathered by `blend_border_px`) is clipped to the window; returns (fakes, region) where
    `region` (N, P, P) uint8 marks every pixel that changed (the tamper mask to record).
    """
    patches = check_patches(patches)
    n, p = len(patches), patches.shape[-1]
    tamper_masks = np.asarray(tamper_masks).astype(bool).reshape(n, p, p)
    alpha, _ = soft_blend(tamper_masks, blend_border_px)
    alpha = alpha.reshape(n, p, p)
    s = model.config.image_size
    windows, origins = crop_windows(patches, np.asarray(centres).reshape(-1, 2), s)
    a_win = (
        np.stack([alpha[i, y : y + s, x : x + s] for i, (y, x) in enumerate(origins)])
        if n
        else np.zeros((0, s, s), np.float32)
    )
    gen = repaint(
        model, windows, (a_win == 0)[:, None], label, jumps, jump_length, seed,
        cond_scale=cond_scale, batch_size=batch_size,
    )  # fmt: skip
    fakes = patches.copy()
    region = np.zeros((n, p, p), dtype=np.uint8)
    for i, (y, x) in enumerate(origins):
        w = a_win[i][None]
        fakes[i, :, y : y + s, x : x + s] = w * gen[i] + (1 - w) * windows[i]
        region[i, y : y + s, x : x + s] = a_win[i] > 0
    fakes[~region.astype(bool)[:, None]] = patches[~region.astype(bool)[:, None]]
    return fakes, region


ATTACKS = {"inject": (SITE_LABEL["inject"], "malign"), "remove": (SITE_LABEL["remove"], "benign")}


def fake_site_table(manifest: pd.DataFrame, attack: str, diameters_mm: np.ndarray) -> pd.DataFrame:
    """Metadata of the fakes made at `manifest`'s sites (for `testsets.build_testset`)."""
    cols = ["patient", "scanner", "split", "slice", "cy", "cx", "py", "px"]
    meta = manifest[[c for c in cols if c in manifest]].reset_index(drop=True).copy()
    meta["diameter_mm"] = np.asarray(diameters_mm, dtype=np.float64)
    meta["attack"] = attack
    return meta


def plan_fakes(
    patches: np.ndarray,
    manifest: pd.DataFrame,
    attack: str,
    modality: str,
    pixel_mm: float,
    train_diameters_mm: Sequence[float],
    *,
    ct_mask_px: int | None = None,
    mri_margin_mm: float = 2.0,
    removal_condition: str = "benign",
    seed: int = 0,
) -> tuple[np.ndarray, str | None, pd.DataFrame]:
    """The paper's masks and condition for an attack at `manifest`'s sites: (masks, condition, meta).

    Inject at TB sites (condition malign), remove at TM sites (benign, or None = unconditional).
    Injection sizes are drawn from `train_diameters_mm` (they set the MRI mask; for CT, whose mask
    is uniform, they are the nominal size recorded in the metadata). Every in-painting attack shares it.
    """
    if attack not in ATTACKS:
        raise BTDConfigError("attack", f"must be 'inject' or 'remove', got {attack!r}")
    source_label, condition = ATTACKS[attack]
    bad = manifest["label"] != source_label
    if bad.any():
        raise BTDInputError(
            "deepfake sites", f"{attack} needs {source_label} sites; got {int(bad.sum())} others"
        )
    if len(manifest) != len(patches):
        raise BTDInputError("deepfake sites", f"{len(manifest)} rows for {len(patches)} patches")
    if attack == "remove" and removal_condition not in ("benign", "unconditional"):
        raise BTDConfigError("removal_condition", "must be 'benign' or 'unconditional'")
    rng = np.random.default_rng(seed)
    if attack == "inject":
        diam = sample_tumour_diameters(train_diameters_mm, len(manifest), rng)
    else:
        diam = manifest["diameter_mm"].to_numpy(dtype=np.float64)
        condition = None if removal_condition == "unconditional" else condition
    centres = manifest[["py", "px"]].to_numpy()
    masks = site_masks(
        modality, patches.shape[-1], centres, diam, pixel_mm, ct_mask_px, mri_margin_mm
    )
    return masks, condition, fake_site_table(manifest, attack, diam)


def make_diffusion_fakes(
    attacker: InpaintDDPM | StableDiffusionInpainter,
    patches: np.ndarray,
    manifest: pd.DataFrame,
    attack: str,
    modality: str,
    pixel_mm: float,
    train_diameters_mm: Sequence[float],
    *,
    ct_mask_px: int | None = None,
    mri_margin_mm: float = 2.0,
    removal_condition: str = "benign",
    seed: int = 0,
    **repaint_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Inject or remove with the paper's masks (`plan_fakes`); returns (fakes, tamper masks, meta)."""
    masks, condition, meta = plan_fakes(
        patches, manifest, attack, modality, pixel_mm, train_diameters_mm, ct_mask_px=ct_mask_px,
        mri_margin_mm=mri_margin_mm, removal_condition=removal_condition, seed=seed,
    )  # fmt: skip
    if isinstance(attacker, StableDiffusionInpainter):
        fakes, region = attacker.inpaint(patches, masks, condition, seed=seed)
    else:
        centres = manifest[["py", "px"]].to_numpy()
        fakes, region = inpaint_sites(
            attacker, patches, centres, masks, condition, seed=seed, **repaint_kwargs
        )
    return fakes, region, meta


# ------------------------------------------------------------------- optional: local SD weights


class StableDiffusionInpainter:
    """Runs a *local* Stable Diffusion in-painting checkpoint folder through `diffusers`.

    Only used when a param points at such a folder; `diffusers` is not a project dependency and
    nothing is downloaded (`local_files_only=True`). Grey patches are upsampled to `resolution`,
    in-painted with a text prompt per condition, converted back, and pasted inside the mask only.
    """

    PROMPTS = {
        "malign": "a CT or MRI scan patch with a malignant tumour",
        "benign": "a CT or MRI scan patch of healthy tissue",
        None: "a medical scan patch",
    }

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        steps: int = 50,
        guidance_scale: float = 7.5,
        resolution: int = 512,
        device: str = "cpu",
        prompts: dict | None = None,
    ):
        folder = Path(checkpoint_dir)
        if not (folder / "model_index.json").is_file():
            raise BTDConfigError(
                "sd_checkpoint",
                f"{folder} is not a local diffusers checkpoint (no model_index.json)",
            )
        try:
            from diffusers import StableDiffusionInpaintPipeline
        except ImportError:
            raise BTDConfigError(
                "sd_checkpoint",
                "set, but the `diffusers` package is not installed; install it or unset the param "
                "to use the trained-from-scratch diffusion attacker",
            ) from None
        self.pipe = StableDiffusionInpaintPipeline.from_pretrained(
            str(folder), local_files_only=True, safety_checker=None
        ).to(device)
        self.steps, self.guidance, self.resolution = steps, guidance_scale, resolution
        self.device, self.prompts = device, {**self.PROMPTS, **(prompts or {})}

    def inpaint(
        self, patches: np.ndarray, masks: np.ndarray, condition: str | None, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """In-paint each patch's mask; returns (fakes, masks)."""
        from PIL import Image

        patches = check_patches(patches)
        p, r = patches.shape[-1], self.resolution
        fakes = patches.copy()
        for i, (img, m) in enumerate(zip(patches[:, 0], masks, strict=True)):
            rgb = (
                Image.fromarray((img * 255).round().astype(np.uint8)).convert("RGB").resize((r, r))
            )
            mimg = Image.fromarray((m > 0).astype(np.uint8) * 255).resize((r, r), Image.NEAREST)
            out = self.pipe(
                prompt=self.prompts[condition], image=rgb, mask_image=mimg,
                num_inference_steps=self.steps, guidance_scale=self.guidance,
                generator=torch.Generator(self.device).manual_seed(seed + i),
            ).images[0]  # fmt: skip
            grey = np.asarray(out.convert("L").resize((p, p), Image.BILINEAR), np.float32) / 255
            fakes[i, 0][m > 0] = grey[m > 0]
        return fakes, (np.asarray(masks) > 0).astype(np.uint8)
