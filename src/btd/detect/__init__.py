"""BTD detection: one-step scoring, ablation variants, threshold calibration, the `btd` detector commands.

Names are imported lazily so `btd --help` does not pay for importing torch and the diffusion library.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "PAPER_WINDOW": "btd.detect.btd",
    "backward": "btd.detect.btd",
    "forward_backward": "btd.detect.btd",
    "score": "btd.detect.btd",
    "window_scores": "btd.detect.btd",
    "Calibration": "btd.detect.calibrate",
    "calibration_path": "btd.detect.calibrate",
    "fit_threshold": "btd.detect.calibrate",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'btd.detect' has no attribute {name!r}")
