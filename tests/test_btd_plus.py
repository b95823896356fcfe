"""BTD+ against hand computations on toy score sets."""

from __future__ import annotations

import numpy as np
import pytest

from btd.detect.plus import MIN_COUNT, self_reference_ratio, tail_score, two_sided_tail
from btd.errors import BTDInputError


def test_two_sided_tail_by_hand() -> None:
    benign = np.array([1.0, 2.0, 3.0, 4.0])  # n = 4
    # v = 0: 0 benign <= v, 4 >= v -> 2 * (0 + 1) / 5 = 0.4; v = 2.5: 2 and 2 -> 2 * 3 / 5 > 1 -> 1
    np.testing.assert_allclose(two_sided_tail([0.0, 2.5, 5.0, 4.0], benign), [0.4, 1.0, 0.4, 0.8])


def test_two_sided_tail_is_symmetric_on_a_symmetric_distribution() -> None:
    half = np.random.default_rng(1).uniform(0, 1, 100)
    benign = np.concatenate([-half, half])  # exactly symmetric
    v = np.array([0.3, 0.7, 1.5, 2.5])
    np.testing.assert_allclose(two_sided_tail(v, benign), two_sided_tail(-v, benign))
    # smaller than every benign value counts as much as larger than every one: both tails
    assert (
        tail_score([-3.0], benign)[0] == tail_score([3.0], benign)[0] > tail_score([0.0], benign)[0]
    )


def test_scanner_aware_uses_its_scanner_and_falls_back_when_too_few() -> None:
    rng = np.random.default_rng(0)
    quiet, loud = rng.normal(1.0, 0.1, MIN_COUNT), rng.normal(5.0, 0.1, MIN_COUNT)
    few = np.array([9.0] * (MIN_COUNT - 1))
    benign = np.concatenate([quiet, loud, few])
    groups = np.array(["quiet"] * MIN_COUNT + ["loud"] * MIN_COUNT + ["few"] * (MIN_COUNT - 1))
    values, vgroups = np.array([5.0, 5.0, 9.0]), np.array(["quiet", "loud", "few"])
    got = tail_score(values, benign, vgroups, groups)
    # 5.0 is extreme for the quiet scanner, typical for the loud one
    assert got[0] == pytest.approx(-np.log10(2 / (MIN_COUNT + 1)))
    assert got[1] < 0.5
    # 'few' has MIN_COUNT - 1 samples: read against the pooled benign set, by hand
    pooled_p = 2 * min(len(benign) + 1, (MIN_COUNT - 1) + 1) / (len(benign) + 1)
    assert got[2] == pytest.approx(-np.log10(min(pooled_p, 1.0)))


def test_self_reference_ratio_by_hand() -> None:
    r = np.ones((1, 4, 4))
    r[0, 1:3, 1:3] = 2.0  # window energy 4, context energy 1 -> log 4
    assert self_reference_ratio(r, 2, np.array([[2.0, 2.0]]))[0] == pytest.approx(np.log(4.0))
    # a dose change scales both: the ratio does not move
    assert self_reference_ratio(3 * r, 2, np.array([[2.0, 2.0]]))[0] == pytest.approx(np.log(4.0))


def test_bad_inputs_are_clear() -> None:
    with pytest.raises(BTDInputError, match="benign"):
        two_sided_tail([1.0], [])
    with pytest.raises(BTDInputError, match="group"):
        tail_score([1.0, 2.0], [1.0], ["a"], ["a", "b"])


def test_residual_statistics_read_the_site_for_injection_and_the_centre_for_removal() -> None:
    from btd.detect.btd import window_scores
    from btd.detect.plus import residual_statistics

    maps = np.ones((2, 8, 8))
    maps[:, 0:2, 0:2] = 3.0  # a hot corner: the injection site of both samples
    site = np.array([[1.0, 1.0], [1.0, 1.0]])
    e_inj, r_inj = residual_statistics(maps, 2, "inject", site)
    assert np.allclose(e_inj, 9.0) and np.allclose(r_inj, np.log(9.0))
    e_rem, r_rem = residual_statistics(maps, 2, "remove", site)  # the site is not used
    # removal: the whole patch, and the window at the patch centre against a context holding the corner
    assert np.allclose(e_rem, window_scores(maps)) and np.allclose(r_rem, np.log(60 / 92))


def test_injection_reference_without_centres_reads_the_centre_window_not_the_patch() -> None:
    """A benign reference (no sites) must be read over the same region as the test patches: the
    injection window at the patch centre, never the whole patch."""
    from btd.detect.btd import window_scores
    from btd.detect.plus import residual_statistics

    maps = np.ones((1, 8, 8))
    maps[:, 3:5, 3:5] = 2.0  # hot centre
    energy, _ = residual_statistics(maps, 2, "inject")
    assert np.allclose(energy, 4.0) and np.allclose(energy, window_scores(maps, 2))
    assert not np.allclose(energy, window_scores(maps))


def test_own_reference_rule_is_inclusive_and_checks_min_count():
    """A scanner with exactly min_count benign samples gets its own reference; one fewer does not."""
    from btd.detect.plus import has_own_reference

    assert has_own_reference(MIN_COUNT) and not has_own_reference(MIN_COUNT - 1)
    assert has_own_reference(3, min_count=3) and not has_own_reference(2, min_count=3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(BTDInputError, match="min_count"):
            has_own_reference(5, min_count=bad)
