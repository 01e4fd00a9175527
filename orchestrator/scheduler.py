"""Step-level scheduler: every iteration it decides which requests join, which advance one UNet
step together, and which decode. It never touches tensors (the engine does).

Admission control: a request with `slo_ms` is admitted only if the latency predictor says it finishes
in time at the current load without pushing an admitted request past its deadline; otherwise it is
served with fewer steps (when `min_steps` or step_mode "auto" allows it) or rejected at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from .policies import FCFS, Policy
from .predictor import LatencyPredictor
from .request import RequestState, Status


class QueueFull(RuntimeError):
    """The waiting queue is at capacity; maps to UNAVAILABLE."""


class Rejected(RuntimeError):
    """The request's SLO cannot be met at the current load; maps to UNAVAILABLE."""


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
    """Admission into a bounded running set in policy order; every running request advances every
    iteration, grouped by bucket (model, height, width) into UNet calls of at most `max_batch` rows."""

    def __init__(self, max_active: int = 8, max_queue: int = 64, max_batch: int = 16,
                 policy: Policy | None = None, predictor: LatencyPredictor | None = None):
        self.max_active, self.max_queue, self.max_batch = max_active, max_queue, max_batch
        self.policy = policy or FCFS()
        self.predictor = predictor or LatencyPredictor()
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []
        self._seq = 0

    # ---- intake ----------------------------------------------------------------------------
    def add(self, state: RequestState, now: float) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} waiting); retry later")
        self._seq += 1
        state.arrival, state.seq = now, self._seq
        if state.deadline is not None:
            self._admit_within_slo(state, now)
        self.waiting.append(state)

    def _admit_within_slo(self, state: RequestState, now: float) -> None:
        params = state.params
        floor = params.min_steps or (1 if params.step_mode == "auto" else params.steps)
        for steps in range(params.steps, floor - 1, -1):
            finish, victim = self.predict_admission(state, now, steps)
            if victim is not None:
                raise Rejected(f"admitting it would make request {victim.request_id} miss its SLO")
            if finish <= state.deadline:
                if steps != params.steps:
                    state.degraded_from, params.steps = params.steps, steps
                return
        need_ms = (finish - now) * 1000.0
        raise Rejected(f"slo_ms {params.slo_ms} cannot be met at the current load: "
                       f"predicted {need_ms:.0f} ms with {floor} steps")

    # ---- prediction ------------------------------------------------------------------------
    def iteration_time(self, states) -> float:
        """Predicted time of one engine iteration in which `states` all advance one step."""
        rows: dict[tuple, int] = {}
        for s in states:
            rows[s.bucket] = rows.get(s.bucket, 0) + s.unet_rows
        total = 0.0
        for (model, h, w), n in rows.items():
            full, rest = divmod(n, self.max_batch)
            total += full * self.predictor.unet_step(model, h, w, self.max_batch)
            total += self.predictor.unet_step(model, h, w, rest)
        return total

    def _decode_time(self, state: RequestState) -> float:
        return self.predictor.decode(state.params.height * state.params.width)

    def predict_admission(self, state: RequestState, now: float, steps: int):
        """(predicted finish time of `state` with `steps`, an admitted request it would make late or None)."""
        ahead = [s for s in self.waiting if self.policy.key(s, now) < self.policy.key(state, now)]
        active = self.running + ahead + [state]
        # It runs alongside at most max_active requests: those admitted just before it.
        t_iter = self.iteration_time(active[-self.max_active:])
        # With every slot taken it waits for the work ahead of it (fluid approximation over the slots).
        wait = 0.0
        if len(active) > self.max_active:
            work = sum(s.steps_left * t_iter + self._decode_time(s) for s in self.running)
            work += sum(self.predictor.encode(s.unet_rows) + s.params.steps * t_iter + self._decode_time(s)
                        for s in ahead)
            wait = work / self.max_active
        finish = now + wait + self.predictor.encode(state.unet_rows) + steps * t_iter + self._decode_time(state)
        before = self.iteration_time(self.running) if self.running else 0.0
        for s in self.running:
            if s.deadline is None:
                continue
            late_now = now + s.steps_left * before + self._decode_time(s) > s.deadline
            late_after = now + s.steps_left * t_iter + self._decode_time(s) > s.deadline
            if late_after and not late_now:
                return finish, s
        return finish, None

    # ---- iteration -------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float) -> Plan:
        plan = Plan()
        # 1. Cancelled requests leave at this step boundary and free their slot.
        for queue in (self.waiting, self.running):
            for state in [s for s in queue if s.sink.is_cancelled()]:
                queue.remove(state)
                plan.cancelled.append(state)
        # 2. Join: waiting requests take free slots in policy order.
        free = self.max_active - len(self.running)
        if free > 0 and self.waiting:
            for state in self.policy.order(self.waiting, now)[:free]:
                self.waiting.remove(state)
                self.running.append(state)
                plan.encode.append(state)
        # 3. Advance: every denoising request takes one step, batched per bucket, urgent ones first.
        buckets: dict[tuple, list[RequestState]] = {}
        for state in self.policy.order(self.running, now):
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
        """A finished, failed or cancelled request leaves the scheduler."""
        for queue in (self.running, self.waiting):
            if state in queue:
                queue.remove(state)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

