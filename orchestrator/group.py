"""One orchestrator, many devices: an engine per device (its own scheduler, runner, executor and loop thread)
behind one intake that places every request by load (orchestrator.placement). The group answers the
engine's interface (submit, cancel, health, profile, drain, stop, start, clock), so the Triton adapter and
the fronts do not know how many devices there are.

Why one orchestrator with an engine per device rather than one orchestrator instance per GPU (Triton
instance groups): placement by predicted finish needs every device's scheduler state at the moment a
request arrives, and a request one device's admission refuses can still be admitted on another; with
separate instances the fronts would place blind (Triton's instance dispatch does not see our queues,
and our requests reach the orchestrator over a socket, not through Triton). The cost is one Python
interpreter (one GIL) for all loops: `perf.multi_device` measures how throughput scales with devices
whose step time is spent outside the GIL, as a GPU's is."""

from __future__ import annotations

import copy
import math
import threading

from .errors import ServingError, ShuttingDown
from .placement import DeviceView, Placement, candidates, create_placement, split_roles
from .request import RequestState, Status


class _KeepRejections:
    """An engine's observer inside a group: a refusal is not final there (another device may take the
    request), so the group reports it once, when no device took it."""

    def __init__(self, observer, group):
        self._observer, self._group = observer, group

    def queue_depth(self, depth):  # the group's, not one device's
        self._observer.queue_depth(sum(len(e.scheduler.waiting) for e in self._group.engines))

    def request_done(self, state):
        if state.status is not Status.REJECTED:
            self._observer.request_done(state)

    def __getattr__(self, name):
        return getattr(self._observer, name)


class EngineGroup:
    def __init__(self, engines: list, placement: str | Placement = "least_finish", controller=None):
        if not engines:
            raise ValueError("engines: none; a group needs at least one device")
        self.engines = list(engines)
        self.placement = create_placement(placement) if isinstance(placement, str) else placement
        self.observer = self.engines[0].observer
        for engine in self.engines:
            engine.observer = _KeepRejections(engine.observer, self)
        self.controller = controller  # the cascade's split over the devices (light and heavy GPU counts)
        self.roles = ["any"] * len(self.engines)
        self.model, self.clock = self.engines[0].model, self.engines[0].clock
        self._lock = threading.Lock()  # placement decisions one at a time, so two arrivals see each other
        self.placed = [0] * len(self.engines)

    @property
    def scheduler(self):
        """The first device's scheduler (its cascade and router describe every device's)."""
        return self.engines[0].scheduler

    # ---- placement -------------------------------------------------------------------------------
    def views(self, state: RequestState, now: float) -> list[DeviceView]:
        """Each device's load and the finish its scheduler forecasts for `state` (not yet added anywhere)."""
        views = []
        for i, engine in enumerate(self.engines):
            with engine._cv:
                scheduler = engine.scheduler
                closed = scheduler.closed is not None
                seconds = math.inf
                if not closed:
                    probe = copy.copy(state)
                    probe.arrival = state.arrived(now)
                    probe.seq = scheduler._seq + 1
                    seconds = scheduler.finish_times(now, probe, state.params.steps).get(probe, math.inf) - now
                views.append(DeviceView(i, len(scheduler.waiting), len(scheduler.running), seconds, closed,
                                        self.roles[i]))
        return views

    def _role(self, state: RequestState) -> str | None:
        cascade = self.scheduler.cascade
        if cascade is None or all(r == "any" for r in self.roles):
            return None
        if state.cascade or state.model == cascade.light:
            return "light"
        return "heavy" if state.model == cascade.heavy else None

    def _split(self, now: float, arrival: float) -> None:
        if self.controller is None:
            return
        self.controller.observe_arrival(arrival)
        decision = self.controller.decide(now)
        if decision is not None:
            self.roles = split_roles(len(self.engines), min(decision.light_gpus, len(self.engines)),
                                     min(decision.heavy_gpus, len(self.engines) - min(decision.light_gpus,
                                                                                      len(self.engines))))

    # ---- the engine's interface ------------------------------------------------------------------
    def submit(self, state: RequestState) -> None:
        """Queue the request on the best device that admits it; raises the last refusal if none does."""
        with self._lock:
            now = self.clock()
            self._split(now, state.arrived(now))
            order = candidates(self.views(state, now), self.placement, self._role(state))
            arrived = copy.copy(state)
            arrived.params = copy.copy(state.params)
            error: ServingError | None = None
            for attempt, index in enumerate(order):
                if attempt:  # the request as it arrived: a refusal may have changed its steps or route
                    state.__dict__.update(copy.copy(arrived).__dict__)
                    state.params, state.times = copy.copy(arrived.params), {}
                try:
                    self.engines[index].submit(state)
                except ServingError as exc:
                    error = exc
                    continue
                self.placed[index] += 1
                return
        error = error or ShuttingDown()
        state.error = error
        if not state.status.done:
            state.enter(Status.REJECTED, now)
        self.observer.request_done(state)
        raise error

    def cancel(self, request_id: str) -> bool:
        return any([engine.cancel(request_id) for engine in self.engines])

    def health(self) -> dict:
        parts = [engine.health() for engine in self.engines]
        broken = next((f"device {i}: {p['broken']}" for i, p in enumerate(parts) if p["broken"]), None)
        ages = [p["last_iteration_age_s"] for p in parts if p["last_iteration_age_s"] is not None]
        return {"ok": all(p["ok"] for p in parts), "broken": broken,
                "waiting": sum(p["waiting"] for p in parts), "running": sum(p["running"] for p in parts),
                "closed": all(p["closed"] for p in parts), "last_iteration_age_s": max(ages) if ages else None,
                "devices": parts, "placed": list(self.placed), "roles": list(self.roles)}

    def profile(self) -> dict:
        """The first device's learned latency model (profile.json's format), and every device's."""
        profiles = [engine.profile() for engine in self.engines]
        return {**profiles[0], "devices": profiles}

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    def drain(self) -> None:
        for engine in self.engines:
            engine.drain()

    def stop(self, grace_s: float = 0.0) -> None:
        """Every device drains for the same grace, at the same time."""
        threads = [threading.Thread(target=engine.stop, args=(grace_s,)) for engine in self.engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
