"""Step-level scheduler: every iteration it decides which requests join, which advance one UNet step
together, which decode and which the quality gate scores; then it applies what the runner measured
(`update_from_output`): steps done, early stops from an entropy number, cascade routing from a gate
score, failures, releases, and what the latency predictor learns. It never touches a tensor.

Admission control: a request with `slo_ms` is admitted only if the latency predictor says it finishes
in time at the current load without pushing an admitted request past its deadline; otherwise it is
served with fewer steps (when `min_steps` or step_mode "auto" allows it) or rejected at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cascade import CascadeRouter, Decision, LoadController, Option
from .errors import Cancelled, QueueFull, Rejected, ServingError
from .patches import PatchGrid
from .policies import FCFS, Policy
from .predictor import LatencyPredictor
from .request import RequestState, Status
from .stepping import EntropyStop

__all__ = ["Cascade", "Plan", "QueueFull", "Rejected", "RunnerOutput", "StepScheduler", "Update"]

SIDE_STAGES = ("encode", "decode", "gate")  # what the runner runs beside the UNet calls (its side thread)


@dataclass
class Plan:
    """What one engine iteration does. The runner executes it; the lists are disjoint by stage."""

    encode: list[RequestState] = field(default_factory=list)
    denoise: list[list[RequestState]] = field(default_factory=list)  # each list is one UNet call
    patched: list[list[RequestState]] = field(default_factory=list)  # one UNet call over patches of mixed sizes
    decode: list[RequestState] = field(default_factory=list)
    gate: list[RequestState] = field(default_factory=list)  # decoded light answers the gate scores
    restart: list[RequestState] = field(default_factory=list)  # escalated: a fresh sampler on the heavy UNet
    entropy: list[RequestState] = field(default_factory=list)  # step_mode auto: measure after stepping
    previews: list[RequestState] = field(default_factory=list)  # a preview after this step
    cancelled: list[RequestState] = field(default_factory=list)
    decision: Decision | None = None  # the cascade controller decided anew at this iteration

    @property
    def empty(self) -> bool:
        return not (self.encode or self.denoise or self.patched or self.decode or self.cancelled)

    @property
    def stepped(self) -> list[RequestState]:
        return [s for batch in self.denoise + self.patched for s in batch]

    @property
    def requests(self) -> list[RequestState]:
        return self.encode + self.stepped + self.decode


@dataclass
class RunnerOutput:
    """What the runner measured and made for one plan, per request; a request in `errors` failed alone."""

    encoded: dict[RequestState, int] = field(default_factory=dict)  # sampler evaluations to run
    stepped: dict[RequestState, float | None] = field(default_factory=dict)  # the latent's entropy when asked
    images: dict[RequestState, Any] = field(default_factory=dict)  # (H, W, 3) uint8
    scores: dict[RequestState, float] = field(default_factory=dict)  # quality-gate scores
    gate_errors: dict[RequestState, str] = field(default_factory=dict)
    previews: dict[RequestState, Any] = field(default_factory=dict)
    errors: dict[RequestState, ServingError] = field(default_factory=dict)
    unet_calls: list[tuple[tuple, int, float]] = field(default_factory=list)  # (bucket, rows, seconds)
    stages: list[tuple[str, int, float]] = field(default_factory=list)  # ("encode", rows | "decode", pixels, s)
    denoise_s: float = 0.0  # the denoising part of the iteration
    iteration_s: float = 0.0  # the whole plan, side stages included (the engine measures it)


@dataclass
class Update:
    """What changed for the clients: the engine sends these through the sinks."""

    finished: list[RequestState] = field(default_factory=list)
    failed: list[RequestState] = field(default_factory=list)  # each with .error
    progress: list[RequestState] = field(default_factory=list)
    previews: list[RequestState] = field(default_factory=list)
    routed: list[RequestState] = field(default_factory=list)  # cascade answers the gate routed


@dataclass(frozen=True)
class Cascade:
    light: str
    heavy: str


class StepScheduler:
    """Admission into a bounded running set in policy order; every running request advances every
    iteration, grouped by bucket (model, height, width) into UNet calls of at most `max_batch` rows."""

    def __init__(self, max_active: int = 8, max_queue: int = 64, max_batch: int = 16,
                 policy: Policy | None = None, predictor: LatencyPredictor | None = None,
                 hybrid: str = "bucket", patch_grid: PatchGrid | None = None, latent_scale: int = 8,
                 max_patch_rows: int | None = None, cascade: Cascade | None = None, threshold: float = 0.5,
                 controller: LoadController | None = None, entropy: dict[str, dict] | None = None,
                 step_profiles: dict | None = None, admission: bool = True, auto_steps: bool = True,
                 cascade_routing: bool = True, headroom: float = 0.0):
        if hybrid not in ("bucket", "patch", "auto"):
            raise ValueError(f"unknown hybrid mode '{hybrid}'; choose one of: bucket, patch, auto")
        if hybrid != "bucket" and patch_grid is None:
            raise ValueError(f"hybrid mode '{hybrid}' needs a patch grid")
        self.max_active, self.max_queue, self.max_batch = max_active, max_queue, max_batch
        self.policy = policy or FCFS()
        self.predictor = predictor or LatencyPredictor()
        self.hybrid, self.patch_grid, self.latent_scale = hybrid, patch_grid, latent_scale
        self.max_patch_rows = max_patch_rows or 4 * max_batch
        # Cascades: the router's threshold and the step budget are the controller's to change.
        self.cascade = cascade
        self.router = CascadeRouter(threshold) if cascade else None
        self.controller = controller if cascade else None
        self.step_budget: int | None = None
        # Whether light answers go to the gate: not while the operating point in force escalates none (at peak
        # load the controller's cheapest option keeps every light answer; scoring them would be wasted work).
        self.gating = True
        self.entropy = entropy or {}  # model -> EntropyStop thresholds (step_mode "auto")
        self.step_profiles = step_profiles or {}  # model -> StepProfile (quality and time against steps)
        # Feature switches (on in service; the SLO benchmark's ablations turn one off at a time):
        self.admission = admission  # SLO admission control and degradation to meet an SLO
        self.headroom = headroom  # admission plans each request to finish this fraction of its SLO early
        self.auto_steps = auto_steps  # step_mode auto: entropy stop and the quality floor's step choice
        self.cascade_routing = cascade_routing  # cascade requests start light; off: they run on the heavy model
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []
        self._restart: list[RequestState] = []
        self._seq = 0
        self.closed: ServingError | None = None  # set when draining or dead: new requests are refused
        # Measured / predicted time of the denoising part of engine iterations (EWMA): what the
        # UNet-only prediction misses (sampler updates, Python, a side stage competing for the same
        # cores) scales admission. Encode and decode are excluded: they are predicted on their own.
        self.iteration_scale = 1.0
        # Of an iteration with side stages (encode, decode, the gate: the runner's side thread) beside its UNet
        # calls, how much of the shorter of the two did not overlap the longer (EWMA of such iterations): the
        # iteration lasts max(unet, side) + side_share * min(unet, side). 0 where the side stages run beside the
        # UNet (a GPU and a free core); 0.25-0.34 measured on the 2-core CPU host, whose cores the UNet, the
        # VAE, the text encoder and the fronts all share (perf/results/cpu-tiny/slo_proof.json: the full
        # system's calibration.side_share).
        self.side_share = 0.0
        # Measured / forecast latency of finished requests, per service level (EWMA): what the forecast's
        # structure misses (requests that arrive later and overtake a waiting one under EDF, encode and
        # decode on the shared cores) scales every forecast duration of that level.
        self.forecast_bias: dict[str, float] = {}
        # step_mode auto: the fraction of its evaluations a request of (model, service level) ran before the
        # entropy stop ended it (EWMA of finished ones). The forecast plays auto requests forward with the
        # expected stop, not the requested steps: a slot frees when the request stops, not at its target.
        self.stop_fraction: dict[tuple[str, str], float] = {}

    # ---- intake ----------------------------------------------------------------------------
    def add(self, state: RequestState, now: float) -> None:
        """Queue a request or raise a ServingError at once (closed, queue full, SLO infeasible)."""
        arrival = state.arrived(now)
        if self.controller is not None:  # demand counts every arrival, served or not, when its front received it
            self.controller.observe_arrival(arrival)
        if self.closed is not None:
            raise self.closed
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} waiting); retry later")
        self._seq += 1
        state.arrival = arrival
        state.seq = self._seq
        if state.cascade and (not self.cascade_routing or self.cascade is None):
            state.cascade = False
            if self.cascade is not None:
                state.model = self.cascade.heavy
        if not self.auto_steps:
            state.params.step_mode = "fixed"
        state.quality_steps = self._quality_steps(state)
        if state.cascade and self.step_budget and state.params.steps > self.step_budget:
            self._serve_steps(state, max(self.step_budget, min(state.quality_steps, state.params.steps)))
        if state.deadline is not None and self.admission:
            self._admit_within_slo(state, now)
        state.enter(Status.QUEUED, now)
        self.waiting.append(state)

    @staticmethod
    def _serve_steps(state: RequestState, steps: int) -> None:
        """Serve fewer steps than asked; the metadata keeps what the client asked for."""
        if state.requested_steps is None:
            state.requested_steps = state.params.steps
        state.params.steps = steps
        if state.params.min_steps is not None:
            state.params.min_steps = min(state.params.min_steps, steps)

    def _quality_steps(self, state: RequestState) -> int:
        """The fewest steps that reach the request's quality floor on its model's step-quality profile (0 when it
        has no floor or the model no profile; the requested steps when even the profile's most fall short)."""
        profile = self.step_profiles.get(state.model)
        if state.params.min_quality is None or profile is None or not self.auto_steps:
            return 0
        steps = profile.min_steps_for(state.params.min_quality)
        return state.params.steps if steps is None else min(steps, state.params.steps)

    def _admit_within_slo(self, state: RequestState, now: float) -> None:
        """Admit with the most steps (down to the floor) that the forecast finishes by the deadline without
        making an admitted request late; else reject at once with the reason."""
        params = state.params
        floor = params.min_steps or (1 if params.step_mode == "auto" else params.steps)
        floor = max(floor, min(state.quality_steps, params.steps))  # never below the quality floor
        before = self.finish_times(now)

        def verdict(steps: int):
            finish = self.finish_times(now, state, steps)
            victims = [s for s, t in finish.items() if s is not state and self._harmed(s, t, before)]
            return finish[state], victims[0] if victims else None

        finish, victim = verdict(params.steps)
        if finish <= self._due(state) and victim is None:
            self._admitted(state, now, finish)
            return
        # The floor next: under overload most newcomers fail it, and then a rejection costs two forecasts under
        # the lock, not a bisection's worth.
        best = None
        if floor < params.steps:
            finish, victim = verdict(floor)
            if finish <= self._due(state) and victim is None:
                best, best_finish = floor, finish
        if best is not None:
            low, high = floor + 1, params.steps - 1  # finish time and harm fall with fewer steps
            while low <= high:
                mid = (low + high) // 2
                finish_mid, victim_mid = verdict(mid)
                if finish_mid <= self._due(state) and victim_mid is None:
                    best, best_finish, low = mid, finish_mid, mid + 1
                else:
                    high = mid - 1
            self._serve_steps(state, best)
            self._admitted(state, now, best_finish)
            return
        if victim is not None:
            raise Rejected(f"admitting it would make request {victim.request_id} miss its SLO")
        need_ms = (finish - now) * 1000.0
        raise Rejected(f"slo_ms {params.slo_ms} cannot be met at the current load: "
                       f"predicted {need_ms:.0f} ms with {floor} steps")

    def _admitted(self, state: RequestState, now: float, finish: float) -> None:
        """Keep what admission forecast: the biased finish (reported) and the raw duration (to learn from; the
        biased one is its level's bias times it)."""
        state.predicted_finish, state.forecast_at = finish, now
        state.forecast_s = (finish - now) / self.forecast_bias.get(self._level(state), 1.0)

    def _due(self, state: RequestState) -> float:
        """When admission plans `state` to be done: its deadline less the headroom."""
        return state.deadline - self.headroom * (state.params.slo_ms or 0) / 1000.0

    def _harmed(self, state: RequestState, finish: float, before: dict) -> bool:
        """Whether new work that moves `state`'s forecast finish from before[state] to `finish` harms it: it ends
        past its planned finish (deadline less headroom) where it did not before. One already past it is
        protected too: new work may use the rest of its slack, but not push it past its deadline by more than
        a sliver (2% of its SLO: a batch neighbour's slowdown); if work could overtake it once it looked late,
        it would starve behind every later, tighter arrival."""
        if state.deadline is None or finish <= self._due(state):
            return False
        previous = before.get(state)
        if previous is None or previous <= self._due(state):
            return True
        # Already past its planned finish: new work may use what is left of its slack, not push it past its
        # deadline by more than the sliver.
        return finish > state.deadline and finish - max(previous, state.deadline) > 0.02 * (state.params.slo_ms or 0) / 1000.0

    def cancel(self, request_id: str) -> bool:
        """The client went away: the request leaves at the next step boundary. False if unknown."""
        for state in self.waiting + self.running:
            if state.request_id == request_id:
                state.cancel_requested = True
                return True
        return False

    def close(self, error: ServingError) -> None:
        """Refuse new requests with `error` (draining, or the engine cannot serve)."""
        self.closed = error

    def drain_all(self) -> list[RequestState]:
        """Remove every request (the engine answers each); used at shutdown and when the loop cannot go on."""
        states = self.waiting + self.running
        self.waiting, self.running, self._restart = [], [], []
        return states

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

    def observe_side(self, states, seconds: float, side: float, alpha: float = 0.1) -> None:
        """An iteration in which `states` advanced one step while side stages took `side` seconds (their calls,
        measured) took `seconds`: learn how much of the side stages and UNet calls did not overlap."""
        unet = self.iteration_time(states) * self.iteration_scale
        if unet <= 0 or side <= 0 or seconds <= 0:
            return
        share = min(max((seconds - max(unet, side)) / min(unet, side), 0.0), 1.0)
        self.side_share = (1 - alpha) * self.side_share + alpha * share

    @staticmethod
    def _level(state: RequestState) -> str:
        return state.params.slo_class or f"priority {state.params.priority}"

    def observe_finish(self, state: RequestState, now: float, alpha: float = 0.2) -> None:
        """A request admitted with a forecast finished `now`: learn its level's forecast bias."""
        if state.forecast_s is None or state.forecast_at is None or state.params.slo_ms is None:
            return
        # Short forecasts are dominated by fixed costs the forecast leaves out (the iteration in progress, the
        # answer's way out), which a scale would carry over to long ones: learn only where admission is tight.
        if state.forecast_s < 0.25 * state.params.slo_ms / 1000.0:
            return
        ratio = min(max((now - state.forecast_at) / state.forecast_s, 0.5), 4.0)
        level = self._level(state)
        self.forecast_bias[level] = (1 - alpha) * self.forecast_bias.get(level, 1.0) + alpha * ratio

    def finish_times(self, now: float, extra: RequestState | None = None, extra_steps: int | None = None) -> dict:
        """`forecast`, each remaining duration scaled by its request's level bias (what admission relies on)."""
        raw = self.forecast(now, extra, extra_steps)
        return {s: now + (t - now) * self.forecast_bias.get(self._level(s), 1.0) for s, t in raw.items()}

    def _decode_time(self, state: RequestState) -> float:
        return self.predictor.decode(state.params.height * state.params.width)

    def forecast(self, now: float, extra: RequestState | None = None, extra_steps: int | None = None) -> dict:
        """Predicted finish time of every request (and of `extra`, with `extra_steps`, as if admitted now), by
        playing the step-level schedule forward: running requests hold their slots, waiting ones take free
        slots in policy order, every iteration advances all of them by one step at the predicted time of
        that iteration's batches (measured/predicted scale included). The side stages hold the loop too: a
        joining request spends one iteration being encoded, finished ones are decoded (and a cascade's light
        answers scored) during the next one, and an iteration lasts as long as the longer of the two plus the
        measured share of the shorter that does not overlap it (`side_share`)."""
        active = [[s, self._expected_left(s) + (0 if s.encoded else 1)] for s in self.running]
        queue = self.waiting if extra is None else self.waiting + [extra]
        queue = self.policy.order(queue, now)
        # + 1: the encode iteration
        remaining = lambda s: self._expected_steps(s, extra_steps if s is extra else s.params.steps) + 1
        finish, t = {}, now
        side = self._encode_time([s for s, _ in active if not s.encoded])
        while active or queue:
            joined = []
            while queue and len(active) < self.max_active:
                s = queue.pop(0)
                active.append([s, remaining(s)])
                joined.append(s)
            side += self._encode_time(joined)
            k = min(rem for _, rem in active)
            iteration = self.iteration_time([s for s, _ in active]) * self.iteration_scale
            t += k * iteration + max(0.0, side - iteration) + self.side_share * min(side, iteration)
            done = []
            for entry in active:
                entry[1] -= k
                if entry[1] <= 0:
                    done.append(entry[0])
            active = [entry for entry in active if entry[1] > 0]
            side = self._answer_time(done)
            for s in done:
                finish[s] = t + side
        return finish

    def _expected_steps(self, state: RequestState, steps: int) -> int:
        """The evaluations a request asking for `steps` is expected to run: all of them, or for step_mode auto
        its level's measured stop fraction of them (never below its quality floor)."""
        if state.params.step_mode != "auto":
            return steps
        fraction = self.stop_fraction.get((state.model, self._level(state)))
        if fraction is None:
            return steps
        return min(steps, max(1, state.quality_steps, round(fraction * steps)))

    def _expected_left(self, state: RequestState) -> int:
        """The evaluations a running request is expected still to run. One that ran past its expected stop
        without stopping is expected to run to its target."""
        if not state.encoded:
            return self._expected_steps(state, state.params.steps)
        left = self._expected_steps(state, state.steps_target) - state.steps_done
        return left if left > 0 else state.steps_left

    def _observe_stop(self, state: RequestState, alpha: float = 0.1) -> None:
        if state.params.step_mode != "auto" or not state.evaluations:
            return
        key = (state.model, self._level(state))
        fraction = min(1.0, state.steps_done / state.evaluations)
        self.stop_fraction[key] = (1 - alpha) * self.stop_fraction.get(key, 1.0) + alpha * fraction

    def _encode_time(self, states) -> float:
        rows = sum(s.unet_rows for s in states)
        return self.predictor.encode(rows) if rows else 0.0

    def _answer_time(self, states) -> float:
        """The side stages of requests that finished together: VAE batches per size, then the gate's."""
        sizes: dict[int, int] = {}
        for s in states:
            pixels = s.params.height * s.params.width
            sizes[pixels] = sizes.get(pixels, 0) + 1
        total = sum(self.predictor.decode(n * pixels) for pixels, n in sizes.items())
        light = sum(1 for s in states if s.cascade and self.cascade is not None and s.model == self.cascade.light)
        return total + (self.predictor.gate(light) if light and self.gating else 0.0)

    # ---- iteration -------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float) -> Plan:
        plan = Plan(decision=self._control(now))
        # 1. Cancelled requests leave at this step boundary and free their slot.
        for queue in (self.waiting, self.running):
            for state in [s for s in queue if s.cancel_requested]:
                queue.remove(state)
                plan.cancelled.append(state)
        # 2. Join: waiting requests take free slots in policy order.
        free = self.max_active - len(self.running)
        if free > 0 and self.waiting:
            for state in self.policy.order(self.waiting, now)[:free]:
                self.waiting.remove(state)
                self.running.append(state)
                state.enter(Status.ENCODING, now)
                plan.encode.append(state)
        # 3. Escalated requests start over on the heavy model (a fresh sampler, the same noise).
        plan.restart, self._restart = [s for s in self._restart if s in self.running], []
        # 4. Advance: every denoising request takes one step, batched per bucket, urgent ones first.
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
        for state in plan.stepped:
            if state.stopper is not None and not state.last_step_pending:
                plan.entropy.append(state)
            every, after = state.params.preview_every, state.steps_done + 1
            if state.params.stream and every and after % every == 0 and after < state.steps_target:
                plan.previews.append(state)
        # 5. Decode: requests whose steps are done; the gate scores the light model's answers.
        plan.decode = [s for s in self.running if s.status is Status.DENOISING and s.steps_done >= s.steps_target]
        for state in plan.decode:
            state.enter(Status.DECODING, now)
            if state.cascade and not state.escalated and self.gating:
                plan.gate.append(state)
        return plan

    def update_from_output(self, plan: Plan, output: RunnerOutput, now: float) -> Update:
        """Apply the runner's results to the request states; returns what the clients must be told."""
        update = Update()
        # 1. Cancelled and failed requests end here.
        for state in plan.cancelled:
            self._end(state, Status.CANCELLED, Cancelled("cancelled by the client"), now, update)
        for state, error in output.errors.items():
            if not state.status.done:
                self._end(state, Status.FAILED, error, now, update)
        # 2. Encoded requests know how many evaluations their sampler runs.
        for state, evaluations in output.encoded.items():
            if state.status.done:
                continue
            state.steps_target = state.evaluations = evaluations
            if state.params.step_mode == "auto":
                state.stopper = EntropyStop(**self.entropy.get(state.model, {}), min_steps=state.quality_steps)
            state.enter(Status.DENOISING, now)
        # 3. Stepped requests advance; an early stop is decided from the entropy the runner measured.
        for state, entropy in output.stepped.items():
            if state.status.done:
                continue
            state.steps_done += 1
            if state.last_step_pending:  # that evaluation landed on the clean sample
                state.steps_target, state.early_stop = state.steps_done, True
            elif (entropy is not None and state.stopper is not None and state.steps_done < state.steps_target - 1
                  and state.stopper.observe(entropy, state.steps_done, state.steps_target)):
                state.last_step_pending = True
            if state.params.stream:
                update.progress.append(state)
                if state in output.previews:
                    update.previews.append(state)
        # 4. Decoded requests finish, unless the gate sends a light answer to the heavy model.
        for state in plan.decode:
            if state.status.done or state not in output.images:
                continue
            if state in plan.gate:
                state.gate_score = output.scores.get(state)
                state.gate_error = output.gate_errors.get(state)
                update.routed.append(state)
                if state.gate_score is not None and self.router.route(state.gate_score) == "heavy":
                    if self._heavy_in_time(state, now):
                        self._escalate(state, now)
                        continue
                    # The heavy redo cannot finish before the deadline: the light answer, on time, beats a
                    # better one that is late (the metadata says the escalation was skipped).
                    state.escalation_skipped = True
            self._end(state, Status.FINISHED, None, now, update)
        # 5. The predictor learns from every call the runner timed.
        for (model, h, w), rows, seconds in output.unet_calls:
            self.predictor.observe_unet(model, h, w, rows, seconds)
        for stage, size, seconds in output.stages:
            self.predictor.observe_stage(stage, size, seconds)
        # The admission scale learns from whole iterations without side stages (those the forecast times on
        # their own): what the UNet-only prediction misses (sampler updates, Python, the answers' sending).
        stepped = [s for s in plan.stepped if s in output.stepped]
        seconds = max(output.iteration_s, output.denoise_s)
        if stepped and seconds > 0:
            if not (plan.encode or plan.decode or plan.gate):
                self.observe_iteration(stepped, seconds)
            else:  # how far the side stages overlapped the UNet calls
                self.observe_side(stepped, seconds, sum(t for stage, _, t in output.stages if stage in SIDE_STAGES))
        return update

    def _heavy_in_time(self, state: RequestState, now: float) -> bool:
        """Whether the heavy model can redo the request before its deadline without making any admitted
        request late: the escalation is work admission did not plan, so it must fit like a newcomer."""
        before = self.finish_times(now)
        saved = state.model, state.steps_done, state.steps_target
        state.model, state.steps_done, state.steps_target = self.cascade.heavy, 0, state.evaluations
        try:
            after = self.finish_times(now)
        finally:
            state.model, state.steps_done, state.steps_target = saved
        if state.deadline is not None and after[state] > self._due(state):
            return False
        return not any(s is not state and self._harmed(s, t, before) for s, t in after.items())

    def _escalate(self, state: RequestState, now: float) -> None:
        """Redo the request on the heavy model: it keeps its slot, its deadline, its text embeddings (the
        variants share the text encoder) and its seed, and starts from the same noise."""
        state.escalated, state.model = True, self.cascade.heavy
        state.steps_done, state.last_step_pending, state.early_stop = 0, False, False
        state.steps_target = state.evaluations  # an early stop on the light model shortened it
        if state.stopper is not None:
            state.quality_steps = self._quality_steps(state)
            state.stopper = EntropyStop(**self.entropy.get(state.model, {}), min_steps=state.quality_steps)
        state.enter(Status.DENOISING, now)
        self._restart.append(state)

    def _end(self, state: RequestState, status: Status, error: ServingError | None, now: float,
             update: Update) -> None:
        if status is Status.FINISHED:
            self.observe_finish(state, now)
            self._observe_stop(state)
        state.error = error
        state.enter(status, now)
        self.release(state)
        (update.finished if status is Status.FINISHED else update.failed).append(state)

    def _control(self, now: float) -> Decision | None:
        """Apply the load-adaptive controller's decision, when it makes one (every interval)."""
        if self.controller is None:
            return None
        decision = self.controller.decide(now)
        if decision is not None:
            self.apply_option(decision.option)
        return decision

    def apply_option(self, option: Option) -> None:
        """Put a cascade operating point in force: the gate's threshold, the step budget and whether the gate
        runs at all (an option that escalates nothing keeps every light answer unscored)."""
        self.router.threshold, self.step_budget = option.threshold, option.steps
        self.gating = option.escalation > 0

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
