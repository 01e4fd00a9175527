"""Step predictor picks on constructed quality/latency profiles, checked against brute force."""

import itertools

import pytest

from triffusion.orchestrator.quality import StepProfile, choose_steps

# A CLIP-score curve that saturates, and a step time of 40 ms plus 60 ms of fixed cost at 10 steps.
PROFILE = StepProfile(steps=(5, 10, 20, 30, 50), quality=(0.20, 0.26, 0.30, 0.31, 0.315),
                      seconds=(0.26, 0.46, 0.86, 1.26, 2.06))


def test_fewest_steps_that_reach_the_quality_in_time():
    pick = choose_steps(PROFILE, slo_s=1.0, min_quality=0.28, max_steps=50)
    assert pick.steps == 15 and pick.meets_quality and pick.seconds == pytest.approx(0.66)


def test_best_quality_in_time_without_a_quality_floor():
    pick = choose_steps(PROFILE, slo_s=0.95, min_quality=None, max_steps=50)
    assert pick.steps == 22 and pick.meets_quality  # 22 steps: 0.94 s; 23: 0.98 s


def test_unreachable_quality_falls_back_to_the_best_in_time_and_says_so():
    pick = choose_steps(PROFILE, slo_s=0.5, min_quality=0.30, max_steps=50)
    assert pick.steps == 11 and not pick.meets_quality  # 11 steps: 0.50 s, the most that fit


def test_nothing_fits_returns_none_and_queue_time_counts():
    assert choose_steps(PROFILE, slo_s=0.05, min_quality=None, max_steps=50) is None  # 1 step: 0.06 + 0.04
    assert choose_steps(PROFILE, slo_s=1.0, min_quality=0.28, max_steps=50, queue_s=0.5).steps == 11


@pytest.mark.parametrize("slo_s, min_quality", itertools.product([0.3, 0.7, 1.3, None], [None, 0.22, 0.305, 0.4]))
def test_matches_brute_force(slo_s, min_quality):
    pick = choose_steps(PROFILE, slo_s=slo_s, min_quality=min_quality, max_steps=50)
    fits = [s for s in range(1, 51) if slo_s is None or PROFILE.seconds_at(s) <= slo_s]
    if not fits:
        assert pick is None
        return
    good = [s for s in fits if min_quality is not None and PROFILE.quality_at(s) >= min_quality]
    expected = min(good) if good else max(fits, key=lambda s: (PROFILE.quality_at(s), -s))
    assert pick.steps == expected


def test_profile_must_be_consistent():
    with pytest.raises(ValueError, match="strictly increasing"):
        StepProfile(steps=(10, 5), quality=(0.1, 0.2), seconds=(1, 2))
