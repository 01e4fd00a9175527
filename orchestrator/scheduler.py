"""Step-level scheduler: every iteration it decides which requests join, which advance one UNet
step together, and which decode. It never touches tensors (the engine does).

Admission control: a request with `slo_ms` is admitted only if the latency predictor says it finishes
in time at the current load without pushing an admitted request past its deadline; otherwise it is
served with fewer steps (when `min_steps` or step_mode "auto" allows it) or rejected at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from .patches import PatchGrid
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
    patched: list[list[RequestState]] = field(default_factory=list)  # one UNet call over patches of mixed sizes
    decode: list[RequestState] = field(default_factory=list)
    cancelled: list[RequestState] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.encode or self.denoise or self.patched or self.decode or self.cancelled)


class StepScheduler:
    """Admission into a bounded running set in policy order; every running request advances every
    iteration, grouped by bucket (model, height, width) into UNet calls of at most `max_batch` rows."""

    def __init__(self, max_active: int = 8, max_queue: int = 64, max_batch: int = 16,
                 policy: Policy | None = None, predictor: LatencyPredictor | None = None,
                 hybrid: str = "bucket", patch_grid: PatchGrid | None = None, latent_scale: int = 8,
                 max_patch_rows: int | None = None):
        if hybrid not in ("bucket", "patch", "auto"):
            raise ValueError(f"unknown hybrid mode '{hybrid}'; choose one of: bucket, patch, auto")
        if hybrid != "bucket" and patch_grid is None:
            raise ValueError(f"hybrid mode '{hybrid}' needs a patch grid")
        self.max_active, self.max_queue, self.max_batch = max_active, max_queue, max_batch
        self.policy = policy or FCFS()
        self.predictor = predictor or LatencyPredictor()
        self.hybrid, self.patch_grid, self.latent_scale = hybrid, patch_grid, latent_scale
        self.max_patch_rows = max_patch_rows or 4 * max_batch
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []
        self._seq = 0
        # Measured / predicted time of the denoising part of engine iterations (EWMA): what the
        # UNet-only prediction misses (sampler updates, Python, a side stage competing for the same
        # cores) scales admission. Encode and decode are excluded: they are predicted on their own.
        self.iteration_scale = 1.0

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

    def observe_iteration(self, states, seconds: float, alpha: float = 0.2) -> None:
        """The denoising part of an engine iteration in which `states` advanced one step took `seconds`."""
        predicted = self.iteration_time(states)
        if predicted > 0 and seconds > 0:
            ratio = min(max(seconds / predicted, 0.5), 5.0)  # one stall must not close admission
            self.iteration_scale = (1 - alpha) * self.iteration_scale + alpha * ratio

    def _decode_time(self, state: RequestState) -> float:
        return self.predictor.decode(state.params.height * state.params.width)

    def predict_admission(self, state: RequestState, now: float, steps: int):
        """(predicted finish time of `state` with `steps`, an admitted request it would make late or None)."""
        ahead = [s for s in self.waiting if self.policy.key(s, now) < self.policy.key(state, now)]
        active = self.running + ahead + [state]
        # It runs alongside at most max_active requests: those admitted just before it.
        t_iter = self.iteration_time(active[-self.max_active:]) * self.iteration_scale
        # With every slot taken it waits for the work ahead of it (fluid approximation over the slots).
        wait = 0.0
        if len(active) > self.max_active:
            work = sum(s.steps_left * t_iter + self._decode_time(s) for s in self.running)
            work += sum(self.predictor.encode(s.unet_rows) + s.params.steps * t_iter + self._decode_time(s)
                        for s in ahead)
            wait = work / self.max_active
        finish = now + wait + self.predictor.encode(state.unet_rows) + steps * t_iter + self._decode_time(state)
        before = self.iteration_time(self.running) * self.iteration_scale if self.running else 0.0
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
        for model, members in self._by_model(buckets).items():
            if self._patch_is_cheaper(model, members):
                plan.patched.extend(self._chunks(sum(members.values(), []), self.max_patch_rows, self._tile_rows))
            else:
                for group in members.values():
                    plan.denoise.extend(self._chunks(group, self.max_batch, lambda s: s.unet_rows))
        # 4. Decode: requests whose steps are done.
        plan.decode = [s for s in self.running
                       if s.status is Status.DENOISING and s.steps_done >= s.steps_target]
        return plan

    # ---- hybrid-resolution planning ---------------------------------------------------------
    @staticmethod
    def _by_model(buckets: dict) -> dict[str, dict[tuple, list[RequestState]]]:
        models: dict[str, dict[tuple, list[RequestState]]] = {}
        for bucket, members in buckets.items():
            models.setdefault(bucket[0], {})[bucket] = members
        return models

    @staticmethod
    def _chunks(items, limit: int, size) -> list[list]:
        """Consecutive groups whose summed size stays within `limit` (a single oversize item stands alone)."""
        chunks, batch, rows = [], [], 0
        for item in items:
            if batch and rows + size(item) > limit:
                chunks.append(batch)
                batch, rows = [], 0
            batch.append(item)
            rows += size(item)
        if batch:
            chunks.append(batch)
        return chunks

    def _tile_rows(self, state: RequestState) -> int:
        p = state.params
        return state.unet_rows * self.patch_grid.count(p.height // self.latent_scale, p.width // self.latent_scale)

    def _patch_is_cheaper(self, model: str, members: dict[tuple, list[RequestState]]) -> bool:
        """Patches pay for their halos; they win when they merge buckets that would run as small batches."""
        if self.hybrid == "bucket" or (self.hybrid == "auto" and len(members) < 2):
            return False
        grid, scale = self.patch_grid, self.latent_scale
        if not all(grid.fits(h // scale, w // scale) for _, h, w in members):
            return False
        if self.hybrid == "patch":
            return True
        bucket_cost = sum(self.predictor.unet_step(model, h, w, rows)
                          for (_, h, w), group in members.items()
                          for rows in self._chunk_rows([s.unet_rows for s in group], self.max_batch))
        tile_px = grid.tile * scale
        tile_rows = [self._tile_rows(s) for group in members.values() for s in group]
        patch_cost = sum(self.predictor.unet_step(model, tile_px, tile_px, rows)
                         for rows in self._chunk_rows(tile_rows, self.max_patch_rows))
        return patch_cost < bucket_cost

    @classmethod
    def _chunk_rows(cls, sizes: list[int], limit: int) -> list[int]:
        return [sum(chunk) for chunk in cls._chunks(sizes, limit, lambda size: size)]

    def release(self, state: RequestState) -> None:
        """A finished, failed or cancelled request leaves the scheduler."""
        for queue in (self.running, self.waiting):
            if state in queue:
                queue.remove(state)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

