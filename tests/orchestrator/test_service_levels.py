"""SLO classes and the quality floor: a request names a class, the class sets its SLO, priority and
quality floor; admission and the entropy stop never serve fewer steps than the floor needs on the
request's model; the feature switches the SLO benchmark's ablations use turn one feature off each."""

import pytest

from triffusion.orchestrator.errors import InvalidRequest, Rejected
from triffusion.orchestrator.params import Limits, parse_params
from triffusion.orchestrator.predictor import LatencyPredictor
from triffusion.orchestrator.quality import StepProfile
from triffusion.orchestrator.scheduler import Cascade, StepScheduler
from triffusion.orchestrator.stepping import EntropyStop

from .fakes import make_state

CLASSES = {"interactive": {"slo_ms": 1500, "min_quality": 0.7, "priority": 5}, "batch": {"slo_ms": 20000}}
LIMITS = Limits(slo_classes=CLASSES)
# Quality reaches 0.7 at 8 steps (linear between 6 -> 0.6 and 10 -> 0.8) on "unet", at 4 on "light".
PROFILES = {"unet": StepProfile((2, 6, 10, 20), (0.4, 0.6, 0.8, 1.0), (0.1, 0.3, 0.5, 1.0)),
            "light": StepProfile((2, 4, 20), (0.5, 0.7, 1.0), (0.05, 0.1, 0.5))}


def parse(**raw):
    return parse_params({"prompt": "a red bicycle", **raw}, LIMITS, lambda text: len(text.split()))


def test_a_class_sets_slo_priority_and_quality_floor_unless_the_request_does():
    p = parse(slo_class="interactive")
    assert (p.slo_ms, p.priority, p.min_quality, p.slo_class) == (1500, 5, 0.7, "interactive")
    p = parse(slo_class="interactive", slo_ms=900, priority=1)
    assert (p.slo_ms, p.priority, p.min_quality) == (900, 1, 0.7)
    assert parse(slo_class="batch").min_quality is None


def test_an_unknown_class_is_named_with_the_served_ones():
    with pytest.raises(InvalidRequest, match=r"^slo_class: 'gold' is not served; allowed: batch, interactive$"):
        parse(slo_class="gold")
    with pytest.raises(InvalidRequest, match="the server has no SLO classes"):
        parse_params({"prompt": "a", "slo_class": "batch"}, Limits(), None)


def test_the_floor_is_found_on_the_profile():
    assert PROFILES["unet"].min_steps_for(0.7) == 8 and PROFILES["light"].min_steps_for(0.7) == 4
    assert PROFILES["unet"].min_steps_for(1.01) is None and PROFILES["unet"].min_steps_for(0.1) == 2


def loaded_scheduler(**switches):
    predictor = LatencyPredictor(prior_encode_s=0.0, prior_decode_per_pixel_s=0.0)
    predictor.seed({"unet": [["unet", 64, 64, rows, 0.05 * rows] for rows in range(1, 17)]})
    return StepScheduler(max_active=4, predictor=predictor, step_profiles=PROFILES, **switches)


def auto_state(i, steps=20, slo_ms=1500, min_quality=0.7):
    state = make_state(i, steps=steps, stream=False)
    state.params.step_mode, state.params.slo_ms, state.params.min_quality = "auto", slo_ms, min_quality
    return state


def test_admission_degrades_steps_down_to_the_floor_and_no_further():
    scheduler = loaded_scheduler()
    # Alone: 0.1 s an iteration (2 rows) and one iteration to encode, so 1.5 s allows 14 steps.
    first = auto_state(1)
    scheduler.add(first, now=0.0)
    assert (first.params.steps, first.requested_steps, first.quality_steps) == (14, 20, 8)
    # A request with a 0.8 s SLO would get 7 steps: below the floor of 8, so it is refused.
    with pytest.raises(Rejected, match="with 8 steps"):
        loaded_scheduler().add(auto_state(2, slo_ms=800), now=0.0)


def test_the_entropy_stop_never_ends_before_the_floor():
    stop = EntropyStop(threshold=10.0, patience=1, min_fraction=0.0, min_steps=8)
    decisions = [stop.observe(1.0, step, 20) for step in range(1, 12)]
    assert decisions.index(True) == 7  # step 8, the first one the floor allows


def test_switches_turn_features_off_one_at_a_time():
    no_admission = loaded_scheduler(admission=False)
    tight = auto_state(1, slo_ms=10)
    no_admission.add(tight, now=0.0)  # no rejection, no degradation
    assert tight.params.steps == 20 and tight.requested_steps is None
    no_auto = loaded_scheduler(auto_steps=False)
    fixed = auto_state(2, slo_ms=100_000)
    no_auto.add(fixed, now=0.0)
    assert fixed.params.step_mode == "fixed" and fixed.quality_steps == 0
    no_cascade = StepScheduler(cascade=Cascade(light="light", heavy="unet"), cascade_routing=False)
    routed = make_state(3)
    routed.model, routed.cascade = "light", True
    no_cascade.add(routed, now=0.0)
    assert (routed.model, routed.cascade) == ("unet", False)


def test_an_escalation_that_cannot_meet_the_deadline_keeps_the_light_answer():
    import numpy as np

    from triffusion.orchestrator.engine import PipelineSpec, make_engine

    from .fakes import SCHEDULER_CONFIG, FakeExecutor

    class LowScores(FakeExecutor):
        def score(self, images, prompts=None):
            return np.zeros(len(images), np.float32)  # every light answer asks for the heavy model

    scheduler = StepScheduler(cascade=Cascade(light="light", heavy="unet"), threshold=0.5, admission=False)
    engine = make_engine(LowScores(), PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG), scheduler)
    late, relaxed = make_state(1, steps=3, stream=False), make_state(2, steps=3, stream=False)
    late.params.slo_ms, relaxed.params.slo_ms = 1, 3_600_000  # 1 ms: no heavy redo can make it
    for state in (late, relaxed):
        state.model, state.cascade = "light", True
        engine.submit(state)
    while engine.scheduler.has_work:
        engine.step()
    late_meta, relaxed_meta = late.sink.events[-1][2], relaxed.sink.events[-1][2]
    assert late_meta["unet"] == "light" and late_meta["cascade"]["escalation_skipped"] is True
    assert relaxed_meta["unet"] == "unet" and relaxed_meta["cascade"]["escalated"] is True
