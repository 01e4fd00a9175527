"""Garbage-collector pauses in a served process.

A Python backend stub that imports torch, onnxruntime and scipy holds some 350,000 objects that live as long as
the process. CPython's cyclic collector scans all of them at every full (generation 2) collection: 130 ms on
a 2-core CI machine, with the GIL held, so the engine loop, admission and every answer (a rejection included) wait
for it. Under a burst, the allocations of many short requests trigger such collections. `settle` moves what
start-up made into the permanent generation (`gc.freeze`, as pre-fork servers do), so a full collection scans
only what serving has allocated since. `GcPauses` times each collection (`gc.callbacks`) for the orchestrator's
`heap` control op."""

from __future__ import annotations

import gc
import time


def settle() -> int:
    """Collect once, then freeze every object that survives (start-up's); the number frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Per generation: how many collections ran and the longest one (ms), since `install`. No lock: a collection
    can start inside any allocation, `report`'s own included, and its callback must never wait on a lock that
    thread already holds; collections run one at a time under the GIL, and a report may read a count and its
    longest pause one collection apart."""

    def __init__(self):
        self._started: float | None = None
        self.count = [0, 0, 0]
        self.longest_ms = [0.0, 0.0, 0.0]

    def install(self) -> "GcPauses":
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        # Runs inside the collection (the GIL held): no allocation-heavy work here.
        if phase == "start":
            self._started = time.perf_counter()
            return
        started, self._started = self._started, None
        if started is None:
            return
        generation = min(int(info.get("generation", 2)), 2)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self.count[generation] += 1
        self.longest_ms[generation] = max(self.longest_ms[generation], elapsed_ms)

    def report(self) -> dict:
        count, longest = list(self.count), list(self.longest_ms)
        return {"frozen": gc.get_freeze_count(), "collections": count, "longest_ms": [round(ms, 3) for ms in longest]}
