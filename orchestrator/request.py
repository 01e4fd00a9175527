"""Request state: one class with a status enum and progress counters (steps_done catches up to
steps_target), plus the sink through which results leave the engine. No tensors live here: the runner
keeps each request's sampler and embeddings, the scheduler only numbers and decisions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from .params import GenerationParams


class Status(enum.Enum):
    QUEUED = "queued"
    ENCODING = "encoding"
    DENOISING = "denoising"
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def done(self) -> bool:
        return self in (Status.FINISHED, Status.FAILED, Status.CANCELLED, Status.REJECTED)


class Sink(Protocol):
    """Where one request's progress and result go (a Triton response sender in production). The engine
    calls `finish` or `fail` exactly once per request; a sink may raise, the engine contains it."""

    def progress(self, step: int, steps: int) -> None: ...
    def preview(self, image) -> None: ...
    def finish(self, image, metadata: dict) -> None: ...
    def fail(self, error) -> None: ...


@dataclass(eq=False)
class RequestState:
    request_id: str
    params: GenerationParams
    sink: Sink
    input_ids: Any  # (2, 77) int64 with CFG (negative first), else (1, 77)
    status: Status = Status.QUEUED
    model: str = "unet"  # the UNet (Triton model name) this request is running on now
    steps_done: int = 0
    steps_target: int = 0  # sampler evaluations to run; set once encoded, lowered by an early stop
    evaluations: int = 0  # the sampler's evaluations for the requested steps (a sampler may evaluate twice a step)
    times: dict[str, float] = field(default_factory=dict)  # status -> clock time it was entered
    error: Any = None  # the ServingError it ended with
    received: float | None = None  # clock time the request reached the server (its front), if known
    arrival: float = 0.0  # clock time its SLO counts from: `received`, else submission
    seq: int = 0  # submission order, the tie-breaker of every policy
    requested_steps: int | None = None  # what the client asked for, when the server served fewer
    stopper: Any = None  # step_mode "auto": decides when the latent has settled
    predicted_finish: float | None = None  # admission's forecast of its finish (clock time)
    forecast_s: float | None = None  # admission's unbiased forecast of its remaining time (the bias learns from it)
    forecast_at: float | None = None  # when admission made it
    quality_steps: int = 0  # the fewest steps that reach the request's quality floor on its model (0: none)
    last_step_pending: bool = False  # the next evaluation jumps to the clean sample
    early_stop: bool = False  # it ended with a last step before its target
    cascade: bool = False  # runs on the light model first; the gate decides whether the heavy one redoes it
    escalated: bool = False  # the gate sent it to the heavy model
    gate_score: float | None = None
    gate_error: str | None = None  # the gate failed; the light answer was kept
    escalation_skipped: bool = False  # the gate asked for the heavy model, too late to meet the deadline
    answered: bool = False  # its one final answer went to the sink
    cancel_requested: bool = False  # the client went away; it leaves at the next step boundary
    adapter_cache: str | None = None  # LoRA: "hit" (its adapters were resident) or "miss" (it waited for a load)
    adapter_wait_s: float | None = None  # LoRA: time it waited for its adapters to load
    adapter_pinned: bool = False  # LoRA: its adapters are pinned in the cache (released when it leaves)

    def arrived(self, now: float) -> float:
        """When its SLO started counting, on the engine's clock at `now`: when its front received it (never
        after `now`), else `now`."""
        return now if self.received is None else min(self.received, now)

    @property
    def deadline(self) -> float | None:
        slo = self.params.slo_ms
        return None if slo is None else self.arrival + slo / 1000.0

    @property
    def priority(self) -> int:
        return self.params.priority

    @property
    def encoded(self) -> bool:
        return self.steps_target > 0

    @property
    def steps_left(self) -> int:
        return (self.steps_target - self.steps_done) if self.encoded else self.params.steps

    @property
    def remaining_work(self) -> float:
        """UNet rows x steps x pixels still to compute: the SRPT key."""
        return self.steps_left * self.unet_rows * self.params.height * self.params.width

    @property
    def slo_met(self) -> bool | None:
        if self.deadline is None or Status.FINISHED.value not in self.times:
            return None
        return self.times[Status.FINISHED.value] <= self.deadline

    @property
    def bucket(self) -> tuple[str, int, int]:
        """Requests in the same bucket can share one UNet call."""
        return (self.model, self.params.height, self.params.width)

    @property
    def unet_rows(self) -> int:
        return 2 if self.params.uses_cfg else 1

    def enter(self, status: Status, now: float) -> None:
        self.status = status
        self.times[status.value] = now
