"""BTD: Back-in-Time Diffusion, unsupervised detection of medical deepfakes."""

import warnings

from btd.errors import BTDConfigError, BTDError, BTDInputError

__all__ = ["BTDError", "BTDInputError", "BTDConfigError"]
__version__ = "0.1.0"

# tqdm.auto (used inside denoising-diffusion-pytorch) warns in every notebook that ipywidgets is
# missing; the plain text bar it falls back to is what the pipeline wants in its reports.
warnings.filterwarnings("ignore", message="IProgress not found")
