"""Fast one-step BTD scoring for archives: the same score as `btd.detect.btd.score`, cheaper to compute.

BTD with one backward step needs exactly one U-Net call per patch. The reference path
(`btd.detect.btd.score`) goes through the library's `p_sample`, which is already one call; what this
module adds is the engineering around that call, each part optional and measured in
`benchmarks/fast_scoring.py`:

- `channels_last`: NHWC activations, the layout oneDNN (CPU) and cuDNN (tensor cores) convolve fastest;
- `precision`: "fp32" (reference), "bf16" (CPU or GPU autocast) or "fp16" (GPU autocast). Only the U-Net
  runs in reduced precision; the noise prediction is cast back to fp32 before the residual, so the
  error is the network's rounding only. Reduced precision is only acceptable where it keeps the ranking
  of the scores (`ranking_check`: Spearman >= 0.999 against fp32 on a test set);
- `compile`: `torch.compile` of the U-Net (inductor). The last batch is padded to the batch size so the
  compiled graph sees one shape;
- a data path that keeps the model busy: the next batch is cut and validated on a worker thread while
  the current one runs; on a GPU it is copied from pinned memory without blocking.

One backward step from x0 at t index 0 is (see `btd.detect.btd`): x_start = clamp(sqrt(1/abar_0) x0 -
sqrt(1/abar_0 - 1) eps(x0, 0), -1, 1), x_{-1} = c1_0 x_start + c2_0 x0 (the posterior mean, no noise at
t = 0), residual = x0 - x_{-1}. In fp32 this matches the reference path to float rounding
(tests/test_fast_scoring.py).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from denoising_diffusion_pytorch import GaussianDiffusion

from btd.detect.btd import check_window, window_scores
from btd.diffusion.model import as_patch_tensor
from btd.errors import BTDConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
#: Spearman rank correlation a reduced-precision path must keep against fp32 (issue: >= 0.999)
MIN_SPEARMAN = 0.999


@dataclass(frozen=True)
class FastOptions:
    """How to run the U-Net; the defaults are exact (fp32) and faster than the reference on CPU."""

    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BTDConfigError(
                "precision", f"unknown {self.precision!r}; use one of {PRECISIONS}"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise BTDConfigError(
                "batch_size", f"must be a positive integer, got {self.batch_size!r}"
            )


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise BTDConfigError("precision", "fp16 autocast needs a CUDA device; on CPU use bf16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class FastScorer:
    """One-step BTD scores and residual maps for [0, 1] patches, with the `FastOptions` applied.

    The diffusion model is not modified: the U-Net is copied before its memory format changes or it
    is compiled.
    """

    def __init__(self, diffusion: GaussianDiffusion, options: FastOptions | None = None) -> None:
        self.options = options or FastOptions()
        if diffusion.objective != "pred_noise" or diffusion.self_condition:
            raise BTDConfigError(
                "model",
                f"the fast path supports pred_noise models without self-conditioning, got "
                f"objective={diffusion.objective!r}, self_condition={diffusion.self_condition}",
            )
        self.device = diffusion.betas.device
        self.image_size = int(diffusion.image_size[0])
        unet = copy.deepcopy(diffusion.model).eval()
        if self.options.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        self.unet = torch.compile(unet, dynamic=False) if self.options.compile else unet
        # the t = 0 constants of the library's schedule, as fp32 scalars
        self.recip = float(diffusion.sqrt_recip_alphas_cumprod[0])
        self.recipm1 = float(diffusion.sqrt_recipm1_alphas_cumprod[0])
        self.c1 = float(diffusion.posterior_mean_coef1[0])
        self.c2 = float(diffusion.posterior_mean_coef2[0])

    def _batches(self, x: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, count, model-space batch padded to batch_size) with the host work done ahead."""
        bs, n = self.options.batch_size, x.shape[0]
        pin = self.device.type == "cuda"

        def prepare(lo: int) -> tuple[int, int, torch.Tensor]:
            xb = x[lo : lo + bs]
            count = xb.shape[0]
            if count < bs and self.options.compile:  # one shape for the compiled graph
                xb = torch.cat([xb, xb[-1:].expand(bs - count, *xb.shape[1:])])
            xb = xb * 2.0 - 1.0  # the library's normalize
            if pin:
                xb = xb.pin_memory()
            return lo, count, xb

        with ThreadPoolExecutor(max_workers=1) as pool:
            starts = list(range(0, n, bs))
            future = pool.submit(prepare, starts[0])
            for nxt in [*starts[1:], None]:
                lo, count, xb = future.result()
                if nxt is not None:
                    future = pool.submit(prepare, nxt)
                yield lo, count, xb

    @torch.inference_mode()
    def residuals(self, x01) -> np.ndarray:
        """Residual maps (B, P, P) of one backward step (model space, as the reference path)."""
        x = as_patch_tensor(x01, self.image_size, "patches")
        out = np.empty((x.shape[0], *x.shape[-2:]), dtype=np.float32)
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        for lo, count, xb in self._batches(x):
            x0 = xb.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
            t = torch.zeros(x0.shape[0], dtype=torch.long, device=self.device)
            with _autocast(self.device, self.options.precision):
                eps = self.unet(x0, t)
            eps = eps.float()
            x_start = (self.recip * x0 - self.recipm1 * eps).clamp_(-1.0, 1.0)
            residual = x0 - (self.c1 * x_start + self.c2 * x0)
            out[lo : lo + count] = residual[:count, 0].cpu().numpy()
        return out

    def score(
        self, x01, window: int | None = None, centres: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """BTD scores (B,) and residual maps (B, P, P); `window`/`centres` as `btd.detect.btd.score`."""
        n = len(x01)
        check_window(n, self.image_size, self.image_size, window, centres)
        maps = self.residuals(x01)
        return window_scores(maps, window, centres), maps


def ranking_check(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float | bool]:
    """Spearman rank correlation and max relative error of candidate scores against fp32 ones."""
    from scipy.stats import spearmanr

    reference, candidate = np.asarray(reference, float), np.asarray(candidate, float)
    rho = float(spearmanr(reference, candidate).statistic)
    rel = float(np.max(np.abs(candidate - reference) / np.maximum(np.abs(reference), 1e-12)))
    return {"spearman": rho, "max_rel_err": rel, "passes": rho >= MIN_SPEARMAN}
