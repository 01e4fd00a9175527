"""Engine observer that exports Prometheus metrics through any MetricFamily-like factory (the python
backend's pb_utils.MetricFamily in production). Names share the `triffusion_` prefix.

Every hook holds one lock. The python backend's `Metric.increment/observe` give up the GIL and then write
the metric's message into freshly allocated shared memory, freeing the previous one (python_backend
src/metric.cc, `SaveToSharedMemory`; unchanged on its main branch): two threads on one metric (two device
engines, the adapter loader, the control channel) let tritonserver read a freed message, and it aborts
with std::bad_alloc (measured on 2.51 with `devices: 2`). A metric made on first use is made once for the
same reason: a duplicate that is dropped deletes the series under the other."""

from __future__ import annotations

import functools
import threading

from .engine import Observer
from .request import RequestState, Status

BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
STEPS_BUCKETS = [1, 2, 4, 6, 8, 10, 15, 20, 25, 30, 40, 50, 75, 100]
NO_CLASS = "none"  # the slo_class label of a request that named no SLO class
SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


def _serialized(hook):
    @functools.wraps(hook)
    def locked(self, *args, **kwargs):
        with self._lock:
            return hook(self, *args, **kwargs)
    return locked


class MetricsObserver(Observer):
    def __init__(self, family, counter, gauge, histogram):
        """`family(name, description, kind)` returns an object with `Metric(labels, buckets=None)`."""
        self._lock = threading.Lock()  # see the module docstring: one metric call at a time
        # A family must outlive its metrics (the python backend deletes metrics of a dropped family).
        self._families = [
            family("triffusion_requests_total", "Requests by outcome", counter),
            family("triffusion_slo_total", "Finished requests with an SLO, by SLO class and whether it was met",
                   counter),
            family("triffusion_queue_depth", "Requests waiting for a slot", gauge),
            family("triffusion_unet_batch_rows", "UNet rows per GPU call", histogram),
            family("triffusion_stage_seconds", "Time per stage", histogram),
            family("triffusion_unet_call_seconds", "Time per UNet call, by rows in the call", histogram),
            family("triffusion_cascade_total", "Cascade answers by route (light kept, heavy redone)", counter),
            family("triffusion_cascade", "Cascade gate state: threshold, escalation rate, last score", gauge),
            family("triffusion_controller", "Load-adaptive controller: decision and its inputs", gauge),
            family("triffusion_failures_total", "Requests that ended with an error, by code and reason", counter),
            family("triffusion_supervisor_actions", "Reloads of a model and restarts of tritonserver the "
                   "supervisor made since it started", gauge),
            family("triffusion_engine_loop_errors_total", "Engine iterations that failed outside the runner", counter),
            family("triffusion_adapter_cache_total", "LoRA adapter cache lookups by a request (hit, miss) and "
                   "evictions", counter),
            family("triffusion_adapter_load_seconds", "Time to load a LoRA adapter into a slot (off the engine "
                   "thread)", histogram),
        ]
        (self._requests, self._slo, queue, batch, stage, self._call_family, routes, cascade,
         controller, self._failure_family, self._supervisor_family, loop_errors, adapters, adapter_loads) = self._families
        self._adapter_events = {event: adapters.Metric(labels={"event": event}) for event in ("hit", "miss", "eviction")}
        self._adapter_loads = adapter_loads.Metric(labels={}, buckets=SECONDS_BUCKETS)
        self._failures: dict[tuple, object] = {}
        self._supervisor: dict[tuple, object] = {}
        self._loop_errors = loop_errors.Metric(labels={})
        self._routes = {route: routes.Metric(labels={"route": route}) for route in ("light", "heavy")}
        self._cascade = {key: cascade.Metric(labels={"value": key})
                         for key in ("threshold", "escalation_rate", "last_score")}
        self._controller = {key: controller.Metric(labels={"value": key})
                            for key in ("demand_rps", "threshold", "steps", "light_gpus", "heavy_gpus",
                                        "light_share", "heavy_share", "overloaded", "expected_quality",
                                        "expected_escalation")}
        self._calls: dict[int, object] = {}  # rows -> histogram, made on first use
        self._queue = queue.Metric(labels={})
        self._batch = batch.Metric(labels={}, buckets=BATCH_BUCKETS)
        self._stage = {name: stage.Metric(labels={"stage": name}, buckets=SECONDS_BUCKETS)
                       for name in ("queue", "encode", "unet", "controlnet", "decode", "gate", "total")}
        self._outcomes = {status: self._requests.Metric(labels={"outcome": status.value})
                          for status in (Status.FINISHED, Status.FAILED, Status.CANCELLED, Status.REJECTED)}
        # (slo_class, met) -> counter, made on first use; requests without a class are always there.
        self._slo_met = {(NO_CLASS, met): self._slo.Metric(labels={"slo_class": NO_CLASS, "met": str(met).lower()})
                         for met in (True, False)}
        # Dashboards (deploy/monitoring): steps each finished request ran, by SLO class.
        self._steps_family = family("triffusion_request_steps", "Denoising steps a finished request ran, by SLO "
                                    "class (fewer than asked: step_mode=auto, an early stop, min_steps)", histogram)
        self._families.append(self._steps_family)
        self._steps: dict[str, object] = {}

    @_serialized
    def request_done(self, state: RequestState) -> None:
        self._outcomes[state.status].increment(1)
        if state.error is not None:
            key = (state.error.code.value, state.error.reason)
            if key not in self._failures:
                self._failures[key] = self._failure_family.Metric(labels={"code": key[0], "reason": key[1]})
            self._failures[key].increment(1)
        slo_class = state.params.slo_class or NO_CLASS
        if state.slo_met is not None:
            key = (slo_class, state.slo_met)
            if key not in self._slo_met:
                self._slo_met[key] = self._slo.Metric(labels={"slo_class": slo_class, "met": str(state.slo_met).lower()})
            self._slo_met[key].increment(1)
        if state.status is Status.FINISHED:
            if slo_class not in self._steps:
                self._steps[slo_class] = self._steps_family.Metric(labels={"slo_class": slo_class},
                                                                   buckets=STEPS_BUCKETS)
            self._steps[slo_class].observe(state.steps_done)
        t = state.times
        if "encoding" in t and "queued" in t:
            self._stage["queue"].observe(t["encoding"] - t["queued"])
        if "finished" in t and "queued" in t:
            self._stage["total"].observe(t["finished"] - t["queued"])

    @_serialized
    def unet_call(self, bucket, rows, seconds) -> None:
        self._batch.observe(rows)
        self._stage["unet"].observe(seconds)
        if rows not in self._calls:
            self._calls[rows] = self._call_family.Metric(labels={"rows": str(rows)}, buckets=SECONDS_BUCKETS)
        self._calls[rows].observe(seconds)

    @_serialized
    def stage(self, stage, seconds) -> None:
        self._stage[stage].observe(seconds)

    @_serialized
    def queue_depth(self, depth) -> None:
        self._queue.set(depth)

    @_serialized
    def cascade(self, state, router) -> None:
        self._routes["heavy" if state.escalated else "light"].increment(1)
        self._cascade["threshold"].set(router.threshold)
        self._cascade["escalation_rate"].set(router.escalation_rate)
        if state.gate_score is not None:
            self._cascade["last_score"].set(state.gate_score)

    @_serialized
    def decision(self, decision) -> None:
        option = decision.option
        values = {"demand_rps": decision.inputs.get("demand", 0.0), "threshold": option.threshold,
                  "steps": option.steps, "light_gpus": decision.light_gpus, "heavy_gpus": decision.heavy_gpus,
                  "light_share": decision.inputs.get("light_share", 0.0),
                  "heavy_share": decision.inputs.get("heavy_share", 0.0),
                  "overloaded": float(bool(decision.inputs.get("overloaded"))),
                  "expected_quality": option.quality, "expected_escalation": option.escalation}
        for key, value in values.items():
            self._controller[key].set(float(value))

    @_serialized
    def loop_error(self) -> None:
        self._loop_errors.increment(1)

    @_serialized
    def supervisor(self, events) -> None:
        for event in events:
            key = (str(event.get("action")), str(event.get("model")))
            if key not in self._supervisor:
                self._supervisor[key] = self._supervisor_family.Metric(labels={"action": key[0], "model": key[1]})
            self._supervisor[key].set(float(event.get("count", 0)))

    @_serialized
    def adapter(self, event, value) -> None:
        if event == "load":
            self._adapter_loads.observe(float(value))
        elif event in self._adapter_events:
            self._adapter_events[event].increment(int(value))
