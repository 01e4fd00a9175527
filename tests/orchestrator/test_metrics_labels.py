"""MetricsObserver's series that the dashboards (deploy/monitoring) and the autoscaler (deploy/helm) read:
SLO attainment by SLO class and the steps each finished request ran."""

import threading
import time

from triffusion.orchestrator.metrics import NO_CLASS, STEPS_BUCKETS, MetricsObserver
from triffusion.orchestrator.params import GenerationParams
from triffusion.orchestrator.request import RequestState, Status


class Metric:
    def __init__(self, labels, buckets):
        self.labels, self.buckets, self.value, self.observed = labels, buckets, 0.0, []

    def increment(self, n):
        self.value += n

    def set(self, v):
        self.value = v

    def observe(self, v):
        self.observed.append(v)


class Family:
    made: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.kind, self.metrics = name, kind, []
        Family.made[name] = self

    def Metric(self, labels, buckets=None):
        metric = Metric(dict(labels), buckets)
        self.metrics.append(metric)
        return metric

    def series(self) -> dict:
        return {tuple(sorted(m.labels.items())): m for m in self.metrics}


def finished(slo_class, slo_met, steps_done, status=Status.FINISHED):
    params = GenerationParams(prompt="a", slo_ms=1000 if slo_met is not None else None, slo_class=slo_class)
    state = RequestState(request_id="r", params=params, sink=None, input_ids=None, status=status,
                         steps_done=steps_done, arrival=10.0)
    if status is Status.FINISHED:
        state.times["finished"] = 10.5 if slo_met else 11.5
    return state


def test_slo_attainment_and_steps_are_counted_per_slo_class():
    Family.made = {}
    observer = MetricsObserver(Family, "counter", "gauge", "histogram")
    slo, steps = Family.made["triffusion_slo_total"], Family.made["triffusion_request_steps"]
    assert steps.kind == "histogram"
    # Requests without a class are there from the start, at zero.
    assert {k: m.value for k, m in slo.series().items()} == {
        (("met", "true"), ("slo_class", NO_CLASS)): 0, (("met", "false"), ("slo_class", NO_CLASS)): 0}
    observer.request_done(finished("interactive", True, 8))
    observer.request_done(finished("interactive", False, 12))
    observer.request_done(finished("interactive", True, 6))
    observer.request_done(finished(None, True, 20))
    observer.request_done(finished("batch", None, 3, status=Status.CANCELLED))  # no SLO outcome, no steps
    series = {k: m.value for k, m in slo.series().items()}
    assert series[(("met", "true"), ("slo_class", "interactive"))] == 2
    assert series[(("met", "false"), ("slo_class", "interactive"))] == 1
    assert series[(("met", "true"), ("slo_class", NO_CLASS))] == 1
    assert not any(dict(k)["slo_class"] == "batch" for k in series)
    ran = {dict(k)["slo_class"]: m for k, m in steps.series().items()}
    assert set(ran) == {"interactive", NO_CLASS}
    assert ran["interactive"].observed == [8, 12, 6] and ran[NO_CLASS].observed == [20]
    assert ran["interactive"].buckets == STEPS_BUCKETS and STEPS_BUCKETS[-1] >= 100  # the steps range's top


class ReentryCheckingMetric(Metric):
    """A metric that, like the python backend's, gives up the GIL inside a call, and counts calls that
    overlapped another call on any metric (the backend frees the message of a metric's previous call)."""
    inside = None
    overlaps = 0

    def observe(self, v):
        if not ReentryCheckingMetric.inside.acquire(blocking=False):
            ReentryCheckingMetric.overlaps += 1
            return
        try:
            time.sleep(0)  # the GIL goes to another thread here, as in the backend's IPC
            self.observed.append(v)
        finally:
            ReentryCheckingMetric.inside.release()

    increment = set = observe


class ReentryCheckingFamily(Family):
    def Metric(self, labels, buckets=None):
        metric = ReentryCheckingMetric(dict(labels), buckets)
        self.metrics.append(metric)
        return metric


def test_metric_calls_from_several_threads_never_overlap_and_each_series_is_made_once():
    """Two device engines and the adapter loader call the observer on their own threads."""
    ReentryCheckingMetric.inside, ReentryCheckingMetric.overlaps = threading.Lock(), 0
    Family.made = {}
    observer = MetricsObserver(ReentryCheckingFamily, "counter", "gauge", "histogram")
    start = threading.Barrier(3)

    def engine():
        start.wait()
        for i in range(600):
            observer.unet_call(("unet", 64, 64), 1 + i % 7, 0.01)
            observer.adapter("load", 0.2)

    threads = [threading.Thread(target=engine) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert ReentryCheckingMetric.overlaps == 0
    calls = Family.made["triffusion_unet_call_seconds"]
    assert sorted(dict(k)["rows"] for k in calls.series()) == [str(r) for r in range(1, 8)]
    assert len(calls.metrics) == 7  # one series per row count, not one per thread that saw it first
    assert sum(len(m.observed) for m in calls.metrics) == 3 * 600
