"""A seed means the same cohort on every x86 CPU: the virtual scanners' int16/uint8 output does not
depend on the SIMD code paths NumPy (or OpenBLAS) picks at run time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What numpy may dispatch to on this machine, and what an old x86-64 CPU would get instead.
LIMITED = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Prescott",
}

SCRIPT = r"""
import hashlib, sys
from btd.data.acquire import _scan_virtual
from btd.data.simulate.protocols import load_protocols
modality, scanner, protocol_file = sys.argv[1:4]
scanner = load_protocols(protocol_file, modality)[scanner]
cfg = {
    "ct": dict(coverage_mm=12.0, image_size=96, pixel_mm=3.0, tumours_per_patient=1,
               tumour_diameter_mm=(8, 20)),
    "mri": dict(n_slices=3, image_size=96, pixel_mm=3.0, tumours_per_patient=1,
                tumour_diameter_mm=(15, 30), slice_mm=4.0),
}[modality]
scan = _scan_virtual(modality, scanner, "patient", 12345, cfg)
print(scan.volume.dtype, hashlib.sha256(scan.volume.tobytes()).hexdigest())
"""


def _scan_hash(modality: str, scanner: str, protocols: Path, extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in LIMITED}
    env.update(extra_env)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, modality, scanner, str(protocols)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def _protocols(modality: str) -> Path:
    path = ROOT / "data" / "raw" / "virtual_scanners" / f"{modality}.yaml"
    if not path.is_file():
        pytest.skip("data/raw not pulled")  # conftest pulls it; never reached in CI
    return path


@pytest.mark.parametrize(("modality", "scanner"), [("ct", "helion-16"), ("mri", "aster-15")])
def test_scan_is_bit_identical_whatever_the_simd(modality: str, scanner: str) -> None:
    protocols = _protocols(modality)
    unrestricted = _scan_hash(modality, scanner, protocols, {})
    limited = _scan_hash(modality, scanner, protocols, LIMITED)
    assert unrestricted.split()[0] in ("int16", "uint8")
    assert unrestricted == limited, (
        f"{modality}/{scanner}: the scan depends on the CPU's SIMD ({unrestricted} vs {limited})"
    )


def test_portable_math_matches_numpy_to_rounding() -> None:
    import numpy as np

    from btd.data.simulate import portable as pm

    x = np.linspace(-3, 3, 1001)
    for name in ("exp", "sin", "cos", "tanh", "arctan"):
        np.testing.assert_allclose(getattr(pm, name)(x), getattr(np, name)(x), rtol=1e-15)
    np.testing.assert_allclose(pm.log(x[x > 0]), np.log(x[x > 0]), rtol=1e-14)
    np.testing.assert_allclose(pm.power(np.abs(x), 1.5), np.abs(x) ** 1.5, rtol=1e-15)
    np.testing.assert_allclose(pm.sinc(x), np.sinc(x), rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(pm.arctan2(x, x[::-1]), np.arctan2(x, x[::-1]), rtol=1e-15)
    z = 1j * x
    np.testing.assert_allclose(pm.exp(z), np.exp(z), rtol=1e-15)
    assert pm.exp(np.float32(1.0)).dtype == np.float32 and pm.exp(1.0).dtype == np.float64
