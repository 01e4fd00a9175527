"""The supervisor's policy without a server: which models to reload, when to stop restarting, and that
seeing a death never waits on healing another."""

import threading
import time

from triffusion.supervisor import RestartPolicy, group_by_model, missing_stubs


def test_a_model_with_a_missing_stub_is_named_once():
    expected = group_by_model({"unet_0_0": 1, "text_to_image_0_0": 2, "text_to_image_0_1": 3, "unet_tiny_lite_0_0": 4})
    assert expected["text_to_image"] == {"text_to_image_0_0", "text_to_image_0_1"}
    running = {"unet_0_0": 1, "text_to_image_0_0": 2, "unet_tiny_lite_0_0": 9}  # a new pid is fine
    assert missing_stubs(expected, running) == ["text_to_image"]
    assert missing_stubs(expected, {}) == ["text_to_image", "unet", "unet_tiny_lite"]


def test_restarts_back_off_and_stop_after_the_limit_within_the_window():
    policy = RestartPolicy(limit=3, window_s=100.0, first_backoff_s=1.0, max_backoff_s=3.0)
    assert [policy.next_delay(t) for t in (0.0, 1.0, 2.0)] == [1.0, 2.0, 3.0]
    assert policy.next_delay(3.0) is None  # a fourth crash within 100 s: give up, let the service manager act
    assert policy.next_delay(150.0) == 1.0  # the window moved on


class _Process:
    pid = 1

    def poll(self):
        return None


class _Server:
    process = _Process()

    def remember_shm(self):
        pass


class _Admin:
    """Model control that records each call; a load of `slow` waits until released."""

    def __init__(self, slow: str):
        self.slow, self.calls, self.release = slow, [], threading.Event()

    def unload(self, model):
        self.calls.append(("unload", model))

    def load(self, model):
        self.calls.append(("load", model))
        if model == self.slow:
            assert self.release.wait(10)

    def control(self, message):
        return {}


def test_a_death_during_another_models_reload_is_unloaded_before_that_reload_ends(monkeypatch):
    from triffusion import procs
    from triffusion.supervisor import Supervisor

    running = {"gate_0_0": 10, "orchestrator_0_0": 11, "unet_0_0": 12}
    monkeypatch.setattr(procs, "stubs", lambda pid: dict(running))
    monkeypatch.setattr(procs, "stubs_of", lambda pid, model: {k: v for k, v in running.items()
                                                               if procs.model_of(k) == model})
    admin = _Admin(slow="gate")
    supervisor = Supervisor(_Server(), admin)
    supervisor.expected = group_by_model(running)
    del running["gate_0_0"]
    with supervisor.lock:
        supervisor.tick()  # the gate is missing: its reload starts, and its load waits
    _wait(lambda: ("load", "gate") in admin.calls)
    del running["orchestrator_0_0"]
    with supervisor.lock:
        supervisor.tick()  # the watch loop is not held up by the gate's load
        supervisor.tick()  # nor does it start the gate's reload twice
    _wait(lambda: ("load", "orchestrator") in admin.calls)
    assert admin.calls[:4] == [("unload", "gate"), ("load", "gate"), ("unload", "orchestrator"),
                               ("load", "orchestrator")]
    running.update({"gate_0_0": 20, "orchestrator_0_0": 21})
    admin.release.set()
    _wait(lambda: not supervisor._healing)
    assert supervisor.counts == {("reload", "gate"): 1, ("reload", "orchestrator"): 1}
    assert supervisor.expected["gate"] == {"gate_0_0"}
    with supervisor.lock:
        supervisor.tick()
    assert len(admin.calls) == 4  # healed: nothing more to do


def _wait(condition, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)  # the reloads run on the supervisor's own threads
