"""BTD detection: one-step scoring, ablation variants, threshold calibration."""

from btd.detect.btd import PAPER_WINDOW, backward, forward_backward, score, window_scores
from btd.detect.calibrate import Calibration, calibration_path, fit_threshold

__all__ = [
    "PAPER_WINDOW",
    "Calibration",
    "backward",
    "calibration_path",
    "fit_threshold",
    "forward_backward",
    "score",
    "window_scores",
]
