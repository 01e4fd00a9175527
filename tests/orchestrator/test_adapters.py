"""LoRA residency in plain Python: the LRU over slots with pins, requests that wait for their adapters while
loads run on the loader thread, cancellation and failures of waiting requests, the per-row slot indices an
executor sends, and the `lora` request field's validation."""

import json
import threading

import numpy as np
import pytest

from triffusion.orchestrator.adapters import AdapterCache, AdapterExecutor, AdapterResidency, RegisteredAdapters
from triffusion.orchestrator.errors import Code, QueueFull, ServingError
from triffusion.orchestrator.params import InvalidRequest, Limits, parse_params
from triffusion.orchestrator.request import RequestState

LIMITS = Limits(adapters=("a", "b", "c"), max_lora=2)


# ---- the LRU ---------------------------------------------------------------------------------------
def test_cache_evicts_the_least_recently_used_unpinned_adapter():
    cache = AdapterCache(2)
    assert cache.reserve("a") == 1 and cache.reserve("b") == 2
    cache.touch("a")  # b is now the least recently used
    assert cache.reserve("c") == 2 and cache.slot_of("b") is None and cache.evictions == 1
    cache.pin("a")
    cache.pin("c")
    assert cache.reserve("d") is None  # every slot pinned: nothing is evicted
    cache.unpin("c")
    assert cache.reserve("d") == 2 and cache.resident() == ["a", "d"]


def test_pins_count_per_request():
    cache = AdapterCache(1)
    cache.reserve("a")
    cache.pin("a")
    cache.pin("a")
    cache.unpin("a")
    assert cache.reserve("b") is None  # one request still holds it
    cache.unpin("a")
    assert cache.reserve("b") == 1


# ---- residency -------------------------------------------------------------------------------------
class Sink:
    def __init__(self):
        self.failed = None
        self.answered = threading.Event()

    def fail(self, error):
        self.failed = error
        self.answered.set()


def state(request_id, lora=(), slo_ms=None, received=None):
    params = parse_params({"prompt": "x", "lora": ",".join(f"{n}:{s}" for n, s in lora),
                           **({"slo_ms": slo_ms} if slo_ms else {})}, LIMITS)
    return RequestState(request_id=request_id, params=params, sink=Sink(), input_ids=None, received=received)


class Loader:
    """Loads that finish when the test says so (one event per adapter name)."""

    def __init__(self, fail=()):
        self.gates = {}
        self.started = []
        self.fail = set(fail)
        self.lock = threading.Lock()

    def gate(self, name):
        with self.lock:
            return self.gates.setdefault(name, threading.Event())

    def __call__(self, name):
        self.started.append(name)
        assert self.gate(name).wait(10)
        if name in self.fail:
            raise OSError("unreadable")
        return f"weights:{name}"


class Observer:
    def __init__(self):
        self.events = []

    def adapter(self, event, value):
        self.events.append((event, value))


def residency(slots=2, fail=()):
    loader, installed, submitted = Loader(fail), {}, []
    done = threading.Condition()

    def submit(s):
        with done:
            submitted.append(s)
            done.notify_all()

    def install(slot, weights):
        installed[slot] = weights

    observer = Observer()
    res = AdapterResidency(AdapterCache(slots), loader, install, submit, observer=observer)
    return res, loader, installed, submitted, done, observer


def wait_for(condition, predicate):
    with condition:
        assert condition.wait_for(predicate, timeout=10)


def test_a_request_waits_for_its_adapters_and_the_others_go_on():
    res, loader, installed, submitted, done, observer = residency()
    waiting = state("w", [("a", 0.5), ("b", 1.0)])
    res.admit(waiting)
    plain = state("p")
    res.admit(plain)  # no adapter: straight to the engine, not behind the load
    assert submitted == [plain] and waiting.adapter_cache == "miss"
    loader.gate("a").set()
    assert waiting not in submitted  # b still loading
    loader.gate("b").set()
    wait_for(done, lambda: waiting in submitted)
    assert sorted(installed.values()) == ["weights:a", "weights:b"]
    assert waiting.adapter_wait_s is not None and waiting.adapter_wait_s >= 0
    again = state("again", [("a", 1.0)])
    res.admit(again)  # resident now: a hit, submitted at once, no load
    assert submitted[-1] is again and again.adapter_cache == "hit" and loader.started.count("a") == 1
    stats = res.stats()
    assert stats["hits"] == 1 and stats["misses"] == 2 and stats["loads"] == 2
    assert ("miss", 2) in observer.events and ("hit", 1) in observer.events
    assert sum(1 for e, _ in observer.events if e == "load") == 2


def test_pinned_adapters_are_not_evicted_until_their_requests_leave():
    res, loader, installed, submitted, done, _ = residency(slots=1)
    for name in "ab":
        loader.gate(name).set()
    first = state("1", [("a", 1.0)])
    res.admit(first)
    wait_for(done, lambda: first in submitted)
    second = state("2", [("b", 1.0)])
    res.admit(second)  # its load finds the only slot pinned by the running request: it parks
    with done:
        assert not done.wait_for(lambda: second in submitted, timeout=0.2)
    assert res.cache.slot_of("a") == 1
    res.release([first])  # the first request left the engine
    wait_for(done, lambda: second in submitted)
    assert res.cache.resident() == ["b"] and res.cache.evictions == 1


def test_cancel_and_failed_loads_answer_only_the_waiting_requests():
    res, loader, _, submitted, done, _ = residency(fail=("b",))
    waiting = state("w", [("a", 1.0)])
    res.admit(waiting)
    assert res.cancel("w") and waiting.sink.failed.code is Code.CANCELLED
    assert not res.cancel("unknown")
    doomed = state("d", [("b", 1.0)])
    res.admit(doomed)
    loader.gate("b").set()
    loader.gate("a").set()
    assert doomed.sink.answered.wait(10)
    assert doomed.sink.failed.code is Code.INTERNAL and "adapter 'b'" in doomed.sink.failed.message
    assert doomed not in submitted and waiting not in submitted
    assert not res.cache.pinned("a") and not res.cache.pinned("b")


def test_a_refusal_by_the_engine_unpins_and_answers():
    res, loader, _, _, _, _ = residency()

    def refuse(s):
        raise QueueFull("queue is full")

    res.connect(refuse)
    loader.gate("a").set()
    now = state("n", [("a", 1.0)])
    res.admit(now)  # loads, then the engine refuses it on the loader thread: answered there
    assert now.sink.answered.wait(10) and now.sink.failed.reason == "queue_full"
    with pytest.raises(ServingError):  # resident now: refused at once, to the caller
        res.admit(state("m", [("a", 1.0)]))
    assert not res.cache.pinned("a")


def test_an_slo_shorter_than_the_expected_load_is_refused_at_once():
    res, _, _, _, _, _ = residency()
    res.expected_load_s = 5.0
    with pytest.raises(ServingError) as refused:
        res.admit(state("s", [("a", 1.0)], slo_ms=100, received=res.clock()))
    assert refused.value.code is Code.UNAVAILABLE and "must load first" in refused.value.message


def test_executor_sends_per_row_slots_and_scales():
    res, loader, _, submitted, done, _ = residency()
    for name in "ab":
        loader.gate(name).set()
    s = state("x", [("a", 0.5), ("b", -1.0)])
    res.admit(s)
    wait_for(done, lambda: s in submitted)

    class Runtime:
        def run(self, inputs):
            self.inputs = inputs
            return {"noise_pred": inputs["sample"]}

    runtime = Runtime()
    executor = AdapterExecutor(None, "unet", runtime, res, per_request=2)
    executor.denoise("unet", np.zeros((3, 4, 8, 8), np.float32), np.zeros(3, np.float32), np.zeros((3, 77, 32)),
                     adapters=[(), (("a", 0.5), ("b", -1.0)), (("b", 2.0),)])
    a, b = res.cache.slot_of("a"), res.cache.slot_of("b")
    assert runtime.inputs["adapter_slots"].tolist() == [[0, 0], [a, b], [b, 0]]
    assert runtime.inputs["adapter_scales"].tolist() == [[0, 0], [0.5, -1.0], [2.0, 0]]


# ---- the request field -----------------------------------------------------------------------------
def test_lora_field_parses_names_and_scales():
    params = parse_params({"prompt": "x", "lora": "a:0.8, b"}, LIMITS)
    assert params.lora == (("a", 0.8), ("b", 1.0))
    assert parse_params({"prompt": "x", "lora": [["a", 0.8]]}, LIMITS).lora == (("a", 0.8),)  # from a front
    assert parse_params({"prompt": "x", "lora": ""}, LIMITS).lora == ()


@pytest.mark.parametrize("value, message", [
    ("zzz:1", "lora: 'zzz' is not a registered adapter; allowed: a, b, c"),
    ("a:1,b:1,c:1", "lora: names 3 adapters; allowed: up to 2 of NAME:SCALE"),
    ("a:3", "lora: scale 3.0 of 'a' is out of range; allowed -2.0..2.0"),
    ("a:nan", "lora: scale nan of 'a' is out of range; allowed -2.0..2.0"),
    ("a:x", "lora: scale 'x' of 'a' is not a number"),
    ("a:1,a:0.5", "lora: names 'a' twice"),
    (":1", "lora: is malformed"),
    ("../../etc/passwd.safetensors:1", "lora: '../../etc/passwd.safetensors' is not a registered adapter"),
])
def test_bad_lora_values_name_the_field_and_range(value, message):
    with pytest.raises(InvalidRequest) as error:
        parse_params({"prompt": "x", "lora": value}, LIMITS)
    assert str(error.value).startswith(message)


def test_lora_on_a_server_without_adapters_or_another_unet_is_refused():
    with pytest.raises(InvalidRequest, match="lora: is not served"):
        parse_params({"prompt": "x", "lora": "a:1"}, Limits())
    with pytest.raises(InvalidRequest, match="lora: applies to unet 'default' only"):
        parse_params({"prompt": "x", "lora": "a:1", "unet": "lite"}, Limits(adapters=("a",), max_lora=1,
                                                                                unets=("default", "lite")))


# ---- the registry section ----------------------------------------------------------------------------
@pytest.mark.parametrize("lora, message", [
    ({"max_per_request": 0}, "families.t.lora.max_per_request: 0 is out of range; allowed 1..8"),
    ({"cache": 4}, "families.t.lora.cache: unknown key; allowed: adapters, cache_mib, convs, max_per_request, max_rank"),
    ({"convs": "yes"}, "families.t.lora.convs: expected true or false"),
    ({"adapters": {"a": "a.bin"}}, "families.t.lora.adapters.a: expected a .safetensors file (no pickle)"),
    ({"adapters": {"a:b": "a.safetensors"}}, "families.t.lora.adapters.a:b: an adapter name is 1..64 of letters"),
])
def test_registry_lora_section_is_checked(lora, message):
    from triffusion.orchestrator.registry import RegistryError, parse_registry

    with pytest.raises(RegistryError) as error:
        parse_registry({"families": {"t": {"variants": {"h": {"preset": "tiny"}}, "lora": lora}}})
    assert str(error.value).startswith(message)
    ok = parse_registry({"families": {"t": {"variants": {"h": {"preset": "tiny"}},
                                            "lora": {"max_per_request": 2, "adapters": {"a": "a.safetensors"}}}}})
    assert ok.families["t"].lora["adapters"] == {"a": "a.safetensors"}


def test_lora_with_a_controlnet_is_refused_by_name_unless_the_controlled_unet_has_the_slots():
    limits = Limits(adapters=("a",), max_lora=1, controlnets=("canny",))
    image = np.zeros((64, 64, 3), np.uint8)
    request = {"prompt": "x", "lora": "a:1", "controlnet": "canny", "control_image": image}
    with pytest.raises(InvalidRequest, match="lora: is not served together with controlnet on this server"):
        parse_params(request, limits)
    both = parse_params(request, Limits(adapters=("a",), max_lora=1, controlnets=("canny",), lora_with_controlnet=True))
    assert both.lora == (("a", 1.0),) and both.controlnet == "canny"


def test_the_adapter_executor_sends_controlled_rows_with_their_adapters_to_the_controlled_runtime():
    class Runtime:
        def __init__(self):
            self.calls = []

        def run(self, inputs):
            self.calls.append(inputs)
            return {"noise_pred": inputs["sample"]}

    class Base:
        def denoise(self, model, *args, **extra):
            return ("base", model)

    res = AdapterResidency(AdapterCache(2), None, None)
    res.cache.reserve("a")
    plain, controlled = Runtime(), Runtime()
    executor = AdapterExecutor(Base(), "unet", plain, res, per_request=1, controlled=("unet_control", controlled))
    sample, residuals = np.zeros((2, 4, 8, 8), np.float32), np.ones((2, 5), np.float32)
    executor.denoise("unet_control", sample, np.zeros(2), np.zeros((2, 77, 8)), adapters=[(("a", 0.5),), ()],
                     residuals=residuals)
    call, = controlled.calls
    assert not plain.calls and call["residuals"] is residuals
    assert call["adapter_slots"].tolist() == [[1], [0]] and call["adapter_scales"].tolist() == [[0.5], [0.0]]
    assert executor.denoise("unet_light", sample, None, None) == ("base", "unet_light")


# ---- adapters registered while serving (add-lora on a served repository) ---------------------------
def test_a_replaced_adapter_is_loaded_again_once_no_request_holds_the_old_copy():
    res, loader, installed, submitted, done, _ = residency(slots=2)
    loader.gate("a").set()
    running = state("1", [("a", 1.0)])
    res.admit(running)
    wait_for(done, lambda: running in submitted)
    res.invalidate({"a"})  # add-lora --force a: the running request keeps the copy it runs with
    assert res.cache.slot_of("a") is not None and loader.started.count("a") == 1
    res.release([running])
    after = state("2", [("a", 1.0)])
    res.admit(after)  # nothing holds the old copy: this one waits for the new file
    assert after.adapter_cache == "miss"
    wait_for(done, lambda: after in submitted)
    assert loader.started.count("a") == 2


def test_registered_adapters_follow_the_pipeline_file(tmp_path):
    path = tmp_path / "pipeline.json"
    entries = {"a": {"file": "adapters/a.safetensors", "sha256": "1"}}
    path.write_text(json.dumps({"lora": {"adapters": entries}}))
    changes = []
    registered = RegisteredAdapters(path, LIMITS, entries, on_change=lambda e, r: changes.append((e, r)))
    unchanged = registered.limits()
    assert unchanged is LIMITS and registered.limits() is unchanged and not changes  # a stat, no read
    grown = {"a": {"file": "adapters/a.safetensors", "sha256": "2"}, "zz": {"file": "adapters/zz.safetensors"}}
    path.write_text(json.dumps({"lora": {"adapters": grown}}))
    limits = registered.limits()
    assert "zz" in limits.adapters and "a" in limits.adapters and changes == [(grown, {"a"})]
    assert parse_params({"prompt": "x", "lora": "zz:0.5"}, limits).lora == (("zz", 0.5),)
    path.write_text("{ half a file")  # never written so (add-lora replaces it whole), but never fatal
    assert registered.limits() is limits and len(changes) == 1
