"""The BTD Kaggle loader speaks the one vocabulary of btd.scenarios (labels, attacks, scenario
names); only the Kaggle set's own words ('injection', 'removal') are its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_medical import write_kaggle_tree

from btd import scenarios
from btd.data import btd_kaggle


def test_labels_and_attacks_come_from_btd_scenarios() -> None:
    assert btd_kaggle.LABELS == ("TM", "TB", "FM", "FB")  # order is part of the error message
    assert set(btd_kaggle.LABELS) == {
        *scenarios.BENIGN_LABEL.values(),
        *scenarios.FAKE_LABEL.values(),
    }
    assert btd_kaggle.KAGGLE_ATTACK == {"inject": "injection", "remove": "removal"}
    assert tuple(btd_kaggle.KAGGLE_ATTACK) == scenarios.ATTACKS


@pytest.mark.parametrize(
    ("tamper", "modality", "attack", "name"),
    [
        ("CTGAN", "ct", "injection", "CTGAN-CT-Inject"),
        ("SD", "CT", "removal", "SD-CT-Remove"),
        ("SD", "mri", "injection", "SD-MRI-Inject"),
        ("SD", "mri", "removal", "SD-MRI-Remove"),
    ],
)
def test_scenario_names_are_btd_scenarios_names(
    tamper: str, modality: str, attack: str, name: str
) -> None:
    assert btd_kaggle.scenario_name(tamper, modality, attack) == name
    assert scenarios.attack_of(name) == {"injection": "inject", "removal": "remove"}[attack]
    assert scenarios.modality_of(name) == modality.lower()


@pytest.mark.parametrize(("attack", "word"), [("inject", "injection"), ("remove", "removal")])
def test_loaded_labels_follow_btd_scenarios(tmp_path: Path, attack: str, word: str) -> None:
    write_kaggle_tree(tmp_path / "k")
    for spelling in (attack, word):
        df = btd_kaggle.load_btd_kaggle(tmp_path / "k", "ct", spelling, load_images=False)
        assert set(df["attack"]) == {word}  # the column keeps the Kaggle word, as before
        # the loader does not pair real labels with attacks (the miniature tree's reals are TB for
        # injection, TM for removal); its fakes carry btd.scenarios' label of the attack
        assert scenarios.FAKE_LABEL[attack] in set(df["label"])
        assert set(df["label"]) <= set(btd_kaggle.LABELS)
        assert (df["is_fake"] == (df["label"] == scenarios.FAKE_LABEL[attack])).all()
        assert (df["is_fake"] == df["label"].str.startswith("F")).all()
