"""Step-level scheduler: every iteration it decides which requests join, which advance one UNet
step together, and which decode. It never touches tensors (the engine does)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .request import RequestState, Status


class QueueFull(RuntimeError):
    """The waiting queue is at capacity; maps to UNAVAILABLE."""


@dataclass
class Plan:
    encode: list[RequestState] = field(default_factory=list)
    denoise: list[list[RequestState]] = field(default_factory=list)  # each list is one UNet call
    decode: list[RequestState] = field(default_factory=list)
    cancelled: list[RequestState] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.encode or self.denoise or self.decode or self.cancelled)


class StepScheduler:
    """FCFS admission into a bounded running set; all running requests advance every iteration,
    grouped by bucket (model, height, width) into UNet calls of at most `max_batch` rows."""

    def __init__(self, max_active: int = 8, max_queue: int = 64, max_batch: int = 16):
        self.max_active, self.max_queue, self.max_batch = max_active, max_queue, max_batch
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []

    def add(self, state: RequestState) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} waiting); retry later")
        self.waiting.append(state)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        plan = Plan()
        # 1. Cancelled requests leave at this step boundary and free their slot.
        for queue in (self.waiting, self.running):
            for state in [s for s in queue if s.sink.is_cancelled()]:
                queue.remove(state)
                plan.cancelled.append(state)
        # 2. Join: waiting requests take free slots (FCFS).
        while self.waiting and len(self.running) < self.max_active:
            state = self.waiting.popleft()
            self.running.append(state)
            plan.encode.append(state)
        # 3. Advance: every denoising request takes one step, batched per bucket.
        buckets: dict[tuple, list[RequestState]] = {}
        for state in self.running:
            if state.status is Status.DENOISING and state.steps_done < state.steps_target:
                buckets.setdefault(state.bucket, []).append(state)
        for members in buckets.values():
            batch, rows = [], 0
            for state in members:
                if batch and rows + state.unet_rows > self.max_batch:
                    plan.denoise.append(batch)
                    batch, rows = [], 0
                batch.append(state)
                rows += state.unet_rows
            plan.denoise.append(batch)
        # 4. Decode: requests whose steps are done.
        plan.decode = [s for s in self.running
                       if s.status is Status.DENOISING and s.steps_done >= s.steps_target]
        return plan

    def release(self, state: RequestState) -> None:
        """A finished or failed request leaves the running set."""
        if state in self.running:
            self.running.remove(state)
