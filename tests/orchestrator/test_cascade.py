"""Cascade routing and escalation counts; the controller's MILP against brute-force enumeration (GPUs of
their own per model, and one device both models time-share); decisions that follow demand up and down."""

import json
import itertools
import random

import pytest

from triffusion.orchestrator.cascade import CascadeRouter, LoadController, Option, choose


def test_router_escalates_below_threshold_and_counts():
    router = CascadeRouter(threshold=0.5)
    routes = [router.route(s) for s in (0.9, 0.2, 0.5, 0.49, 0.7)]
    assert routes == ["light", "heavy", "light", "heavy", "light"]
    assert (router.accepted, router.escalated, router.escalation_rate) == (3, 2, 0.4)


def brute_force(options, demand, gpus, utilization, with_key=False):
    """GPUs of their own (gpus >= 2): every option and every light/heavy split."""
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
    if with_key:
        return best
    return best[1] if best else None


def brute_force_shared(options, demand, utilization):
    """One device both models time-share (gpus == 1): shares a_L + a_H <= 1 with demand * light_s <=
    utilization * a_L and demand * escalation * heavy_s <= utilization * a_H. Every option, each with the
    least heavy share that carries its heavy load and the rest of the device light."""
    best = None
    for option in options:
        light_load, heavy_load = demand * option.light_s, demand * option.escalation * option.heavy_s
        heavy_share = heavy_load / utilization
        if heavy_share > 1 + 1e-12 or light_load > utilization * (1 - heavy_share) + 1e-12:
            continue
        key = (option.quality, -heavy_load, -option.steps)
        if best is None or key > best[0]:
            best = (key, option)
    return best


def random_options(rng, ties=False):
    """Nine operating points; with `ties`, few distinct qualities, escalations and step counts, so the
    tie-breaks (fewer heavy GPUs, then fewer steps) decide often."""
    pick = (lambda values: rng.choice(values)) if ties else None
    return [Option(threshold=t, steps=pick([10, 20]) if ties else s,
                   escalation=pick([0.0, 0.2, 0.5]) if ties else rng.uniform(0, 1),
                   quality=pick([0.2, 0.25, 0.3]) if ties else rng.uniform(0.2, 0.32),
                   light_s=rng.uniform(0.2, 1.0) * s / 25, heavy_s=rng.uniform(0.5, 2.0) * s / 25)
            for t in (0.3, 0.5, 0.7) for s in (15, 25, 50)]


def assert_fits(decision, demand, gpus, utilization=0.8):
    option = decision.option
    light_load, heavy_load = demand * option.light_s, demand * option.escalation * option.heavy_s
    if gpus == 1:
        shares = decision.inputs
        assert decision.light_gpus == 1 and decision.heavy_gpus == (1 if heavy_load > 0 else 0)
        assert shares["light_share"] + shares["heavy_share"] <= 1 + 1e-9
        assert light_load <= shares["light_share"] * utilization + 1e-9
        assert heavy_load <= shares["heavy_share"] * utilization + 1e-9
        assert shares["heavy_share"] == pytest.approx(heavy_load / utilization)  # the least that fits
    else:
        assert decision.light_gpus + decision.heavy_gpus == gpus
        assert light_load <= decision.light_gpus * utilization + 1e-9
        assert heavy_load <= decision.heavy_gpus * utilization + 1e-9
    assert decision.inputs["solver"] == "milp"


@pytest.mark.parametrize("seed", range(25))
def test_controller_is_optimal_on_small_cases(seed):
    rng = random.Random(seed)
    options = [Option(threshold=t, steps=s, escalation=rng.uniform(0, 1), quality=rng.uniform(0.2, 0.32),
                      light_s=rng.uniform(0.2, 1.0) * s / 25, heavy_s=rng.uniform(0.5, 2.0) * s / 25)
               for t in (0.3, 0.5, 0.7) for s in (15, 25, 50)]
    demand, gpus = rng.uniform(0.5, 12), rng.randint(1, 6)
    decision = choose(options, demand, gpus)
    # One GPU: both models time-share it (continuous shares), not one GPU each.
    expected = brute_force_shared(options, demand, 0.8) if gpus == 1 else brute_force(options, demand, gpus, 0.8,
                                                                                      with_key=True)
    assert (decision.option if decision else None) == (expected[1] if expected else None)
    if decision:
        assert_fits(decision, demand, gpus)


@pytest.mark.parametrize("seed", range(60))
def test_milp_matches_brute_force_on_random_option_sets(seed):
    """GPUs of their own (2-8) over random option sets, half of them full of ties: the MILP's pick has the
    brute force's (quality, heavy GPUs, steps), and its split carries the load."""
    rng = random.Random(1000 + seed)
    options = random_options(rng, ties=seed % 2 == 1)
    demand, gpus = rng.uniform(0.2, 16), rng.randint(2, 8)
    decision = choose(options, demand, gpus)
    expected = brute_force(options, demand, gpus, 0.8, with_key=True)
    if expected is None:
        assert decision is None
        return
    assert decision is not None
    assert (decision.option.quality, -decision.heavy_gpus, -decision.option.steps) == expected[0]
    assert_fits(decision, demand, gpus)


@pytest.mark.parametrize("seed", range(60))
def test_one_shared_gpu_matches_brute_force(seed):
    """One device: the MILP's shares against enumeration of options and shares (ties half the time)."""
    rng = random.Random(2000 + seed)
    options = random_options(rng, ties=seed % 2 == 1)
    demand = rng.uniform(0.05, 3.0)
    decision = choose(options, demand, 1)
    expected = brute_force_shared(options, demand, 0.8)
    if expected is None:
        assert decision is None
        return
    assert decision is not None
    option = decision.option
    assert (option.quality, -demand * option.escalation * option.heavy_s, -option.steps) == expected[0]
    assert_fits(decision, demand, 1)


def test_ties_go_to_fewer_heavy_gpus_then_fewer_steps():
    same = dict(quality=0.3, light_s=0.1)
    a = Option(0.7, 20, escalation=0.5, heavy_s=1.0, **same)  # 2.0 heavy GPU-s/s at 4 req/s: 3 GPUs at 80%
    b = Option(0.5, 30, escalation=0.3, heavy_s=1.0, **same)  # 1.2: 2 GPUs
    c = Option(0.3, 20, escalation=0.25, heavy_s=1.0, **same)  # 1.0: 2 GPUs, fewer steps than b
    decision = choose([a, b, c], demand=4.0, gpus=4)
    assert decision.option == c and (decision.light_gpus, decision.heavy_gpus) == (2, 2)
    # A hair more quality wins over any number of heavy GPUs and steps.
    richer = Option(0.8, 50, escalation=0.5, heavy_s=1.0, light_s=0.1, quality=0.3 + 1e-9)
    assert choose([a, b, c, richer], demand=4.0, gpus=4).option == richer
    # One device: the smaller heavy share, then fewer steps.
    assert choose([a, b, c], demand=0.5, gpus=1).option == c
    d = Option(0.4, 10, escalation=0.25, heavy_s=1.0, **same)
    assert choose([a, b, c, d], demand=0.5, gpus=1).option == d


def test_one_device_reports_shares_and_whether_the_heavy_model_shares_it():
    rich = Option(0.7, 20, escalation=0.5, quality=0.9, light_s=0.2, heavy_s=0.4)
    never = Option(0.0, 20, escalation=0.0, quality=0.5, light_s=0.2, heavy_s=0.4)
    decision = choose([rich, never], demand=2.0, gpus=1)  # 0.4 + 0.4 GPU-s/s: exactly the 80% of one device
    assert decision.option == rich and (decision.light_gpus, decision.heavy_gpus) == (1, 1)
    assert decision.inputs["heavy_share"] == pytest.approx(0.5) and decision.inputs["light_share"] == pytest.approx(0.5)
    decision = choose([rich, never], demand=2.5, gpus=1)  # rich needs 1.0: only the light model fits
    assert decision.option == never and (decision.light_gpus, decision.heavy_gpus) == (1, 0)
    assert decision.inputs["heavy_share"] == 0.0 and decision.inputs["light_share"] == 1.0
    assert choose([rich, never], demand=4.5, gpus=1) is None
    assert choose([], demand=1.0, gpus=2) is None and choose([rich], demand=1.0, gpus=0) is None


def test_choose_is_solved_by_scipy_milp(monkeypatch):
    import scipy.optimize

    calls = []
    real = scipy.optimize.milp
    monkeypatch.setattr(scipy.optimize, "milp", lambda *a, **k: calls.append(k) or real(*a, **k))
    options = [Option(0.7, 50, 0.6, 0.31, 0.5, 1.5), Option(0.3, 25, 0.1, 0.26, 0.25, 0.75)]
    # 0.6 req/s: 0.3 + 0.54 GPU-s/s; one GPU each carries it, one shared device (0.8) does not.
    assert choose(options, demand=0.6, gpus=2).option == options[0]
    assert choose(options, demand=0.6, gpus=1).option == options[1]
    assert len(calls) == 2 and all(list(k["integrality"][:2]) == [1, 1] for k in calls)


def feed(controller, start: float, rate: int) -> object:
    """`rate` arrivals spread over [start, start + 1), then the decision at start + 1."""
    for j in range(rate):
        controller.observe_arrival(start + j / rate)
    assert controller.due_at() == pytest.approx(start + 1.0)
    return controller.decide(start + 1.0)


@pytest.mark.parametrize("gpus, rates, picks, heavy", [
    # Each GPU its own model: rich fits 1-8 req/s (heavy GPUs 1-3), mid 12, cheap 20.
    (4, [1, 12, 20, 12, 1], ["rich", "mid", "cheap", "mid", "rich"], [1, 2, 1, 2, 1]),
    # One shared device: rich carries up to 2.35 req/s, mid 3.6, cheap 11.4; 14 overloads it.
    (1, [1, 3, 8, 14, 3, 1], ["rich", "mid", "cheap", "cheap", "mid", "rich"], [1, 1, 1, 1, 1, 1]),
])
def test_the_decision_follows_demand_up_and_down(gpus, rates, picks, heavy):
    named = {"rich": Option(0.7, 20, escalation=0.6, quality=0.9, light_s=0.1, heavy_s=0.4),
             "mid": Option(0.5, 20, escalation=0.3, quality=0.8, light_s=0.1, heavy_s=0.4),
             "cheap": Option(0.3, 10, escalation=0.1, quality=0.6, light_s=0.05, heavy_s=0.2)}
    controller = LoadController(list(named.values()), gpus=gpus, utilization=0.8, interval_s=1.0, alpha=1.0)
    decisions = [feed(controller, float(t), rate) for t, rate in enumerate(rates)]
    assert [d.option for d in decisions] == [named[p] for p in picks]
    assert [d.heavy_gpus for d in decisions] == heavy
    assert [d.inputs["demand"] for d in decisions] == rates
    overloaded = [d.inputs.get("overloaded", False) for d in decisions]
    assert overloaded == [rate == 14 for rate in rates]
    if gpus == 1:  # the shares go with every decision, the overloaded one included
        for d in decisions:
            assert d.inputs["light_share"] + d.inputs["heavy_share"] == pytest.approx(1.0)
        assert decisions[0].inputs["heavy_share"] == pytest.approx(1 * 0.6 * 0.4 / 0.8)


def test_more_demand_lowers_quality_or_escalation():
    options = [Option(0.7, 50, 0.6, 0.31, 0.5, 1.5), Option(0.5, 50, 0.3, 0.29, 0.5, 1.5),
               Option(0.3, 25, 0.1, 0.26, 0.25, 0.75)]
    # Threshold 0.7 escalates 60%: at 0.5 req/s that is 0.45 GPU-s/s of heavy work, one GPU at 80%.
    low, high = choose(options, demand=0.5, gpus=2), choose(options, demand=2.5, gpus=2)
    assert low.option.threshold == 0.7 and high.option.threshold == 0.3
    assert choose(options, demand=100, gpus=2) is None


def test_a_controller_with_options_imports_its_solver_when_made_not_at_its_first_decision():
    """The first decision runs under the scheduler's lock; the solver's import (0.3-0.5 s) must not."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from triffusion.orchestrator.cascade import LoadController, Option\n"
            "assert 'scipy.optimize' not in sys.modules\n"
            "LoadController([])\n"
            "assert 'scipy.optimize' not in sys.modules\n"
            "LoadController([Option(threshold=0.5, steps=20, escalation=0.3, quality=0.6, light_s=0.05, heavy_s=0.08)])\n"
            "assert 'scipy.optimize' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_restored_controller_goes_on_as_the_one_it_was_read_from():
    """The engine's profile reports `state`; a simulator restores it on its own clock (the SLO proof starts
    each point's simulated controller where the server's stands). Both must then decide alike."""
    named = {"rich": Option(0.7, 20, escalation=0.6, quality=0.9, light_s=0.1, heavy_s=0.4),
             "cheap": Option(0.3, 10, escalation=0.1, quality=0.6, light_s=0.05, heavy_s=0.2)}
    server = LoadController(list(named.values()), gpus=1, interval_s=1.0, alpha=0.5)
    feed(server, 0.0, 2)  # a light window: rich in force, demand 2
    for j in range(7):
        server.observe_arrival(1.0 + j * 0.05)  # a window half counted when the state is read
    state = server.state(now=1.5)
    assert state["demand"] == 2.0 and state["arrivals"] == 7 and state["window_age_s"] == 0.5
    assert state["option"]["threshold"] == 0.7 and state["light_gpus"] + state["heavy_gpus"] >= 1
    copy = LoadController(list(named.values()), gpus=1, interval_s=1.0, alpha=0.5)
    copy.restore(json.loads(json.dumps(state)), now=100.0)  # through JSON, as the control answer carries it
    assert copy.last.option == named["rich"] and copy.due_at() == pytest.approx(100.5)
    for controller, t0 in ((server, 1.5), (copy, 100.0)):
        for j in range(8):
            controller.observe_arrival(t0 + j * 0.05)
    mine, theirs = server.decide(2.0), copy.decide(100.5)
    assert mine.option == theirs.option == named["cheap"]  # 15 arrivals in the window: demand (2 + 15) / 2
    assert server.demand == copy.demand == 8.5
    fresh = LoadController(list(named.values()), gpus=1, interval_s=1.0)
    fresh.restore(fresh.state(now=0.0), now=5.0)  # a controller that never saw a request stays so
    assert fresh.due_at() is None and fresh.last is None and fresh.demand is None


def test_a_surge_past_the_option_in_force_is_decided_at_once_and_a_fall_waits_for_the_windows():
    """Up at once, down slowly: once the last `surge_arrivals` arrivals came faster than the demand estimate
    and than the option in force carries, the controller decides on their rate before its window ends; a
    fall in load waits for the window and the EWMA. The state the engine reports carries the arrivals the
    surge check measures, so a restored controller surges on the same arrival."""
    named = {"rich": Option(0.7, 20, escalation=0.6, quality=0.9, light_s=0.1, heavy_s=0.4),
             "cheap": Option(0.3, 10, escalation=0.1, quality=0.6, light_s=0.05, heavy_s=0.2)}
    # One device at 80%: rich costs 0.1 + 0.6 * 0.4 = 0.34 s a query, so it carries 2.35 req/s; cheap 11.4.
    controller = LoadController(list(named.values()), gpus=1, interval_s=1.0, alpha=0.5, surge_arrivals=5)
    assert feed(controller, 0.0, 2).option == named["rich"]  # arrivals at 0.0 and 0.5; demand 2
    for t in (1.0, 1.1):
        controller.observe_arrival(t)
        assert controller.decide(t) is None  # four arrivals seen: too few to measure a surge on
    copy = LoadController(list(named.values()), gpus=1, interval_s=1.0, alpha=0.5, surge_arrivals=5)
    copy.restore(json.loads(json.dumps(controller.state(now=1.1))), now=50.0)
    decisions = []
    for ctl, t in ((controller, 1.2), (copy, 50.1)):
        ctl.observe_arrival(t)
        decisions.append(ctl.decide(t))
    # The last five arrivals (0.0, 0.5, 1.0, 1.1, 1.2): 4 intervals in 1.2 s, 3.33 req/s. Over demand 2 and
    # over what rich carries: decided at once, on that rate, not blended.
    for ctl, decision in zip((controller, copy), decisions):
        assert decision.option == named["cheap"] and decision.inputs["surge"] is True
        assert ctl.demand == pytest.approx(4 / 1.2)
    assert controller.due_at() == pytest.approx(2.2)  # a new window from the surge decision
    # The load falls: two arrivals in the next window. No surge (none measured since), and the window blends:
    # (3.33 + 2) / 2 = 2.67, still more than rich carries; the window after, empty: 1.33, rich again.
    for t in (1.5, 2.0):
        controller.observe_arrival(t)
        assert controller.decide(t) is None
    assert controller.decide(2.2).option == named["cheap"] and controller.demand == pytest.approx(8 / 3)
    assert controller.decide(3.2).option == named["rich"] and controller.demand == pytest.approx(4 / 3)


def test_a_surge_that_the_option_in_force_carries_waits_for_the_window():
    named = {"rich": Option(0.7, 20, escalation=0.6, quality=0.9, light_s=0.1, heavy_s=0.4),
             "cheap": Option(0.3, 10, escalation=0.1, quality=0.6, light_s=0.05, heavy_s=0.2)}
    controller = LoadController(list(named.values()), gpus=1, interval_s=1.0, alpha=0.5, surge_arrivals=5)
    assert feed(controller, 0.0, 8).option == named["cheap"]  # demand 8; cheap carries 11.4 req/s
    for j in range(6):  # 10 req/s: over the estimate, within what cheap carries
        controller.observe_arrival(1.0 + j * 0.1)
        assert controller.decide(1.0 + j * 0.1) is None
    off = LoadController(list(named.values()), gpus=1, interval_s=1.0, surge_arrivals=0)
    feed(off, 0.0, 1)
    for j in range(20):  # 100 req/s, with the surge check off: only the window decides
        off.observe_arrival(1.0 + j * 0.01)
        assert off.decide(1.0 + j * 0.01) is None
    # Overloaded already (nothing fits at 14 req/s: cheap on the device): a faster surge changes nothing.
    controller = LoadController(list(named.values()), gpus=1, interval_s=1.0, alpha=0.5, surge_arrivals=5)
    assert feed(controller, 0.0, 14).inputs["overloaded"] is True
    for j in range(6):  # 50 req/s
        controller.observe_arrival(1.0 + j * 0.02)
        assert controller.decide(1.0 + j * 0.02) is None
    assert controller.demand == 14.0
    copy = LoadController(list(named.values()), gpus=1, interval_s=1.0, alpha=0.5, surge_arrivals=5)
    copy.restore(json.loads(json.dumps(controller.state(now=1.1))), now=0.0)  # overloaded, as read
    for j in range(6):
        copy.observe_arrival(0.01 * j)
        assert copy.decide(0.01 * j) is None
