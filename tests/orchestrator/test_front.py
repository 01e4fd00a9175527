"""The fronts' policy without Triton: validation before anything expensive, a bound on requests in flight,
exactly one final answer whoever gets there first, and what the watchdog does when the orchestrator
dies, the client leaves or the request's timeout passes."""

import pytest

from triffusion.orchestrator.errors import Code, InvalidRequest, ServingError
from triffusion.orchestrator.front import Front, dispatch
from triffusion.orchestrator.params import Limits


class Tokenizer:
    def __init__(self):
        self.calls = 0

    def count(self, text):
        self.calls += 1
        return len(text.split())

    def input_ids(self, prompt, negative, cfg):
        import numpy as np

        return np.zeros((2, 77), np.int64)


class Sink:
    def __init__(self):
        self.events, self.cancelled = [], False

    def progress(self, progress):
        self.events.append(("progress", progress))

    def preview(self, image):
        self.events.append(("preview", image))

    def finish(self, image, metadata):
        self.events.append(("finish", image))

    def fail(self, error):
        self.events.append(("fail", error.code, error.message))

    def is_cancelled(self):
        return self.cancelled


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_front(unary=True, **options):
    state = {"pid": 7, "alive": {7}, "cancelled": []}
    clock = Clock()
    front = Front(Limits(), Tokenizer(), unary=unary, clock=clock, find_orchestrator=lambda: state["pid"],
                  alive=lambda pid: pid in state["alive"], cancel=state["cancelled"].append, **options)
    return front, state, clock


def test_a_huge_prompt_is_refused_by_its_byte_length_before_tokenizing():
    front, _, _ = make_front()
    with pytest.raises(InvalidRequest, match=r"^prompt: is 7400000 bytes long; allowed up to 1200 bytes"):
        front.prepare({"prompt": b"x" * 7_400_000})
    assert front.tokenizer.calls == 0


@pytest.mark.parametrize("field", ["stream", "preview_every"])
def test_the_unary_front_refuses_stream_fields_by_name(field):
    front, _, _ = make_front(unary=True)
    with pytest.raises(InvalidRequest, match=rf"^{field}: needs a stream; call text_to_image_stream"):
        front.prepare({"prompt": "a cat", field: 1})
    stream_front, _, _ = make_front(unary=False)
    assert stream_front.prepare({"prompt": "a cat", field: 1})[0].prompt == "a cat"


def test_unknown_fields_are_refused_by_name():
    front, _, _ = make_front()
    with pytest.raises(InvalidRequest, match=r"^lora_path: is not a request field; allowed: prompt, "):
        front.prepare({"prompt": "a cat", "lora_path": "x"})


def test_the_front_holds_at_most_max_inflight_and_frees_on_answer():
    front, _, _ = make_front(max_inflight=2)
    first, second = front.accept(Sink(), False, None), front.accept(Sink(), False, None)
    with pytest.raises(ServingError) as info:
        front.accept(Sink(), False, None)
    assert info.value.code is Code.UNAVAILABLE and info.value.reason == "front_full"
    front.finish(first, "image", b"{}")
    assert front.accept(Sink(), False, None).id != second.id


def test_no_orchestrator_process_fails_fast():
    front, state, _ = make_front()
    state["pid"], state["alive"] = None, set()
    with pytest.raises(ServingError, match="orchestrator is restarting"):
        front.accept(Sink(), False, None)


def test_exactly_one_final_answer_whoever_comes_first():
    front, _, _ = make_front()
    sink = Sink()
    inflight = front.accept(sink, True, None)
    front.relay(inflight, "progress", [1, 4])
    front.fail(inflight, ServingError("first"))
    front.finish(inflight, "image", b"{}")
    front.relay(inflight, "progress", [2, 4])
    assert sink.events == [("progress", [1, 4]), ("fail", Code.INTERNAL, "first")]
    assert front.inflight == 0


def test_progress_reaches_only_streaming_clients():
    front, _, _ = make_front()
    sink = Sink()
    front.relay(front.accept(sink, False, None), "progress", [1, 4])
    assert sink.events == []


def test_a_dead_orchestrator_fails_its_requests_with_unavailable():
    front, state, _ = make_front()
    sinks = [Sink(), Sink()]
    for sink in sinks:
        front.accept(sink, False, None)
    state["alive"] = set()
    front.sweep()
    assert [s.events for s in sinks] == [[("fail", Code.UNAVAILABLE,
                                           "orchestrator stopped while serving the request; retry it")]] * 2
    assert front.abandoned == 2 and front.inflight == 0
    state["pid"], state["alive"] = 8, {8}  # the supervisor reloaded it: new requests go to the new process
    assert front.accept(Sink(), False, None).orchestrator == 8


def test_a_client_that_left_is_answered_and_its_work_cancelled():
    front, state, clock = make_front(cancel_check_s=0.5)
    sink = Sink()
    inflight = front.accept(sink, True, None)
    sink.cancelled = True
    front.sweep()  # the first check is due at once: the orchestrator is told to stop the work
    assert state["cancelled"] == [inflight.id]
    front.fail(inflight, ServingError("the orchestrator's answer", code=Code.CANCELLED))
    assert sink.events == [("fail", Code.CANCELLED, "cancelled by the client")]  # the front's reason


def test_is_cancelled_is_polled_at_most_every_cancel_check_s():
    front, _, clock = make_front(cancel_check_s=0.5)
    calls = []
    sink = Sink()
    sink.is_cancelled = lambda: calls.append(clock.now) or False
    front.accept(sink, False, None)
    for step in range(10):
        clock.now = 100.0 + step * 0.1
        front.sweep()
    assert calls == [100.0, 100.5]


def test_the_requests_own_timeout_cancels_it():
    front, state, clock = make_front()
    sink = Sink()
    inflight = front.accept(sink, False, timeout_s=2.0)
    clock.now += 1.9
    front.sweep()
    assert sink.events == []
    clock.now += 0.2
    front.sweep()
    assert state["cancelled"] == [inflight.id]
    clock.now += front.cancel_grace_s  # no answer from the orchestrator: the front answers itself
    front.sweep()
    assert sink.events == [("fail", Code.CANCELLED, "the request's timeout passed before it finished")]


def test_answers_from_the_orchestrator_reach_their_request_with_their_code():
    front, _, _ = make_front(unary=False)
    sink, other = Sink(), Sink()
    inflight = front.accept(sink, True, None)
    front.accept(other, True, None)
    dispatch(front, {"id": inflight.id, "kind": "progress", "value": [1, 4]})
    dispatch(front, {"id": inflight.id, "kind": "fail",
                     "error": {"code": "UNAVAILABLE", "reason": "slo", "message": "slo_ms 10 cannot be met"}})
    dispatch(front, {"id": inflight.id, "kind": "finish", "image": "late", "metadata": b"{}"})  # no one to tell
    dispatch(front, {"id": "unknown", "kind": "finish", "image": "x", "metadata": b"{}"})
    assert sink.events == [("progress", [1, 4]), ("fail", Code.UNAVAILABLE, "slo_ms 10 cannot be met")]
    assert other.events == [] and front.inflight == 1


def test_a_cancelled_request_is_answered_by_the_orchestrator_or_after_the_grace():
    front, state, clock = make_front(unary=False, cancel_grace_s=10.0)
    sink = Sink()
    inflight = front.accept(sink, True, None)
    sink.cancelled = True
    front.sweep()  # the front asks the orchestrator to stop it and waits for its answer
    assert state["cancelled"] == [inflight.id] and sink.events == []
    dispatch(front, {"id": inflight.id, "kind": "fail",
                     "error": {"code": "CANCELLED", "reason": "cancelled", "message": "cancelled by the client"}})
    assert sink.events == [("fail", Code.CANCELLED, "cancelled by the client")]
    silent = Sink()
    front.accept(silent, True, timeout_s=1.0)
    clock.now += 1.5  # its timeout passed; the orchestrator never answers the cancellation
    front.sweep()
    assert silent.events == []
    clock.now += 10.0
    front.sweep()
    assert silent.events == [("fail", Code.CANCELLED, "the request's timeout passed before it finished")]
