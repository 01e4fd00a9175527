"""Cascades in the engine on a fake executor: the light model answers first, the gate's score decides,
an escalated request is redone on the heavy model from the same noise, and the answer names its model.
The load-adaptive controller's decisions reach the router and the step budget."""

import numpy as np

from triffusion.orchestrator.cascade import LoadController, Option
from triffusion.orchestrator.engine import Observer, PipelineSpec, make_engine as build
from triffusion.orchestrator.scheduler import Cascade, StepScheduler

from .fakes import SCHEDULER_CONFIG, FakeExecutor, SimClock, make_state


class GatedExecutor(FakeExecutor):
    """The heavy model predicts differently from the light one; the gate's scores are scripted."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)
        self.models: list[str] = []

    def denoise(self, model, sample, timestep, text_embeddings):
        self.models.append(model)
        out = super().denoise(model, sample, timestep, text_embeddings)
        return out * (1.5 if model == "heavy" else 1.0)

    def score(self, images, prompts=None):
        self.calls.append(("score", len(images)))
        self.prompts = prompts
        return np.array([self.scores.pop(0) for _ in images], np.float32)


class Recorder(Observer):
    def __init__(self):
        self.routes, self.decisions = [], []

    def cascade(self, state, router):
        self.routes.append((state.gate_score, state.escalated))

    def decision(self, decision):
        self.decisions.append(decision)


def make_engine(executor, threshold=0.5, controller=None, clock=None):
    scheduler = StepScheduler(cascade=Cascade(light="light", heavy="heavy"), threshold=threshold, controller=controller)
    return build(executor, PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG), scheduler,
                 observer=Recorder(), clock=clock or SimClock())


def run(engine, states, submit=True):
    for state in states if submit else ():
        engine.submit(state)
    for _ in range(200):
        if not engine.scheduler.has_work:
            return [state.sink.events[-1] for state in states]
        engine.step()
    raise AssertionError("engine did not drain")


def served_alone(model, i):
    """The same request on one model with no cascade: what an escalated answer must equal."""
    executor = GatedExecutor([])
    engine = build(executor, PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG), StepScheduler())
    state = make_state(i, seed=10 + i, stream=False)
    state.model = model
    return run(engine, [state])[0][1]


def cascade_state(i):
    state = make_state(i, seed=10 + i, stream=False)
    state.model, state.cascade = "light", True
    return state


def test_high_scores_keep_the_light_answer_and_low_scores_are_redone_on_the_heavy_model():
    executor = GatedExecutor([0.9, 0.1])
    engine = make_engine(executor)
    (kind0, image0, meta0), (kind1, image1, meta1) = run(engine, [cascade_state(0), cascade_state(1)])
    assert kind0 == kind1 == "finish"
    assert meta0["unet"] == "light" and meta0["cascade"] == {"light": "light", "score": np.float32(0.9).item(),
                                                            "threshold": 0.5, "escalated": False,
                                                            "escalation_skipped": False, "gate_error": None}
    assert meta1["unet"] == "heavy" and meta1["cascade"]["escalated"] is True
    assert meta1["steps_done"] == 4
    # Escalation starts again from the request's own seeded noise: the heavy answer is the heavy model's.
    assert np.array_equal(image1, served_alone("heavy", 1))
    assert np.array_equal(image0, served_alone("light", 0))
    assert engine.scheduler.router.escalation_rate == 0.5 and engine.observer.routes == [(np.float32(0.9).item(), False),
                                                                                (np.float32(0.1).item(), True)]
    # One gate call per decoded batch; the heavy redo is not gated again.
    assert [c for c in executor.calls if c[0] == "score"] == [("score", 2)]
    assert executor.models.count("heavy") == 4 and executor.models.count("light") == 4
    # The gate gets each image's own prompt (the CLIP gate scores the image against it).
    assert executor.prompts == ["prompt 0", "prompt 1"]


def test_non_cascade_requests_are_never_gated():
    executor = GatedExecutor([])
    engine = make_engine(executor)
    state = make_state(0, stream=False)
    state.model = "light"
    (kind, _, meta), = run(engine, [state])
    assert kind == "finish" and meta["cascade"] is None and not [c for c in executor.calls if c[0] == "score"]


def test_controller_decisions_set_the_threshold_and_the_step_budget():
    clock = SimClock()
    cheap = Option(threshold=0.2, steps=2, escalation=0.1, quality=0.5, light_s=0.1, heavy_s=1.0)
    rich = Option(threshold=0.8, steps=4, escalation=0.6, quality=0.9, light_s=0.2, heavy_s=1.0)
    controller = LoadController([cheap, rich], gpus=2, utilization=1.0, interval_s=1.0, alpha=1.0)
    engine = make_engine(GatedExecutor([0.5] * 50), controller=controller, clock=clock)
    # Light demand (1 request/s): the rich option fits (0.2 GPU-s/s light, 0.6 heavy: one GPU each).
    engine.submit(cascade_state(0))
    clock.now = 1.0
    engine.step()
    assert engine.scheduler.router.threshold == 0.8 and engine.scheduler.step_budget == 4
    # Heavy demand (5 requests/s in the next window): rich needs 3 heavy GPUs; cheap fits (0.5 + 0.5).
    for i in range(5):
        engine.submit(cascade_state(1 + i))
    clock.now = 2.0
    engine.step()
    assert engine.scheduler.router.threshold == 0.2 and engine.scheduler.step_budget == 2
    assert [d.option for d in engine.observer.decisions] == [rich, cheap]
    assert engine.observer.decisions[-1].inputs["demand"] == 5.0
    reported = engine.profile()["controller"]  # where it stands, for a simulator to go on from
    assert reported["option"]["threshold"] == 0.2 and reported["demand"] == 5.0 and reported["arrivals"] == 0
    late = cascade_state(9)
    engine.submit(late)  # steps 4 > budget 2: served with the budget, reported as degraded
    assert (late.params.steps, late.requested_steps) == (2, 4)


def test_controller_with_nothing_feasible_picks_the_cheapest_option_and_says_overloaded():
    cheap = Option(threshold=0.2, steps=2, escalation=0.1, quality=0.5, light_s=1.0, heavy_s=1.0)
    controller = LoadController([cheap], gpus=1, utilization=1.0, interval_s=1.0)
    controller.observe_arrival(0.0)
    for _ in range(9):
        controller.observe_arrival(0.5)
    decision = controller.decide(1.0)
    assert decision.option == cheap and decision.inputs["overloaded"] is True and controller.demand == 10.0
    assert controller.decide(1.5) is None  # the next window has not closed


def test_the_controller_counts_arrivals_when_their_front_received_them():
    """A clump of requests that reaches the engine at once (after a slow iteration) is no surge: the controller
    measures the rate on the times the fronts received them. Without those times, the clump is what it sees."""
    cheap = Option(threshold=0.2, steps=2, escalation=0.1, quality=0.5, light_s=0.1, heavy_s=1.0)
    rich = Option(threshold=0.8, steps=4, escalation=0.6, quality=0.9, light_s=0.2, heavy_s=1.0)
    decided = {}
    for received in (True, False):
        clock = SimClock()
        controller = LoadController([cheap, rich], gpus=2, utilization=1.0, interval_s=10.0, surge_arrivals=4)
        engine = make_engine(GatedExecutor([0.5] * 50), controller=controller, clock=clock)
        engine.submit(cascade_state(0))
        clock.now = 10.0
        engine.step()  # a window of one request in 10 s: rich (0.6 heavy GPU-s/s at 1 req/s fits one GPU)
        for i in range(4):  # received 1 s apart (1 req/s), submitted together at 13 s, 10 ms apart
            clock.now = 13.0 + 0.01 * i
            state = cascade_state(1 + i)
            state.received = 10.0 + i if received else None
            engine.submit(state)
        engine.step()
        decided[received] = [d.option for d in engine.observer.decisions]
    assert decided[True] == [rich]
    assert decided[False] == [rich, cheap]  # four arrivals in 30 ms: a surge past what rich carries


def test_an_operating_point_that_escalates_nothing_keeps_light_answers_without_gating_them():
    """At peak load the controller's cheapest option escalates none: the gate is not called (its score could
    change nothing), and the forecast counts no gate time. An option that escalates some gates again."""
    clock = SimClock()
    none = Option(threshold=1e-6, steps=4, escalation=0.0, quality=0.1, light_s=0.1, heavy_s=1.0)
    some = Option(threshold=0.8, steps=4, escalation=0.5, quality=0.9, light_s=0.1, heavy_s=1.0)
    controller = LoadController([none, some], gpus=1, utilization=1.0, interval_s=1.0, alpha=1.0, surge_arrivals=0)
    executor = GatedExecutor([0.9] * 10)
    engine = make_engine(executor, controller=controller, clock=clock)
    first = [cascade_state(i) for i in range(6)]
    for state in first:
        engine.submit(state)
    clock.now = 1.0  # 6 req/s: `some` needs 0.1 + 0.5 s a query (3.6 device-s/s); only `none` fits (0.6)
    engine.step()
    assert [d.option for d in engine.observer.decisions] == [none] and engine.scheduler.gating is False
    light = cascade_state(7)
    decode = engine.scheduler.predictor.decode(light.params.height * light.params.width)
    assert engine.scheduler._answer_time([light]) == decode  # no gate time in the forecast
    metas = [event[2] for event in run(engine, first, submit=False)]
    assert all(m["unet"] == "light" and m["cascade"]["score"] is None and not m["cascade"]["escalated"] for m in metas)
    assert [c for c in executor.calls if c[0] == "score"] == []
    clock.now = 10.0  # two arrivals in 9 s: `some` fits again, and its answers are gated
    (_, _, meta), = run(engine, [cascade_state(20)])
    assert engine.observer.decisions[-1].option == some and engine.scheduler.gating is True
    assert meta["cascade"]["score"] == np.float32(0.9).item() and [c for c in executor.calls if c[0] == "score"]
