"""Virtual scanner protocols: load and validate the YAML files in `data/raw/virtual_scanners/`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from btd.errors import BTDConfigError, BTDInputError

CT_KERNELS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
MRI_FILTERS = ("none", "hamming", "tukey")


@dataclass(frozen=True)
class CTScanner:
    """Acquisition and reconstruction settings of one virtual CT scanner (see ct.yaml for units)."""

    name: str
    dose_photons: float
    n_views: int
    geometry: str
    detector_pitch: float
    detector_blur: float
    electronic_noise: float
    kernel: str
    slice_thickness_mm: float
    mu_water_per_mm: float

    def __post_init__(self) -> None:
        if self.kernel not in CT_KERNELS:
            raise BTDConfigError(
                f"{self.name}.kernel", f"'{self.kernel}' is not one of {CT_KERNELS}"
            )
        if self.geometry not in ("parallel", "fan"):
            raise BTDConfigError(
                f"{self.name}.geometry", f"'{self.geometry}' is not parallel or fan"
            )
        if self.dose_photons <= 0 or self.n_views < 8:
            raise BTDConfigError(f"{self.name}", "dose_photons must be > 0 and n_views >= 8")


@dataclass(frozen=True)
class MRIScanner:
    """Acquisition settings of one virtual MRI scanner (see mri.yaml for units)."""

    name: str
    field_T: float
    n_coils: int
    matrix: int
    partial_fourier: float
    filter: str
    noise_sigma: float
    bias_strength: float
    tr_ms: float
    te_ms: float
    flip_deg: float

    def __post_init__(self) -> None:
        if self.filter not in MRI_FILTERS:
            raise BTDConfigError(
                f"{self.name}.filter", f"'{self.filter}' is not one of {MRI_FILTERS}"
            )
        if not 0.5 < self.partial_fourier <= 1.0:
            raise BTDConfigError(f"{self.name}.partial_fourier", "must be in (0.5, 1]")
        if self.n_coils < 1 or self.noise_sigma < 0:
            raise BTDConfigError(f"{self.name}", "n_coils must be >= 1 and noise_sigma >= 0")


_KINDS: dict[str, type] = {"ct": CTScanner, "mri": MRIScanner}


def load_protocols(path: str | Path, modality: str) -> dict[str, CTScanner | MRIScanner]:
    """Read every scanner of one modality from a protocol YAML file."""
    path = Path(path)
    if not path.is_file():
        raise BTDInputError(path, "scanner protocol file not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BTDInputError(path, f"not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("scanners"), dict):
        raise BTDInputError(path, "expected a top-level 'scanners:' mapping")
    cls = _KINDS[modality]
    names = {f.name for f in dataclasses.fields(cls)} - {"name"}
    out: dict[str, Any] = {}
    for name, spec in doc["scanners"].items():
        missing = names - set(spec or {})
        extra = set(spec or {}) - names
        if missing or extra:
            raise BTDInputError(
                path, f"scanner '{name}': missing {sorted(missing)} / unknown {sorted(extra)}"
            )
        out[name] = cls(name=name, **spec)
    return out


def select_scanners(
    protocols: dict[str, CTScanner | MRIScanner], names: list[str], field: str
) -> list[CTScanner | MRIScanner]:
    """The scanners named in params, in order; an unknown name is a clear config error."""
    if not names:
        raise BTDConfigError(field, "no scanners selected")
    unknown = [n for n in names if n not in protocols]
    if unknown:
        raise BTDConfigError(field, f"unknown scanner(s) {unknown}; known: {sorted(protocols)}")
    return [protocols[n] for n in names]
