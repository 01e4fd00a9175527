"""Fault containment in the engine, on fake executors (no Triton): whatever fails, every accepted request
gets exactly one final answer with a clear code, its neighbours go on, and the loop keeps serving."""

import numpy as np
import pytest

from triffusion.orchestrator.engine import MAX_LOOP_FAILURES, Engine, Observer, PipelineSpec, make_engine
from triffusion.orchestrator.errors import Code, ComponentUnavailable, QueueFull, ServingError
from triffusion.orchestrator.params import SCHEDULERS
from triffusion.orchestrator.policies import EDF
from triffusion.orchestrator.scheduler import Cascade, StepScheduler

from .fakes import SCHEDULER_CONFIG, FakeExecutor, RecordingSink, make_state

SPEC = PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG)


def drain(engine, limit=500):
    for _ in range(limit):
        if not engine.scheduler.has_work:
            return
        engine.step()
    raise AssertionError("engine did not drain")


def one_final(state):
    finals = state.sink.finals
    assert len(finals) == 1, (state.request_id, finals)
    return finals[0]


class PoisonExecutor(FakeExecutor):
    """Fails any UNet call that carries the poisoned request's rows (marked by a NaN-free sentinel)."""

    def __init__(self, poison_token: int):
        super().__init__()
        self.poison_token = poison_token

    def encode(self, input_ids):
        self.poisoned = input_ids[:, 1] == self.poison_token
        return super().encode(input_ids)

    def denoise(self, model, sample, timestep, text_embeddings):
        if np.any(np.isclose(text_embeddings[:, 1, 0], self.poison_token % 7)):
            raise RuntimeError("bad rows")
        return super().denoise(model, sample, timestep, text_embeddings)


def test_a_request_that_breaks_its_unet_batch_fails_alone():
    # Request 3's token id (103 % 7 == 5) makes the fake UNet raise on any call carrying its rows.
    executor = PoisonExecutor(poison_token=103)
    engine = make_engine(executor, SPEC, StepScheduler(max_active=8))
    states = [make_state(i, steps=3) for i in range(5)]
    for state in states:
        engine.submit(state)
    drain(engine)
    outcomes = {s.request_id: one_final(s)[0] for s in states}
    assert outcomes == {"r0": "finish", "r1": "finish", "r2": "finish", "r3": "fail", "r4": "finish"}
    assert one_final(states[3])[1:] == (Code.INTERNAL, "unet failed (RuntimeError)")
    # The batch was retried one request at a time: the neighbours' images equal their solo runs.
    alone = make_state(0, steps=3)
    solo = make_engine(FakeExecutor(), SPEC)
    solo.submit(alone)
    drain(solo)
    assert np.array_equal(one_final(alone)[1], one_final(states[0])[1])


class DownExecutor(FakeExecutor):
    def denoise(self, model, sample, timestep, text_embeddings):
        raise ComponentUnavailable(model, "is restarting; retry shortly")


def test_an_unavailable_component_fails_its_requests_with_unavailable_at_once():
    executor = DownExecutor()
    engine = make_engine(executor, SPEC)
    states = [make_state(i, steps=5) for i in range(3)]
    for state in states:
        engine.submit(state)
    drain(engine)
    assert [one_final(s)[1:] for s in states] == [(Code.UNAVAILABLE, "unet is restarting; retry shortly")] * 3
    # No one-by-one retry for an outage: one UNet call, not four.
    assert [c for c in executor.calls if c[0] == "denoise"] == []


class GarbageExecutor(FakeExecutor):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def denoise(self, model, sample, timestep, text_embeddings):
        out = super().denoise(model, sample, timestep, text_embeddings)
        return out[:, :2] if self.mode == "shape" else out * np.nan

    def decode(self, latent):
        return super().decode(latent)


@pytest.mark.parametrize("mode, message", [("shape", "returned shape"), ("nan", "produced non-finite latents")])
def test_garbage_from_the_unet_fails_the_request_with_a_clear_message(mode, message):
    engine = make_engine(GarbageExecutor(mode), SPEC)
    state = make_state(1, steps=2)
    engine.submit(state)
    drain(engine)
    kind, code, text = one_final(state)
    assert kind == "fail" and code is Code.INTERNAL and message in text and "Traceback" not in text


class RaisingSink(RecordingSink):
    def finish(self, image, metadata):
        super().finish(image, metadata)
        raise BrokenPipeError("client went away")

    def progress(self, step, steps):
        super().progress(step, steps)
        if step == 2:
            raise BrokenPipeError("client went away")


def test_a_sink_that_raises_cancels_its_request_and_the_loop_goes_on():
    engine = make_engine(FakeExecutor(), SPEC)
    broken = make_state(1, steps=6, sink=RaisingSink())
    fine = make_state(2, steps=6)
    for state in (broken, fine):
        engine.submit(state)
    drain(engine)
    assert one_final(broken)[:2] == ("fail", Code.CANCELLED) and broken.steps_done == 2
    assert one_final(fine)[0] == "finish"


class RaisingObserver(Observer):
    def stage(self, stage, seconds):
        raise KeyError(stage)


def test_an_observer_that_raises_loses_no_answer():
    """Metrics come after the scheduler's update: an observer that raises there must not drop the answers."""
    engine = make_engine(FakeExecutor(), SPEC, observer=RaisingObserver())
    states = [make_state(i, steps=3) for i in range(3)]
    for state in states:
        engine.submit(state)
    drain(engine)
    assert [one_final(s)[0] for s in states] == ["finish"] * 3
    assert engine.broken is None


class GateDown(FakeExecutor):
    def score(self, images, prompts=None):
        raise ComponentUnavailable("quality_gate", "is restarting; retry shortly")


def test_a_failing_gate_keeps_the_light_answer_and_says_so():
    scheduler = StepScheduler(cascade=Cascade(light="light", heavy="heavy"), threshold=0.5)
    engine = make_engine(GateDown(), SPEC, scheduler)
    state = make_state(1, steps=3, stream=False)
    state.model, state.cascade = "light", True
    engine.submit(state)
    drain(engine)
    kind, _, metadata = one_final(state)
    assert kind == "finish" and metadata["unet"] == "light"
    assert metadata["cascade"]["gate_error"] == "quality_gate is restarting; retry shortly"
    assert metadata["cascade"]["escalated"] is False


def test_every_documented_scheduler_serves_in_one_mixed_batch():
    engine = make_engine(FakeExecutor(), SPEC, StepScheduler(max_active=len(SCHEDULERS)))
    states = []
    for i, name in enumerate(SCHEDULERS):
        state = make_state(i, steps=4, stream=False)
        state.params.scheduler = name
        states.append(state)
        engine.submit(state)
    drain(engine)
    for state in states:
        kind, image, metadata = one_final(state)
        assert kind == "finish", (state.params.scheduler, image)
        assert metadata["scheduler"] == state.params.scheduler and np.isfinite(image.astype(float)).all()


class ExplodingRunner:
    """A runner whose bug escapes its own containment."""

    def __init__(self):
        self.released = []

    def execute(self, plan):
        raise KeyError("bug")

    def release(self, states):
        self.released += states

    def close(self):
        pass


def test_a_bug_outside_the_runner_fails_the_plan_and_the_loop_stays_up():
    engine = Engine(StepScheduler(), ExplodingRunner())
    state = make_state(1)
    engine.submit(state)
    engine.step()  # encode: the runner raises; its requests fail, the engine is fine
    kind, code, message = one_final(state)
    assert (kind, code) == ("fail", Code.INTERNAL) and "KeyError" in message
    assert not engine.scheduler.has_work and engine.health()["ok"]


class BrokenScheduler(StepScheduler):
    def update_from_output(self, plan, output, now):
        raise RuntimeError("bug in update")


def wait_for(condition, timeout_s=10.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)  # polling a flag the engine thread sets; there is nothing to wait on


def test_repeated_loop_failures_answer_everyone_and_close_intake():
    engine = make_engine(FakeExecutor(), SPEC, BrokenScheduler(max_active=1))
    engine.start()
    try:
        for i in range(MAX_LOOP_FAILURES):  # each request makes one iteration fail, and is answered
            state = make_state(i)
            engine.submit(state)
            wait_for(lambda: state.answered)
            assert one_final(state)[:2] == ("fail", Code.INTERNAL)
        engine._thread.join(10)  # the loop gave up after MAX_LOOP_FAILURES failed iterations in a row
        assert not engine._thread.is_alive()
        assert engine.health()["broken"] and not engine.health()["ok"]
        with pytest.raises(ServingError) as info:  # and new requests fail fast instead of queueing
            engine.submit(make_state(99))
        assert info.value.code is Code.UNAVAILABLE and "restarting" in info.value.message
    finally:
        engine.stop()


class SlowExecutor(FakeExecutor):
    def denoise(self, model, sample, timestep, text_embeddings):
        import time

        time.sleep(0.01)  # a UNet call that takes time, so that a request can outlast the grace period
        return super().denoise(model, sample, timestep, text_embeddings)


def test_stop_lets_requests_finish_within_the_grace_then_fails_the_rest():
    engine = make_engine(SlowExecutor(), SPEC, StepScheduler(max_active=2))
    quick, endless = make_state(1, steps=2), make_state(2, steps=100)
    engine.start()
    engine.submit(quick)
    engine.submit(endless)
    engine.stop(grace_s=0.3)  # quick needs ~0.05 s, endless ~1 s
    assert one_final(quick)[0] == "finish"
    assert one_final(endless)[1:] == (Code.UNAVAILABLE, "server is shutting down; the request did not finish in time")
    with pytest.raises(ServingError) as info:
        engine.submit(make_state(3))
    assert info.value.code is Code.UNAVAILABLE and info.value.reason == "shutting_down"


def test_a_second_final_answer_is_dropped():
    engine = make_engine(FakeExecutor(), SPEC)
    state = make_state(1, steps=2)
    engine.submit(state)
    drain(engine)
    engine._answer(state, lambda: state.sink.fail(ServingError("late")))
    assert len(state.sink.finals) == 1


def test_queue_full_is_typed():
    engine = make_engine(FakeExecutor(), SPEC, StepScheduler(max_active=1, max_queue=1))
    engine.submit(make_state(1))
    with pytest.raises(QueueFull) as info:
        engine.submit(make_state(2))
    assert info.value.code is Code.UNAVAILABLE and info.value.reason == "queue_full"


def test_edf_orders_best_effort_requests_by_priority_and_age():
    edf = EDF(priority_boost_s=1.0, best_effort_s=30.0)
    low, high, old = make_state(1), make_state(2), make_state(3)
    low.arrival, high.arrival, old.arrival = 10.0, 10.0, 0.0
    high.params.priority = 3
    assert edf.order([low, high, old], now=10.0) == [old, high, low]
    tight = make_state(4)
    tight.params.slo_ms, tight.arrival = 2000, 10.0  # due at 12 s, before every best-effort one
    assert edf.order([low, high, old, tight], now=10.0)[0] is tight
