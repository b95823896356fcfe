"""The one vocabulary of the benchmark: scenario names, what they mean, and the method labels.

A scenario is `<ATTACKER>-<MODALITY>-<Attack>` (e.g. `DIFF-MRI-Remove`); every stage and the README
read the modality and the attack from the name through these functions, never by parsing it again.
"""

from __future__ import annotations

from btd.errors import BTDConfigError

SCENARIOS = (
    "CTGAN-CT-Inject",
    "CTGAN-CT-Remove",
    "DIFF-CT-Inject",
    "DIFF-CT-Remove",
    "DIFF-MRI-Inject",
    "DIFF-MRI-Remove",
)
BTD = "BTD"
CONTROL = "Laplacian (control)"  # the no-learning reference every detector must beat
ATTACKS = ("inject", "remove")
#: attack -> the real class a fake of that attack is tested against (the "benign" class for
#: calibration): an injected tumour is compared with real tumours (TM), a removal with healthy (TB).
BENIGN_LABEL = {"inject": "TM", "remove": "TB"}
#: attack -> label of the fakes (FM = fake malign, FB = fake benign), as in the paper.
FAKE_LABEL = {"inject": "FM", "remove": "FB"}
MODALITIES = ("ct", "mri")


def _parts(scenario: str) -> tuple[str, str, str]:
    parts = scenario.split("-")
    if len(parts) != 3 or parts[1].lower() not in MODALITIES or parts[2].lower() not in ATTACKS:
        raise BTDConfigError("scenario", f"{scenario!r} is not <ATTACKER>-<CT|MRI>-<Inject|Remove>")
    return parts[0], parts[1].lower(), parts[2].lower()


def modality_of(scenario: str) -> str:
    """'DIFF-MRI-Inject' -> 'mri'."""
    return _parts(scenario)[1]


def attack_of(scenario: str) -> str:
    """'CTGAN-CT-Remove' -> 'remove'."""
    return _parts(scenario)[2]


def attacker_of(scenario: str) -> str:
    """'CTGAN-CT-Remove' -> 'CTGAN'."""
    return _parts(scenario)[0]


def scenario_name(attacker: str, modality: str, attack: str) -> str:
    """('DIFF', 'mri', 'inject') -> 'DIFF-MRI-Inject' (the inverse of the three functions above)."""
    name = f"{attacker}-{modality.upper()}-{attack.capitalize()}"
    _parts(name)
    return name
