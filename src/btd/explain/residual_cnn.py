"""A small CNN that tells real from fake *residuals*, and SHAP attributions of its decisions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


class ResidualCNN(nn.Module):
    """Three conv blocks + global pooling + linear: enough capacity for residual texture, nothing more."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(2 * width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class FitResult:
    model: ResidualCNN
    history: list[dict]
    scale: (
        float  # residuals are divided by this (their train std) so the CNN sees unit-scale inputs
    )


def fit_residual_cnn(
    residuals: np.ndarray,
    labels: np.ndarray,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 1e-3,
    width: int = 16,
    seed: int = 0,
) -> FitResult:
    """Train the CNN on (N,P,P) residuals with labels 1 = fake; seeded, CPU-friendly."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    scale = float(np.std(residuals)) or 1.0
    x = torch.as_tensor(residuals / scale, dtype=torch.float32)[:, None]
    y = torch.as_tensor(labels, dtype=torch.long)
    model = ResidualCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in tqdm(range(epochs), desc="residual CNN", leave=False):
        perm = torch.randperm(len(x), generator=gen)
        total, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        history.append({"epoch": epoch, "loss": total / len(x), "train_acc": correct / len(x)})
    model.eval()
    return FitResult(model, history, scale)


def predict_proba(fit: FitResult, residuals: np.ndarray) -> np.ndarray:
    """P(fake) for each residual."""
    with torch.inference_mode():
        x = torch.as_tensor(residuals / fit.scale, dtype=torch.float32)[:, None]
        return torch.softmax(fit.model(x), 1)[:, 1].numpy()


def shap_values(
    fit: FitResult, background: np.ndarray, explain: np.ndarray
) -> tuple[np.ndarray, str]:
    """SHAP attributions for the 'fake' output, (N,P,P); returns also which explainer ran and why.

    DeepExplainer is the paper's tool. If it cannot handle the model in the installed shap/torch versions,
    GradientExplainer (expected gradients, the closest SHAP explainer for deep models) is used and the
    reason is returned, so the notebook can say so.
    """
    import shap

    bg = torch.as_tensor(background / fit.scale, dtype=torch.float32)[:, None]
    ex = torch.as_tensor(explain / fit.scale, dtype=torch.float32)[:, None]
    try:
        explainer = shap.DeepExplainer(fit.model, bg)
        values = explainer.shap_values(ex, check_additivity=True)
        used = "DeepExplainer"
    except Exception as exc:  # noqa: BLE001 - any failure of the explainer is reported, not hidden
        explainer = shap.GradientExplainer(fit.model, bg)
        values = explainer.shap_values(ex)
        used = (
            f"GradientExplainer (DeepExplainer failed: {exc.__class__.__name__}: {str(exc)[:120]})"
        )
    values = np.asarray(values)
    # shap returns (N,1,P,P,outputs) or a list per output; take the 'fake' output
    if values.ndim == 5:
        values = values[..., 1]
    elif values.ndim == 4 and values.shape[0] == 2:
        values = values[1]
    return values.reshape(len(explain), *explain.shape[1:]), used
