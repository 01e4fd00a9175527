"""Cascade routing and escalation counts; controller optimality against brute-force enumeration."""

import itertools
import random

import pytest

from triffusion.orchestrator.cascade import CascadeRouter, Option, choose


def test_router_escalates_below_threshold_and_counts():
    router = CascadeRouter(threshold=0.5)
    routes = [router.route(s) for s in (0.9, 0.2, 0.5, 0.49, 0.7)]
    assert routes == ["light", "heavy", "light", "heavy", "light"]
    assert (router.accepted, router.escalated, router.escalation_rate) == (3, 2, 0.4)


def brute_force(options, demand, gpus, utilization):
    best = None
    for option, light in itertools.product(options, range(gpus + 1)):
        heavy = gpus - light
        if demand * option.light_s > light * utilization + 1e-12:
            continue
        if demand * option.escalation * option.heavy_s > heavy * utilization + 1e-12:
            continue
        if demand * option.light_s > 0 and light == 0:
            continue
        # Among feasible splits the heavy count can be lowered to its minimum: compare like choose().
        needed_heavy = min(h for h in range(heavy + 1)
                           if demand * option.escalation * option.heavy_s <= h * utilization + 1e-12)
        key = (option.quality, -needed_heavy, -option.steps)
        if best is None or key > best[0]:
            best = (key, option)
    return best[1] if best else None


@pytest.mark.parametrize("seed", range(25))
def test_controller_is_optimal_on_small_cases(seed):
    rng = random.Random(seed)
    options = [Option(threshold=t, steps=s, escalation=rng.uniform(0, 1), quality=rng.uniform(0.2, 0.32),
                      light_s=rng.uniform(0.2, 1.0) * s / 25, heavy_s=rng.uniform(0.5, 2.0) * s / 25)
               for t in (0.3, 0.5, 0.7) for s in (15, 25, 50)]
    demand, gpus = rng.uniform(0.5, 12), rng.randint(1, 6)
    decision = choose(options, demand, gpus)
    expected = brute_force(options, demand, gpus, 0.8)
    assert (decision.option if decision else None) == expected
    if decision:
        assert decision.light_gpus + decision.heavy_gpus == gpus
        assert demand * decision.option.light_s <= decision.light_gpus * 0.8 + 1e-9
        assert demand * decision.option.escalation * decision.option.heavy_s <= decision.heavy_gpus * 0.8 + 1e-9


def test_more_demand_lowers_quality_or_escalation():
    options = [Option(0.7, 50, 0.6, 0.31, 0.5, 1.5), Option(0.5, 50, 0.3, 0.29, 0.5, 1.5),
               Option(0.3, 25, 0.1, 0.26, 0.25, 0.75)]
    # Threshold 0.7 escalates 60%: at 0.5 req/s that is 0.45 GPU-s/s of heavy work, one GPU at 80%.
    low, high = choose(options, demand=0.5, gpus=2), choose(options, demand=2.5, gpus=2)
    assert low.option.threshold == 0.7 and high.option.threshold == 0.3
    assert choose(options, demand=100, gpus=2) is None
