"""BTD: Back-in-Time Diffusion, unsupervised detection of medical deepfakes."""

from btd.errors import BTDConfigError, BTDError, BTDInputError

__all__ = ["BTDError", "BTDInputError", "BTDConfigError"]
__version__ = "0.1.0"
