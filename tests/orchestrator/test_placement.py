"""Placement over devices (plain policy) and the engine group that applies it, on fake executors standing in
for devices (one engine, scheduler and runner each), driven one iteration at a time."""

import math
import threading

import pytest

from triffusion.orchestrator.cascade import Decision, Option
from triffusion.orchestrator.engine import Observer, PipelineSpec, make_engine
from triffusion.orchestrator.errors import Code, ServingError
from triffusion.orchestrator.group import EngineGroup
from triffusion.orchestrator.placement import (DeviceView, LeastFinish, LeastLoaded, RoundRobin, candidates,
                                               create_placement, split_roles)
from triffusion.orchestrator.scheduler import Cascade, QueueFull, StepScheduler

from .fakes import SCHEDULER_CONFIG, FakeExecutor, make_state

SPEC = PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG)


def view(i, finish, waiting=0, running=0, closed=False, role="any"):
    return DeviceView(i, waiting, running, finish, closed, role)


# ---- the policy ---------------------------------------------------------------------------------
def test_least_finish_orders_by_forecast_then_load_then_index_and_skips_closed():
    views = [view(0, 5.0, waiting=1), view(1, 3.0, running=4), view(2, 5.0), view(3, 1.0, closed=True)]
    assert LeastFinish().order(views) == [1, 2, 0]


def test_least_finish_treats_forecasts_within_the_slack_as_equal_and_takes_the_least_loaded():
    views = [view(0, 2.00, running=6), view(1, 2.15, running=1), view(2, 2.5), view(3, 9.0)]
    assert LeastFinish(slack=0.1).order(views) == [1, 0, 2, 3]  # 2.15 is within 10% of 2.0; 2.5 is not
    assert LeastFinish(slack=0.0, slack_min_s=0.0).order(views) == [0, 1, 2, 3]


def test_least_loaded_counts_waiting_and_running():
    views = [view(0, 1.0, waiting=2), view(1, 9.0, running=1), view(2, 9.0, running=1)]
    assert LeastLoaded().order(views) == [1, 2, 0]


def test_round_robin_turns_blind_to_load():
    rr = RoundRobin()
    views = [view(0, 9.0, running=8), view(1, 0.0)]
    assert [rr.order(views)[0] for _ in range(4)] == [0, 1, 0, 1]


def test_unknown_placement_is_named():
    with pytest.raises(ValueError, match="placement 'nearest' is unknown; choose one of: least_finish"):
        create_placement("nearest")


def test_split_roles_follow_the_controller_and_refuse_what_does_not_fit():
    assert split_roles(4, 3, 1) == ["light", "light", "light", "heavy"]
    assert split_roles(4, 2, 1) == ["light", "light", "any", "heavy"]
    assert split_roles(3, 3, 0) == ["any"] * 3  # nothing escalates: no heavy pool to keep apart
    with pytest.raises(ValueError, match="2 light \\+ 2 heavy does not fit 3 devices"):
        split_roles(3, 2, 2)


def test_candidates_try_the_role_pool_first_then_the_rest():
    views = [view(0, 1.0, role="light"), view(1, 0.5, role="heavy"), view(2, 2.0, role="light")]
    assert candidates(views, LeastFinish(), "light") == [0, 2, 1]
    assert candidates(views, LeastFinish(), "heavy") == [1, 0, 2]
    assert candidates(views, LeastFinish(), None) == [1, 0, 2]


# ---- the group ------------------------------------------------------------------------------------
class Counting(Observer):
    def __init__(self):
        self.done = []

    def request_done(self, state):
        self.done.append((state.request_id, state.status.value))


def group_of(n, placement="least_finish", observer=None, schedulers=None, controller=None):
    observer = observer or Counting()
    engines = [make_engine(FakeExecutor(), SPEC, (schedulers or {}).get(i) or StepScheduler(max_active=4),
                           observer=observer, pipelined=False) for i in range(n)]
    return EngineGroup(engines, placement, controller=controller), observer


def drain(group, limit=400):
    for _ in range(limit):
        if not any(e.scheduler.has_work for e in group.engines):
            return
        for engine in group.engines:
            if engine.scheduler.has_work:
                engine.step()
    raise AssertionError("group did not drain")


def device_of(group, state):
    return next(i for i, e in enumerate(group.engines) if state in e.scheduler.waiting + e.scheduler.running)


def test_work_goes_where_it_finishes_first_not_in_turn():
    group, _ = group_of(2)
    big = make_state(0, size=256, steps=40)
    group.submit(big)
    assert device_of(group, big) == 0  # both idle: the lowest index
    smalls = [make_state(i, size=64, steps=4) for i in range(1, 4)]
    for state in smalls:
        group.submit(state)
    # Device 0 owes 40 steps at 256x256; the small ones finish sooner on device 1 even as it fills up.
    assert [device_of(group, s) for s in smalls] == [1, 1, 1]
    drain(group)
    assert all(s.sink.outcome == "finish" for s in [big, *smalls])
    assert group.placed == [1, 3]


def test_round_robin_group_alternates_whatever_the_load():
    group, _ = group_of(2, "round_robin")
    states = [make_state(0, size=256, steps=40)] + [make_state(i, steps=4) for i in range(1, 4)]
    for state in states:
        group.submit(state)
    assert [device_of(group, s) for s in states] == [0, 1, 0, 1]


class InOrder:
    """A placement that always tries the devices in index order (to make device 0 the one that refuses)."""

    def order(self, views):
        return [v.index for v in views if not v.closed]


def test_a_device_that_refuses_passes_the_request_to_the_next_and_no_rejection_is_counted():
    group, observer = group_of(2, InOrder(), schedulers={0: StepScheduler(max_queue=1)})
    filler = make_state(9)
    group.submit(filler)
    assert device_of(group, filler) == 0  # device 0's queue is now full
    state = make_state(1, steps=4)
    state.params.min_steps = 2
    group.submit(state)
    assert device_of(group, state) == 1
    assert group.engines[0].scheduler.waiting == [filler]
    assert not any(status == "rejected" for _, status in observer.done)
    drain(group)
    assert state.sink.outcome == filler.sink.outcome == "finish"
    assert group.placed == [1, 1]


def test_refused_everywhere_raises_once_and_counts_one_rejection():
    group, observer = group_of(2, schedulers={i: StepScheduler(max_queue=1) for i in range(2)})
    for engine in group.engines:
        engine.scheduler.waiting.append(make_state(90 + len(observer.done)))
    state = make_state(1)
    with pytest.raises(QueueFull):
        group.submit(state)
    assert observer.done == [("r1", "rejected")]


def test_closed_devices_take_nothing_and_all_closed_is_unavailable():
    group, _ = group_of(2)
    group.engines[0].drain()
    state = make_state(1)
    group.submit(state)
    assert device_of(group, state) == 1
    group.engines[1].drain()
    with pytest.raises(ServingError) as info:
        group.submit(make_state(2))
    assert info.value.code == Code.UNAVAILABLE


class FixedSplit:
    """A controller stand-in: one decision, light and heavy GPU counts given."""

    def __init__(self, light, heavy):
        option = Option(threshold=0.5, steps=4, escalation=0.3, quality=0.9, light_s=0.1, heavy_s=0.2)
        self.decision = Decision(option, light, heavy)

    def observe_arrival(self, now):
        pass

    def decide(self, now):
        return self.decision


def test_cascade_split_places_light_work_on_light_devices_and_heavy_on_heavy():
    pair = Cascade(light="unet_lite", heavy="unet")
    schedulers = {i: StepScheduler(max_active=4, cascade=pair) for i in range(3)}
    group, _ = group_of(3, schedulers=schedulers, controller=FixedSplit(2, 1))
    light = [make_state(i, steps=4) for i in range(4)]
    for state in light:
        state.cascade, state.model = True, "unet_lite"
        group.submit(state)
    heavy = make_state(10, steps=4)  # unet=default: the heavy model
    group.submit(heavy)
    assert group.roles == ["light", "light", "heavy"]
    assert {device_of(group, s) for s in light} == {0, 1}
    assert device_of(group, heavy) == 2
    # The light pool is full to its forecast; a heavy device still takes light work when it is the only one open.
    group.engines[0].drain(), group.engines[1].drain()
    spill = make_state(20, steps=4)
    spill.cascade, spill.model = True, "unet_lite"
    group.submit(spill)
    assert device_of(group, spill) == 2


def test_threaded_group_answers_everything_and_reports_every_device():
    group, observer = group_of(3)
    group.start()
    states = [make_state(i, steps=3, size=64 if i % 2 else 128) for i in range(9)]
    done = threading.Semaphore(0)
    for state in states:
        finish = state.sink.finish
        state.sink.finish = lambda image, metadata, f=finish: (f(image, metadata), done.release())
        group.submit(state)
    for _ in states:
        assert done.acquire(timeout=60)
    health = group.health()
    group.stop(grace_s=1.0)
    assert all(s.sink.outcome == "finish" for s in states)
    assert health["ok"] and len(health["devices"]) == 3 and sum(health["placed"]) == 9
    assert min(health["placed"]) >= 1  # every device served
    assert math.isfinite(group.profile()["devices"][0]["iteration_scale"])


# ---- configuration ------------------------------------------------------------------------------------
def test_one_device_is_the_single_engine_path_and_more_build_a_group_on_numbered_devices():
    from triffusion.orchestrator.config import OrchestratorConfig, build_engines, device_names
    from triffusion.orchestrator.engine import Engine

    from .test_config import PIPELINE

    engine, _ = build_engines(OrchestratorConfig(), PIPELINE, [FakeExecutor()])
    assert type(engine) is Engine
    config = OrchestratorConfig.from_parameters({"devices": "2", "placement": "least_loaded", "device": "cuda"})
    assert device_names(config) == ["cuda:0", "cuda:1"]
    assert device_names(config.replace(device="cpu")) == ["cpu", "cpu"]
    group, limits = build_engines(config.replace(device="cpu"), PIPELINE, [FakeExecutor(), FakeExecutor()])
    assert isinstance(group, EngineGroup) and len(group.engines) == 2 and group.placement.name == "least_loaded"
    assert group.engines[0].scheduler is not group.engines[1].scheduler
    with pytest.raises(ValueError, match="executors: 1 for 2 devices"):
        build_engines(config, PIPELINE, [FakeExecutor()])
    with pytest.raises(ValueError, match="orchestrator parameter placement: 'nearest' is unknown"):
        OrchestratorConfig(placement="nearest")
    with pytest.raises(ValueError, match="orchestrator parameter devices: 0 is out of range"):
        OrchestratorConfig(devices=0)
