"""The one vocabulary of the benchmark: scenario names, what they mean, and the method labels.

A scenario is `<ATTACKER>-<MODALITY>-<Attack>[-Paste]` (e.g. `LDM-MRI-Remove`, `LDM-CT-Inject-Paste`);
every stage and the README read the modality and the attack from the name through these functions,
never by parsing it again.

Attackers: `CTGAN` (the paper's CT-GAN), `LDM` (Stable Diffusion's latent in-painting path, trained
from scratch: it takes the place of the paper's SD-* sets), `LDM ... -Paste` (the same fakes with the
original pixels restored outside the mask, diffusers' `apply_overlay`), and `DIFF` (a pixel-space
RePaint DDPM: a smooth in-painter that is not in the paper, reported beside it).
"""

from __future__ import annotations

from btd.errors import BTDConfigError

#: the paper's six scenarios, in our names (Table 1/3, Fig. 6, Fig. 7 and SHAP use these)
PAPER_SCENARIOS = (
    "CTGAN-CT-Inject",
    "CTGAN-CT-Remove",
    "LDM-CT-Inject",
    "LDM-CT-Remove",
    "LDM-MRI-Inject",
    "LDM-MRI-Remove",
)
#: beyond the paper: the SD fakes pasted back, and the smooth pixel-space in-painter
EXTRA_SCENARIOS = (
    "LDM-CT-Inject-Paste",
    "LDM-CT-Remove-Paste",
    "LDM-MRI-Inject-Paste",
    "LDM-MRI-Remove-Paste",
    "DIFF-CT-Inject",
    "DIFF-CT-Remove",
    "DIFF-MRI-Inject",
    "DIFF-MRI-Remove",
)
SCENARIOS = PAPER_SCENARIOS + EXTRA_SCENARIOS
PASTE = "Paste"
BTD = "BTD"
CONTROL = "Laplacian (control)"  # the no-learning reference every detector must beat
#: The same control read two-sided against validation benign patches, as BTD+ reads its residual:
#: the matched floor for a two-sided detector (a smoothing attack lowers the Laplacian too).
CONTROL_TWO_SIDED = f"{CONTROL} two-sided"


def is_control(method: str) -> bool:
    """True for the no-learning controls (one- and two-sided)."""
    return str(method).startswith(CONTROL)


ATTACKS = ("inject", "remove")
#: attack -> the real class a fake of that attack is tested against (the "benign" class for
#: calibration): an injected tumour is compared with real tumours (TM), a removal with healthy (TB).
BENIGN_LABEL = {"inject": "TM", "remove": "TB"}
#: attack -> label of the real sites it tampers (inject at healthy sites, remove at tumours)
SITE_LABEL = {"inject": "TB", "remove": "TM"}
#: attack -> label of the fakes (FM = fake malign, FB = fake benign), as in the paper.
FAKE_LABEL = {"inject": "FM", "remove": "FB"}
MODALITIES = ("ct", "mri")


def _parts(scenario: str) -> tuple[str, str, str]:
    parts = scenario.split("-")
    if (
        len(parts) not in (3, 4)
        or parts[1].lower() not in MODALITIES
        or parts[2].lower() not in ATTACKS
        or (len(parts) == 4 and parts[3] != PASTE)
    ):
        raise BTDConfigError(
            "scenario", f"{scenario!r} is not <ATTACKER>-<CT|MRI>-<Inject|Remove>[-{PASTE}]"
        )
    return parts[0], parts[1].lower(), parts[2].lower()


def is_paste_back(scenario: str) -> bool:
    """'LDM-CT-Inject-Paste' -> True: the original pixels were restored outside the mask."""
    _parts(scenario)
    return scenario.endswith(f"-{PASTE}")


def modality_of(scenario: str) -> str:
    """'DIFF-MRI-Inject' -> 'mri'."""
    return _parts(scenario)[1]


def attack_of(scenario: str) -> str:
    """'CTGAN-CT-Remove' -> 'remove'."""
    return _parts(scenario)[2]


def attacker_of(scenario: str) -> str:
    """'CTGAN-CT-Remove' -> 'CTGAN'."""
    return _parts(scenario)[0]


def scenario_name(attacker: str, modality: str, attack: str, paste_back: bool = False) -> str:
    """('LDM', 'mri', 'inject') -> 'LDM-MRI-Inject' (the inverse of the functions above)."""
    name = f"{attacker}-{modality.upper()}-{attack.capitalize()}" + (
        f"-{PASTE}" if paste_back else ""
    )
    _parts(name)
    return name
