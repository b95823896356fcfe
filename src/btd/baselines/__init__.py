"""The paper's eight unsupervised baselines behind one interface (`Baseline`) and one registry."""

from btd.baselines.base import Baseline, check_patches
from btd.baselines.registry import available_baselines, baseline_class, make_baseline
from btd.baselines.storage import load_baseline, save_baseline

__all__ = [
    "Baseline",
    "available_baselines",
    "baseline_class",
    "check_patches",
    "load_baseline",
    "make_baseline",
    "save_baseline",
]
