"""Scheduler policies and admission control on a simulated clock with a fake executor."""

import random

import pytest

from triffusion.orchestrator.engine import PipelineSpec, make_engine
from triffusion.orchestrator.policies import create_policy
from triffusion.orchestrator.predictor import LatencyPredictor
from triffusion.orchestrator.request import Status
from triffusion.orchestrator.scheduler import QueueFull, Rejected, StepScheduler

from .fakes import SCHEDULER_CONFIG, RecordingSink, SimClock, TimedExecutor, make_state


def sim_engine(policy="fcfs", predictor=None, **limits):
    clock = SimClock()
    scheduler = StepScheduler(policy=create_policy(policy), predictor=predictor or LatencyPredictor(), **limits)
    # Sequential stages: one simulated clock cannot be advanced by two threads at once.
    engine = make_engine(TimedExecutor(clock), PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG),
                         scheduler, clock=clock, pipelined=False)
    return engine, clock


def submit(engine, state):
    try:
        engine.submit(state)
        return True
    except (Rejected, QueueFull):
        return False


def run_stream(policy, make_high, every: int, limit_s: float = 120.0):
    """One low-priority request, then a high-priority arrival every `every` iterations (overload)."""
    engine, clock = sim_engine(policy, max_active=1, max_queue=100_000)
    low = make_state(0, steps=2, guidance=1.0, stream=False)
    low.params.slo_ms = 20_000
    assert submit(engine, low)
    highs, i = [], 1
    while clock.now < limit_s and low.status is not Status.FINISHED:
        if i % every == 0:
            high = make_high(i)
            if submit(engine, high):
                highs.append(high)
        i += 1
        engine.step()
    return low, highs


def started_after(high, low):
    return high.times.get("encoding", float("inf")) > low.times["encoding"]


def test_edf_with_priorities_does_not_starve_low_priority():
    """EDF moves a level-9 deadline 9 s earlier: every high-priority request whose boosted deadline is
    later than the low one's (arrival > 20 - 20 + 9 = 9 s) starts after it, so the stream cannot starve it."""

    def high(i):
        state = make_state(i, steps=2, guidance=1.0, stream=False)
        state.params.slo_ms, state.params.priority = 20_000, 9
        return state

    low, highs = run_stream("edf", high, every=1)
    assert low.status is Status.FINISHED
    late = [h for h in highs if h.arrival > 9.0 + 1e-9]
    assert late and all(started_after(h, low) for h in late)
    assert any(not started_after(h, low) for h in highs)  # it did yield to the earlier boosted deadlines


def test_strict_priority_with_aging_also_serves_low_priority():
    """Priority with aging (5 s a level): a level-3 request arriving after 15 s ranks below the waiting low one."""

    def high(i):
        state = make_state(i, steps=2, guidance=1.0, stream=False)
        state.params.priority = 3
        return state

    low, highs = run_stream("priority", high, every=1)
    assert low.status is Status.FINISHED
    late = [h for h in highs if h.arrival > 15.0 + 1e-9]
    assert late and all(started_after(h, low) for h in late)


@pytest.mark.parametrize("policy", ["fcfs", "edf", "srpt", "priority"])
def test_every_admitted_request_finishes_or_fails_with_a_reason(policy):
    rng = random.Random(7)
    engine, clock = sim_engine(policy, max_active=4, max_queue=6, max_batch=8)
    states, admitted = [], []
    for i in range(80):
        cancel = RecordingSink(cancel_after_steps=rng.randint(1, 3)) if rng.random() < 0.15 else RecordingSink()
        state = make_state(i, size=rng.choice([64, 128]), steps=rng.randint(1, 6), sink=cancel,
                           guidance=rng.choice([1.0, 7.5]))
        state.params.slo_ms = rng.choice([None, 300, 3000])
        state.params.priority = rng.randint(0, 3)
        states.append(state)
        if submit(engine, state):
            admitted.append(state)
        for _ in range(rng.randint(0, 2)):
            engine.step()
    while engine.scheduler.has_work:
        engine.step()
    assert admitted and len(admitted) < len(states)  # some were turned away at the door
    for state in states:
        terminal = [e for e in state.sink.events if e[0] in ("finish", "fail")]
        if state in admitted:
            assert len(terminal) == 1, state.request_id
            assert state.status in (Status.FINISHED, Status.CANCELLED, Status.FAILED)
            if state.status is not Status.FINISHED:
                assert state.error
        else:
            assert state.status is Status.REJECTED and not terminal  # the adapter answers rejections
            assert state.error.code.value == "UNAVAILABLE"
    assert not engine.scheduler.running and not engine.scheduler.waiting


def exact_predictor():
    """Binary-exact times so that 'exactly feasible' is exact in floating point."""
    predictor = LatencyPredictor()
    predictor.seed({"unet": [["unet", 64, 64, rows, 0.125 * rows / 2] for rows in range(1, 17)],
                    "stages": [["encode", 2, 0.0625], ["decode", 64 * 64, 0.0625]]})
    return predictor


def make_slo_state(i, slo_ms, steps=10, min_steps=None):
    state = make_state(i, steps=steps, stream=False)
    state.params.slo_ms, state.params.min_steps = slo_ms, min_steps
    return state


def test_admission_rejects_exactly_the_infeasible_requests():
    # The forecast: a joining request spends one iteration being encoded, then its steps, then its decode.
    # Alone: 11 x 0.125 (2 rows) + 0.0625 decode = 1.4375 s.
    scheduler = StepScheduler(max_active=4, predictor=exact_predictor())
    scheduler.add(make_slo_state(1, 1438), now=0.0)  # feasible (1437.5 ms)
    with pytest.raises(Rejected, match="slo_ms 1437 cannot be met"):
        StepScheduler(max_active=4, predictor=exact_predictor()).add(make_slo_state(2, 1437), now=0.0)
    # With a loose request waiting ahead (FCFS), both advance together: 4 rows = 0.25 s an iteration, and
    # finish together: one VAE batch of both. 11 x 0.25 + 2 x 0.0625 = 2.875 s. (Beside the tight request 1,
    # either would make it late.)
    loose = StepScheduler(max_active=4, predictor=exact_predictor())
    loose.add(make_slo_state(1, 10_000), now=0.0)
    with pytest.raises(Rejected, match="slo_ms 2874 cannot be met"):
        loose.add(make_slo_state(3, 2874), now=0.0)
    loose.add(make_slo_state(4, 2875), now=0.0)
    with pytest.raises(Rejected, match="would make request r1 miss its SLO"):
        scheduler.add(make_slo_state(5, 100_000), now=0.0)


def test_admission_serves_fewer_steps_when_allowed():
    scheduler = StepScheduler(max_active=4, predictor=exact_predictor())
    state = make_slo_state(1, 1000, steps=10, min_steps=4)  # (n + 1) x 0.125 + 0.0625 <= 1.0 -> n = 6
    scheduler.add(state, now=0.0)
    assert (state.params.steps, state.requested_steps) == (6, 10)
    with pytest.raises(Rejected, match="with 4 steps"):
        StepScheduler(max_active=4, predictor=exact_predictor()).add(make_slo_state(2, 600, min_steps=4), now=0.0)


def test_admission_protects_admitted_requests():
    scheduler = StepScheduler(max_active=4, predictor=exact_predictor())
    tight = make_slo_state(1, 1438)
    scheduler.add(tight, now=0.0)
    scheduler.running.append(scheduler.waiting.pop())  # admitted and running, on schedule exactly
    tight.steps_target = 11  # ten steps and the encode iteration, as the forecast counts them
    with pytest.raises(Rejected, match="would make request r1 miss its SLO"):
        scheduler.add(make_slo_state(2, 100_000), now=0.0)


def test_admission_protects_admitted_requests_that_still_wait():
    """A request admitted but still queued is protected too: an urgent newcomer that EDF would put ahead of
    it may not push it past its deadline."""
    scheduler = StepScheduler(max_active=1, predictor=exact_predictor(), policy=create_policy("edf"))
    first = make_slo_state(1, 1438)
    scheduler.add(first, now=0.0)
    waiting = make_slo_state(2, 2 * 1438)  # second in line, exactly on time behind the first
    scheduler.add(waiting, now=0.0)
    urgent = make_slo_state(3, 1438)  # due before `waiting`: EDF would run it first
    urgent.params.priority = 1
    with pytest.raises(Rejected, match="would make request r"):
        scheduler.add(urgent, now=0.0)


def test_a_request_already_forecast_late_is_not_overtaken():
    """Once a request looks late, tighter newcomers that EDF would run ahead of it are refused (else it starves
    behind every one of them); newcomers that queue behind it are still admitted."""
    scheduler = StepScheduler(max_active=1, predictor=exact_predictor(), policy=create_policy("edf"))
    scheduler.add(make_slo_state(1, 100_000), now=0.0)
    stuck = make_slo_state(2, 100_000)
    scheduler.add(stuck, now=0.0)
    stuck.params.slo_ms = 2000  # its forecast (2.6875 s) is now past its deadline
    with pytest.raises(Rejected, match="would make request r2 miss its SLO"):
        scheduler.add(make_slo_state(3, 1500), now=0.0)
    scheduler.add(make_slo_state(4, 100_000), now=0.0)


def test_admission_headroom_plans_each_request_to_finish_early():
    # Alone: 1.4375 s (above). With 20% headroom it must fit in 80% of the SLO: slo_ms >= 1796.875.
    StepScheduler(max_active=4, predictor=exact_predictor(), headroom=0.2).add(make_slo_state(1, 1797), now=0.0)
    with pytest.raises(Rejected, match="slo_ms 1796 cannot be met"):
        StepScheduler(max_active=4, predictor=exact_predictor(), headroom=0.2).add(make_slo_state(2, 1796), now=0.0)


def test_the_forecast_times_side_stages_that_hold_the_loop():
    """A finished request's decode runs during the next iteration, which lasts as long as the longer of the two."""
    predictor = LatencyPredictor()
    predictor.seed({"unet": [["unet", 64, 64, rows, 0.125 * rows / 2] for rows in range(1, 17)],
                    "stages": [["encode", 2, 0.0625], ["decode", 64 * 64, 0.5]]})
    scheduler = StepScheduler(max_active=1, predictor=predictor)
    first, second = make_slo_state(1, 100_000), make_slo_state(2, 100_000)
    scheduler.add(first, now=0.0)
    scheduler.add(second, now=0.0)
    finish = scheduler.forecast(0.0)
    # first: 11 iterations of 0.125 s, then its 0.5 s decode.
    assert finish[first] == 11 * 0.125 + 0.5
    # second joins when first leaves; its first iteration waits for first's decode and its own encode
    # (0.5625 s instead of 0.125), then 10 more iterations and its decode.
    assert finish[second] == 11 * 0.125 + (0.5 + 0.0625) + 10 * 0.125 + 0.5


def test_the_forecast_bias_learns_per_level_and_only_from_long_forecasts():
    scheduler = StepScheduler(max_active=4, predictor=exact_predictor())
    slow = make_slo_state(1, 2000)  # forecast 1.4375 s: at least a quarter of its SLO
    scheduler.add(slow, now=0.0)
    assert slow.forecast_s == 1.4375
    scheduler.observe_finish(slow, now=2 * 1.4375)  # it took twice the forecast
    scheduler.waiting.remove(slow)
    assert scheduler.forecast_bias == {"priority 0": pytest.approx(1.2)}  # EWMA, alpha 0.2
    short = make_slo_state(2, 100_000)  # 1.4375 s of a 100 s SLO: fixed costs, not a scale
    scheduler.add(short, now=0.0)
    scheduler.observe_finish(short, now=10.0)
    assert scheduler.forecast_bias == {"priority 0": pytest.approx(1.2)}
    # Admission scales the level's forecasts by it: alone, 1.4375 x 1.2 = 1.725 s.
    learned = scheduler.forecast_bias
    fits, late = (StepScheduler(max_active=4, predictor=exact_predictor()) for _ in range(2))
    fits.forecast_bias, late.forecast_bias = dict(learned), dict(learned)
    fits.add(make_slo_state(3, 1726), now=0.0)
    with pytest.raises(Rejected, match="slo_ms 1724 cannot be met"):
        late.add(make_slo_state(4, 1724), now=0.0)
    other = make_slo_state(5, 1500)
    other.params.priority = 3  # another level: no bias learned for it yet
    late.add(other, now=0.0)


def test_the_forecast_plays_auto_requests_to_their_measured_stop():
    """step_mode auto: a level's requests that stopped after half their evaluations are forecast to stop there
    (their slot frees then), never below the quality floor; one that ran past its expected stop is expected to
    run to its target."""
    scheduler = StepScheduler(max_active=4, predictor=exact_predictor())
    done = make_slo_state(1, 100_000)
    done.params.step_mode, done.evaluations, done.steps_done = "auto", 10, 5
    for _ in range(200):
        scheduler._observe_stop(done)  # EWMA from 1.0 towards 0.5
    assert scheduler.stop_fraction == {("unet", "priority 0"): pytest.approx(0.5)}
    auto, fixed = make_slo_state(2, 100_000), make_slo_state(3, 100_000)
    auto.params.step_mode = "auto"
    for state in (auto, fixed):
        alone = StepScheduler(max_active=4, predictor=exact_predictor())
        alone.stop_fraction = dict(scheduler.stop_fraction)
        alone.add(state, now=0.0)
    # encode + 5 of 10 steps at 0.125 s, then the decode; the fixed one runs all 10.
    assert auto.forecast_s == 6 * 0.125 + 0.0625 and fixed.forecast_s == 11 * 0.125 + 0.0625
    floored = make_slo_state(4, 100_000)
    floored.params.step_mode, floored.quality_steps = "auto", 8
    assert scheduler._expected_steps(floored, 10) == 8
    running = make_slo_state(5, 100_000)
    running.params.step_mode, running.steps_target, running.steps_done = "auto", 10, 7
    assert scheduler._expected_left(running) == 3  # past the expected stop (5): to its target


def test_srpt_orders_by_remaining_work_and_fcfs_by_arrival():
    scheduler = StepScheduler(max_active=1, policy=create_policy("srpt"))
    long, short = make_state(1, steps=50), make_state(2, steps=3)
    scheduler.add(long, 0.0)
    scheduler.add(short, 1.0)
    assert scheduler.schedule(2.0).encode == [short]
    fcfs = StepScheduler(max_active=1)
    fcfs.add(make_state(3, steps=50), 0.0)
    fcfs.add(make_state(4, steps=3), 1.0)
    assert fcfs.schedule(2.0).encode[0].request_id == "r3"


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="unknown policy 'lifo'; choose one of: fcfs, edf, srpt, priority"):
        create_policy("lifo")


def test_predictor_learns_and_extrapolates():
    predictor = LatencyPredictor(alpha=0.5)
    predictor.observe_unet("unet", 64, 64, 2, 0.2)
    predictor.observe_unet("unet", 64, 64, 2, 0.4)
    assert predictor.unet_step("unet", 64, 64, 2) == pytest.approx(0.3)
    predictor.observe_unet("unet", 64, 64, 8, 0.9)
    # Linear in rows x pixels through the two measured shapes.
    assert predictor.unet_step("unet", 64, 64, 4) == pytest.approx(0.3 + (0.9 - 0.3) * 2 / 6)
    assert predictor.unet_step("unet", 128, 128, 2) > predictor.unet_step("unet", 64, 64, 2)


def test_admission_scales_by_measured_over_predicted_iteration_time():
    """Iterations measured at twice the UNet-only prediction make admission predict twice as long."""
    from triffusion.orchestrator.params import GenerationParams
    from triffusion.orchestrator.predictor import LatencyPredictor
    from triffusion.orchestrator.request import RequestState
    from triffusion.orchestrator.scheduler import Rejected, StepScheduler

    from .fakes import RecordingSink

    def request(i, slo_ms):
        params = GenerationParams(prompt="p", height=64, width=64, steps=10, slo_ms=slo_ms)
        return RequestState(request_id=f"r{i}", params=params, sink=RecordingSink(), input_ids=None)

    predictor = LatencyPredictor(prior_encode_s=0.0, prior_decode_per_pixel_s=0.0)
    predictor.seed({"unet": [["unet", 64, 64, 2, 0.1]]})
    scheduler = StepScheduler(predictor=predictor)
    scheduler.add(request(0, slo_ms=1500), now=0.0)  # 10 steps x 0.1 s = 1.0 s predicted: admitted
    scheduler.waiting.clear()
    for _ in range(50):
        scheduler.observe_iteration([request(9, None)], seconds=0.2)
    assert abs(scheduler.iteration_scale - 2.0) < 1e-3
    with pytest.raises(Rejected, match="predicted 2200 ms"):  # (10 steps + the encode iteration) x 0.2 s
        scheduler.add(request(1, slo_ms=1500), now=0.0)
    scheduler.observe_iteration([request(9, None)], seconds=100.0)  # one stall moves it a bounded step
    assert scheduler.iteration_scale < 2.0 * 0.8 + 5.0 * 0.2 + 1e-9


def test_the_forecast_adds_the_measured_share_of_side_stages_that_does_not_overlap():
    """With side_share 1 (side stages and UNet calls on the same cores, one after the other) an iteration with
    a side stage lasts the sum of the two; with 0, the longer of the two (the test above)."""
    predictor = LatencyPredictor()
    predictor.seed({"unet": [["unet", 64, 64, rows, 0.125 * rows / 2] for rows in range(1, 17)],
                    "stages": [["encode", 2, 0.0625], ["decode", 64 * 64, 0.5]]})
    scheduler = StepScheduler(max_active=1, predictor=predictor)
    scheduler.side_share = 1.0
    first, second = make_slo_state(1, 100_000), make_slo_state(2, 100_000)
    scheduler.add(first, now=0.0)
    scheduler.add(second, now=0.0)
    finish = scheduler.forecast(0.0)
    # first: its encode iteration costs 0.125 + 0.0625, then 10 steps, then its decode.
    first_done = 0.125 + 0.0625 + 10 * 0.125
    assert finish[first] == first_done + 0.5
    # second's first iteration: its step (0.125) and first's decode + its own encode (0.5625), one after the other.
    assert finish[second] == first_done + (0.125 + 0.5625) + 10 * 0.125 + 0.5


def test_observe_side_learns_the_share_of_the_shorter_part_that_did_not_overlap():
    scheduler = StepScheduler(predictor=exact_predictor())
    running = [make_slo_state(1, None)]  # one request: 2 UNet rows, 0.125 s predicted
    for _ in range(80):
        scheduler.observe_side(running, seconds=0.125 + 0.0625, side=0.0625)  # one after the other
    assert scheduler.side_share == pytest.approx(1.0, abs=1e-3)
    for _ in range(80):
        scheduler.observe_side(running, seconds=0.125, side=0.0625)  # beside the UNet: hidden
    assert scheduler.side_share == pytest.approx(0.0, abs=1e-3)
    before = scheduler.side_share
    scheduler.observe_side(running, seconds=50.0, side=0.0625)  # a stall counts as 1, one EWMA step
    assert scheduler.side_share == pytest.approx(0.9 * before + 0.1)


def test_an_engine_whose_side_stages_run_in_line_learns_a_side_share_near_one():
    """The engine without pipelining runs encode and decode before the UNet calls of the same iteration, so
    none of their time overlaps: what it learns, and reports in its profile (the simulator's input), is ~1."""
    engine, clock = sim_engine(max_active=4)
    for i in range(24):
        assert submit(engine, make_state(i, steps=6, stream=False))
        engine.step()
        engine.step()
    while engine.scheduler.has_work:
        engine.step()
    assert engine.scheduler.side_share > 0.9
    assert engine.profile()["side_share"] == engine.scheduler.side_share
