"""Discrete-event simulator for scale planning (after DiffServe and SD-as-a-Service).

It replays an arrival trace on N simulated GPUs. Every GPU runs the server's own StepScheduler and
policy objects; one iteration makes the calls the Engine makes (sequential mode: encode of the joining
requests, VAE decode of the finished ones, then one UNet call per denoise batch) and lasts the sum of
their times from a measured latency profile. Admission, batching and ordering are the real code; only
the model calls are replaced by a clock.

Speed: a run of identical iterations (only denoising, nobody can join or finish) is one event. An arrival
in the middle of it first brings that GPU's request states up to date, so admission sees the progress it
would see iteration by iteration.

    python -m perf.simulator --profile build/model_repository/orchestrator/1/profile.json \\
        --gpus 1,2,4,8,16,32,64 --rates 0.1,0.2,0.4 --duration 3600 --steps 50 --sizes 512,768 \\
        --slo-ms 5000 --policy edf --out perf/results/simulator.json
    python -m perf.simulator --profile P.json --gpus 1 --validate measured.json --duration 60
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

from triffusion.orchestrator.params import STEP_MODES, GenerationParams
from triffusion.orchestrator.policies import POLICIES, create_policy
from triffusion.orchestrator.predictor import LatencyPredictor
from triffusion.orchestrator.request import RequestState, Status
from triffusion.orchestrator.scheduler import Plan, QueueFull, Rejected, StepScheduler

DISPATCH = ("least_loaded", "round_robin")
# Rejections are counted by the exception the scheduler raised (it carries no finer reason code).
REJECT_REASONS = ((QueueFull, "queue_full"), (Rejected, "rejected"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_json(path, what: str):
    """A JSON file; a missing or malformed one is one ValueError naming `what` and the path."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


# ---- latency model ----------------------------------------------------------------------------
def check_profile(profile) -> None:
    """A profile in LatencyPredictor.seed's format with every entry well formed; errors name the entry."""
    if not isinstance(profile, dict):
        raise ValueError("profile: expected an object with 'unet' and 'stages' lists")
    unet = profile.get("unet")
    if not isinstance(unet, list) or not unet:
        raise ValueError("profile.unet: missing or empty; expected [[model, height, width, rows, seconds], ...]")
    for i, row in enumerate(unet):
        if not (isinstance(row, list) and len(row) == 5 and isinstance(row[0], str) and row[0]
                and all(_is_int(v) and v > 0 for v in row[1:4]) and _is_num(row[4]) and row[4] > 0):
            raise ValueError(f"profile.unet[{i}]: {row!r} is not [model, height, width, rows, seconds] "
                             "with positive sizes and time")
    stages = profile.get("stages")
    if not isinstance(stages, list):
        raise ValueError("profile.stages: missing; expected [[stage, size, seconds], ...]")
    for i, row in enumerate(stages):
        if not (isinstance(row, list) and len(row) == 3 and row[0] in ("encode", "decode")
                and _is_int(row[1]) and row[1] > 0 and _is_num(row[2]) and row[2] >= 0):
            raise ValueError(f"profile.stages[{i}]: {row!r} is not [stage ('encode' or 'decode'), size, seconds]")
    for stage in ("encode", "decode"):
        if not any(row[0] == stage for row in stages):
            raise ValueError(f"profile.stages: no '{stage}' entry; without one its time would be a guess")


class LatencyModel:
    """Model call times from a measured profile, interpolated by the server's own LatencyPredictor
    (sizes in pixels, as profile.json and the scheduler's buckets use them), with optional noise."""

    def __init__(self, profile: dict, noise: float = 0.0, seed: int = 0):
        check_profile(profile)
        if not (_is_num(noise) and noise >= 0):
            raise ValueError(f"noise: {noise!r} is not allowed; allowed a log-normal sigma >= 0")
        self.profile = profile
        self._predictor = LatencyPredictor()
        self._predictor.seed(profile)
        self.models = frozenset(row[0] for row in profile["unet"])
        self.noise, self.seed = float(noise), seed

    @classmethod
    def from_file(cls, path, noise: float = 0.0, seed: int = 0) -> "LatencyModel":
        try:
            return cls(load_json(path, "profile"), noise, seed)
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if str(path) in message else f"{path}: {message}") from None

    def unet(self, model: str, height: int, width: int, rows: int) -> float:
        """One UNet call of `rows` rows at height x width pixels."""
        return self._predictor.unet_step(model, height, width, rows)

    def encode(self, rows: int) -> float:
        return self._predictor.encode(rows)

    def decode(self, pixels: int) -> float:
        """One VAE call over `pixels` image pixels (batch x height x width)."""
        return self._predictor.decode(pixels)

    def noise_stream(self) -> Callable[[float], float] | None:
        """A fresh seeded stream, seconds -> seconds x a log-normal factor of mean 1; None without noise.
        Fresh per replay, so replaying the same trace gives the same times."""
        if not self.noise:
            return None
        rng, sigma = random.Random(self.seed), self.noise
        mu = -sigma * sigma / 2
        return lambda seconds: seconds * rng.lognormvariate(mu, sigma)


# ---- requests and traces ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SimRequest:
    """One arrival of a trace: what the client asks for, plus two simulation-only knobs."""

    arrival: float  # seconds after the trace starts
    height: int = 512
    width: int = 512
    steps: int = 50
    slo_ms: float | None = None
    priority: int = 0
    step_mode: str = "fixed"
    model: str = "unet"  # the UNet's Triton model name, as the profile names it
    guidance_scale: float = 7.5
    min_steps: int | None = None
    escalate: bool | None = None  # cascade: True/False decides; None draws with the escalation rate
    steps_run: int | None = None  # UNet evaluations actually run (entropy early stop); None: all

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; allowed {allowed}")

        if not (_is_num(self.arrival) and self.arrival >= 0):
            bad("arrival", "seconds >= 0")
        for name in ("height", "width", "steps"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                bad(name, "an integer >= 1")
        if self.slo_ms is not None and not (_is_num(self.slo_ms) and self.slo_ms > 0):
            bad("slo_ms", "None or a number > 0")
        if not (_is_int(self.priority) and self.priority >= 0):
            bad("priority", "an integer >= 0")
        if self.step_mode not in STEP_MODES:
            bad("step_mode", ", ".join(STEP_MODES))
        if not (isinstance(self.model, str) and self.model):
            bad("model", "a model name from the profile")
        if not (_is_num(self.guidance_scale) and self.guidance_scale >= 0):
            bad("guidance_scale", "a number >= 0")
        if self.min_steps is not None and not (_is_int(self.min_steps) and 1 <= self.min_steps <= self.steps):
            bad("min_steps", f"None or 1..{self.steps}")
        if self.escalate is not None and not isinstance(self.escalate, bool):
            bad("escalate", "None, true or false")
        if self.steps_run is not None and not (_is_int(self.steps_run) and self.steps_run >= 1):
            bad("steps_run", "None or an integer >= 1")

    @classmethod
    def from_dict(cls, data: dict) -> "SimRequest":
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**data)


@dataclass(frozen=True)
class RequestMix:
    """What the requests of a synthetic trace ask for; each draws its square size and priority uniformly."""

    sizes: tuple[int, ...] = (512,)
    steps: int = 50
    slo_ms: float | None = 5000.0
    model: str = "unet"
    guidance_scale: float = 7.5
    priorities: tuple[int, ...] = (0,)
    step_mode: str = "fixed"
    min_steps: int | None = None

    def __post_init__(self):
        if not self.sizes:
            raise ValueError("sizes: empty; give at least one image size")
        if not self.priorities:
            raise ValueError("priorities: empty; give at least one priority level")

    def requests(self, arrivals: Iterable[float], seed=0) -> list[SimRequest]:
        rng = random.Random(seed)
        out = []
        for t in arrivals:
            size, priority = rng.choice(self.sizes), rng.choice(self.priorities)
            out.append(SimRequest(arrival=t, height=size, width=size, steps=self.steps, slo_ms=self.slo_ms,
                                  priority=priority, step_mode=self.step_mode, model=self.model,
                                  guidance_scale=self.guidance_scale, min_steps=self.min_steps))
        return out


def poisson_arrivals(rate: float, duration: float, seed=0) -> list[float]:
    """Arrival times of a Poisson process of `rate` per second over [0, duration)."""
    if not (_is_num(rate) and rate > 0):
        raise ValueError(f"rate: {rate!r} is not allowed; allowed requests per second > 0")
    if not (_is_num(duration) and duration > 0):
        raise ValueError(f"duration: {duration!r} is not allowed; allowed seconds > 0")
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration:
        arrivals.append(t)
        t += rng.expovariate(rate)
    return arrivals


def read_intervals(path) -> list[float]:
    """A --request-intervals file (perf_analyzer's format: one interval in microseconds a line), in seconds."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"request intervals {path}: cannot read ({exc.strerror or exc})") from None
    intervals = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        try:
            us = float(text)
        except ValueError:
            us = math.nan
        if not (math.isfinite(us) and us >= 0):
            raise ValueError(f"request intervals {path} line {number}: {text!r} is not an interval in "
                             "microseconds (a number >= 0)")
        intervals.append(us / 1e6)
    if not intervals:
        raise ValueError(f"request intervals {path}: no intervals; expected one interval in microseconds a line")
    return intervals


def arrivals_from_intervals(intervals: list[float], rate: float | None = None,
                            duration: float | None = None) -> list[float]:
    """Arrival times from inter-arrival intervals in seconds (the first request after the first interval).
    With `rate`, the trace is stretched in time to that mean rate, keeping its burstiness; with `duration`,
    it is repeated to fill that many seconds and cut there."""
    total = sum(intervals)
    if total <= 0:
        raise ValueError("request intervals: all zero; a trace needs some time between requests")
    scale = 1.0 if rate is None else (total / len(intervals)) * rate
    if rate is not None and not (_is_num(rate) and rate > 0):
        raise ValueError(f"rate: {rate!r} is not allowed; allowed requests per second > 0")
    arrivals, t = [], 0.0
    for interval in itertools.cycle(intervals) if duration is not None else intervals:
        t += interval / scale
        if duration is not None and t >= duration:
            break
        arrivals.append(t)
    return arrivals


# ---- simulation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CascadeSpec:
    """Light model first; a finished light answer is redone on the heavy model with probability
    `escalation_rate` (drawn per request from `seed` before the replay, or the request's own `escalate`).
    The heavy run keeps the original deadline: latency counts from the first arrival."""

    light_model: str
    heavy_model: str
    escalation_rate: float = 0.0
    seed: int = 0
    heavy_gpus: int = 0  # 0: every GPU serves both; n: the last n GPUs serve only the heavy model (DiffServe)

    def __post_init__(self):
        if self.light_model == self.heavy_model:
            raise ValueError(f"heavy_model: '{self.heavy_model}' is also the light model; a cascade needs two")
        if not (_is_num(self.escalation_rate) and 0 <= self.escalation_rate <= 1):
            raise ValueError(f"escalation_rate: {self.escalation_rate!r} is not allowed; allowed 0..1")
        if not (_is_int(self.heavy_gpus) and self.heavy_gpus >= 0):
            raise ValueError(f"heavy_gpus: {self.heavy_gpus!r} is not allowed; allowed an integer >= 0")


@dataclass(slots=True)
class SimRecord:
    """What happened to one request of the trace (index = its position in the input)."""

    index: int
    arrival: float
    slo_ms: float | None
    finish: float | None = None  # None: rejected
    model: str | None = None  # the model whose answer was returned
    steps: int = 0  # UNet evaluations behind the answer (after admission's degradation and early stop)
    rejected: str | None = None  # "queue_full" or "rejected"; "escalation_..." when the heavy re-queue was
    escalated: bool = False
    gpu: int | None = None  # the GPU that answered (or last took it)

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def met(self) -> bool:
        """Answered within its SLO; a request without one counts as met once answered."""
        if self.finish is None:
            return False
        return self.slo_ms is None or self.finish <= self.arrival + self.slo_ms / 1000.0


@dataclass
class SimResult:
    records: list[SimRecord]
    summary: dict

    def to_dict(self, records: bool = False) -> dict:
        out = {"summary": self.summary}
        if records:
            out["records"] = [asdict(r) for r in self.records]
        return out


class _Silent:
    """The simulator's sink: nothing leaves and nothing is ever cancelled."""

    def progress(self, step, steps): ...
    def preview(self, image): ...
    def finish(self, image, metadata): ...
    def fail(self, status, message): ...
    def is_cancelled(self): return False


_SINK = _Silent()
_ENCODED = object()  # stands in for the sampler: steps_left reads steps_target once a sampler exists


@dataclass(eq=False)
class _SimState(RequestState):
    """A RequestState the scheduler handles like any other, plus what the simulator tracks of it."""

    index: int = 0
    stop_at: int | None = None  # early stop: the evaluation after which steps_target drops to steps_done
    escalate: bool = False


def scheduler_factory(profile: dict | None, policy: str = "edf", max_active: int = 8, max_queue: int = 64,
                      max_batch: int = 16, **options) -> Callable[[], StepScheduler]:
    """Schedulers made the way config.build_engine makes the server's: each GPU gets its own predictor
    seeded from the profile (it then learns online) and its own policy object."""
    create_policy(policy)  # an unknown policy fails here, by name

    def make() -> StepScheduler:
        predictor = LatencyPredictor()
        if profile:
            predictor.seed(profile)
        return StepScheduler(max_active=max_active, max_queue=max_queue, max_batch=max_batch,
                             policy=create_policy(policy), predictor=predictor, **options)

    return make


class Simulator:
    """N GPUs, each with its own StepScheduler from `make_scheduler`; arrivals are dispatched to one GPU
    at arrival time (least outstanding requests, or round robin), and never moved afterwards."""

    def __init__(self, gpus: int, make_scheduler: Callable[[], StepScheduler], latency: LatencyModel,
                 dispatch: str = "least_loaded", cascade: CascadeSpec | None = None,
                 auto_steps: Callable[[int], int] | None = None, learn: bool = True):
        if not (_is_int(gpus) and gpus >= 1):
            raise ValueError(f"gpus: {gpus!r} is not allowed; allowed an integer >= 1")
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch: '{dispatch}' is unknown; choose one of: {', '.join(DISPATCH)}")
        if cascade is not None:
            if cascade.heavy_gpus >= gpus:
                raise ValueError(f"heavy_gpus: {cascade.heavy_gpus} leaves no GPU for the light model "
                                 f"out of {gpus}")
            for model in (cascade.light_model, cascade.heavy_model):
                if model not in latency.models:
                    raise ValueError(f"cascade: model '{model}' is not in the latency profile; "
                                     f"profiled: {', '.join(sorted(latency.models))}")
        self.gpus, self.make_scheduler, self.latency = gpus, make_scheduler, latency
        self.dispatch, self.cascade = dispatch, cascade
        self.auto_steps = auto_steps  # step_mode "auto" requests: requested steps -> evaluations run
        self.learn = learn  # feed call times to each scheduler's predictor, as the Engine does

    def run(self, requests: Iterable[SimRequest | dict]) -> SimResult:
        checked = []
        for i, request in enumerate(requests):
            try:
                request = request if isinstance(request, SimRequest) else SimRequest.from_dict(request)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"request {i}: {exc}") from None
            if request.model not in self.latency.models:
                raise ValueError(f"request {i}: model '{request.model}' is not in the latency profile; "
                                 f"profiled: {', '.join(sorted(self.latency.models))}")
            if self.cascade is not None and request.model != self.cascade.light_model:
                raise ValueError(f"request {i}: model '{request.model}' is not the cascade's light model "
                                 f"'{self.cascade.light_model}'; cascaded requests start on it")
            checked.append(request)
        return _Replay(self, checked).run()


def simulate(requests: Iterable[SimRequest | dict], gpus: int, make_scheduler: Callable[[], StepScheduler],
             latency: LatencyModel, **options) -> SimResult:
    """One replay: Simulator(gpus, make_scheduler, latency, **options).run(requests)."""
    return Simulator(gpus, make_scheduler, latency, **options).run(requests)


class _Gpu:
    """One simulated GPU: its scheduler, the run of identical iterations in flight, and its counters."""

    __slots__ = ("index", "scheduler", "plan", "groups", "calls", "first", "start", "ends", "done", "version",
                 "busy_s", "unet_calls", "unet_rows", "iterations")

    def __init__(self, index: int, scheduler: StepScheduler):
        self.index, self.scheduler = index, scheduler
        self.plan: Plan | None = None
        self.groups: list[list[_SimState]] = []  # decode calls' requests, one list per resolution
        self.calls: list[tuple] = []  # (kind, key, seconds) in the Engine's order
        self.first: list[float] = []  # the calls' times in the run's first iteration (noise included)
        self.start = 0.0
        self.ends: list[float] | None = None  # end time of each iteration of the run; None: idle
        self.done = 0  # iterations of the run already applied to the request states
        self.version = 0  # invalidates the heap entry of a run that was cut short
        self.busy_s, self.unet_calls, self.unet_rows, self.iterations = 0.0, 0, 0, 0


class _Replay:
    """One replay of a trace. Events at the same instant are simultaneous: runs ending at t release their
    requests, then everything arriving at t is queued, then idle GPUs with work plan their next iteration."""

    def __init__(self, sim: Simulator, requests: list[SimRequest]):
        self.sim, self.requests, self.latency = sim, requests, sim.latency
        self.jitter = sim.latency.noise_stream()
        self.gpus = []
        for i in range(sim.gpus):
            scheduler = sim.make_scheduler()
            if not isinstance(scheduler, StepScheduler):
                raise ValueError(f"make_scheduler: returned {type(scheduler).__name__}; expected a StepScheduler")
            if any(g.scheduler is scheduler for g in self.gpus):
                raise ValueError("make_scheduler: returned the same scheduler twice; each GPU needs its own")
            self.gpus.append(_Gpu(i, scheduler))
        cascade = sim.cascade
        split = cascade.heavy_gpus if cascade is not None else 0
        every = list(range(len(self.gpus)))
        self.pools = [every[:len(every) - split], every[len(every) - split:] if split else every]
        self.turn = [0, 0]  # round robin position per pool
        self.load = [0] * len(self.gpus)  # requests waiting or running per GPU (a C-level min over 64 is cheap)
        # Escalations are drawn before the replay, so the same requests escalate whatever the GPUs do.
        rng = random.Random(cascade.seed if cascade else 0)
        rate = cascade.escalation_rate if cascade else 0.0
        self.escalate = [(rng.random() < rate) if r.escalate is None else r.escalate for r in requests]
        self.records = [SimRecord(i, r.arrival, r.slo_ms) for i, r in enumerate(requests)]
        self.heap: list[tuple] = []
        self.seq = itertools.count()
        self.to_start: set[int] = set()
        self.light_answers = self.escalated = 0

    # ---- event loop ----------------------------------------------------------------------------
    def run(self) -> SimResult:
        order = sorted(range(len(self.requests)), key=lambda i: self.requests[i].arrival)
        i, n = 0, len(order)
        while i < n or self.heap:
            t = min(self.requests[order[i]].arrival if i < n else math.inf,
                    self.heap[0][0] if self.heap else math.inf)
            # 1. Runs ending now: their requests advance, finish and leave.
            escalated = []
            while self.heap and self.heap[0][0] <= t:
                _, _, g, version = heapq.heappop(self.heap)
                gpu = self.gpus[g]
                if version == gpu.version:
                    escalated += self._finish_run(gpu)
                    self.to_start.add(g)
            # 2. Escalated answers go to the heavy model; arrivals are queued on their GPU.
            for state in escalated:
                self._dispatch(state, t, pool=1, prefix="escalation_")
            while i < n and self.requests[order[i]].arrival <= t:
                index = order[i]
                self._dispatch(self._state(index, self.requests[index].model, self.requests[index].slo_ms), t)
                i += 1
            # 3. Idle GPUs with work plan their next iteration.
            for g in sorted(self.to_start):
                gpu = self.gpus[g]
                if gpu.ends is None and gpu.scheduler.has_work:
                    self._start(gpu, t)
            self.to_start.clear()
        unresolved = [r.index for r in self.records if r.finish is None and r.rejected is None]
        if unresolved or any(self.load):  # a guard: every request must end one way or the other
            raise RuntimeError(f"requests {unresolved[:5]} neither finished nor were rejected")
        return SimResult(self.records, self._summary())

    def _state(self, index: int, model: str, slo_ms: float | None) -> _SimState:
        r = self.requests[index]
        params = GenerationParams(prompt="", height=r.height, width=r.width, steps=r.steps,
                                  guidance_scale=r.guidance_scale, slo_ms=slo_ms, priority=r.priority,
                                  min_steps=r.min_steps, step_mode=r.step_mode)
        return _SimState(request_id=f"q{index}", params=params, sink=_SINK, input_ids=None, model=model,
                         index=index, escalate=self.escalate[index])

    # ---- dispatch --------------------------------------------------------------------------------
    def _dispatch(self, state: _SimState, now: float, pool: int = 0, prefix: str = "") -> None:
        indices = self.pools[pool]
        if self.sim.dispatch == "round_robin":
            gpu = self.gpus[indices[self.turn[pool] % len(indices)]]
            self.turn[pool] += 1
        else:  # least outstanding requests, the lowest index on a tie
            gpu = self.gpus[min(indices, key=self.load.__getitem__)]
        record = self.records[state.index]
        record.gpu = gpu.index
        self._catch_up(gpu, now)  # admission must see the progress made so far
        try:
            gpu.scheduler.add(state, now)
        except (QueueFull, Rejected) as exc:
            state.status = Status.REJECTED
            record.rejected = prefix + next(name for kind, name in REJECT_REASONS if isinstance(exc, kind))
            return
        self.load[gpu.index] += 1
        scheduler = gpu.scheduler
        if gpu.ends is None:
            self.to_start.add(gpu.index)
        elif len(scheduler.running) < scheduler.max_active and gpu.done + 1 < len(gpu.ends):
            # A free slot: it joins at the next step boundary, so the run ends with the iteration in flight.
            del gpu.ends[gpu.done + 1:]
            self._push(gpu)

    def _push(self, gpu: _Gpu) -> None:
        gpu.version += 1
        heapq.heappush(self.heap, (gpu.ends[-1], next(self.seq), gpu.index, gpu.version))

    # ---- iterations ------------------------------------------------------------------------------
    def _start(self, gpu: _Gpu, now: float) -> None:
        """Plan one iteration and as many identical ones as follow it; schedule the run's end."""
        plan = gpu.scheduler.schedule(now)
        if plan.empty:
            raise RuntimeError(f"gpu {gpu.index}: the scheduler has work but planned nothing at t={now}")
        calls, groups = self._calls(gpu.scheduler, plan)
        repeats = self._repeats(plan)
        bases = [seconds for _, _, seconds in calls]
        if self.jitter is None:
            first = bases
            durations = itertools.repeat(sum(bases), repeats)
        else:
            times = [[self.jitter(b) for b in bases] for _ in range(repeats)]
            first = times[0]
            durations = (sum(t) for t in times)
        for state in plan.encode:
            state.status = Status.ENCODING
        gpu.plan, gpu.calls, gpu.groups, gpu.first, gpu.start, gpu.done = plan, calls, groups, first, now, 0
        gpu.ends = list(itertools.accumulate(durations, initial=now))[1:]  # sums in order, like a clock
        self._push(gpu)

    def _calls(self, scheduler: StepScheduler, plan: Plan) -> tuple[list[tuple], list[list[_SimState]]]:
        """The model calls of one iteration in the Engine's sequential order: encode, decode per
        resolution, then one UNet call per denoise batch."""
        latency, calls = self.latency, []
        if plan.encode:
            rows = sum(s.unet_rows for s in plan.encode)
            calls.append(("encode", rows, latency.encode(rows)))
        groups: dict[tuple[int, int], list[_SimState]] = {}
        for state in plan.decode:
            groups.setdefault((state.params.height, state.params.width), []).append(state)
        for (h, w), group in groups.items():
            calls.append(("decode", len(group) * h * w, latency.decode(len(group) * h * w)))
        for batch in plan.denoise:
            model, h, w = batch[0].bucket
            rows = sum(s.unet_rows for s in batch)
            calls.append(("unet", (model, h, w, rows), latency.unet(model, h, w, rows)))
        if plan.patched:
            grid, scale = scheduler.patch_grid, scheduler.latent_scale
            px = grid.tile * scale
            for batch in plan.patched:
                rows = sum(s.unet_rows * grid.count(s.params.height // scale, s.params.width // scale)
                           for s in batch)
                calls.append(("unet", (batch[0].model, px, px, rows), latency.unet(batch[0].model, px, px, rows)))
        return calls, list(groups.values())

    @staticmethod
    def _repeats(plan: Plan) -> int:
        """How many iterations in a row make exactly these calls: 1 unless the plan only denoises and its
        batches cannot change with the policy's order (which may shift with time); then until the first
        request runs out of steps."""
        if plan.encode or plan.decode or plan.cancelled:
            return 1
        batches: dict[tuple, list[list]] = {}
        for batch in plan.denoise:
            batches.setdefault(batch[0].bucket, []).append(batch)
        for group in batches.values():
            if len(group) > 1 and len({s.unet_rows for batch in group for s in batch}) > 1:
                return 1
        models = [batch[0].model for batch in plan.patched]
        if len(models) != len(set(models)):
            return 1
        return min((s.stop_at or s.steps_target) - s.steps_done
                   for batches_ in (plan.denoise, plan.patched) for batch in batches_ for s in batch)

    def _catch_up(self, gpu: _Gpu, now: float) -> None:
        """Apply the iterations of the run in flight that ended by `now` (never its last: its event does)."""
        if gpu.ends is None:
            return
        done = min(bisect.bisect_right(gpu.ends, now, gpu.done), len(gpu.ends) - 1)
        if done > gpu.done:
            self._advance(gpu.plan, done - gpu.done)
            gpu.done = done

    @staticmethod
    def _advance(plan: Plan, n: int) -> None:
        """n UNet steps for every denoised request (Engine._advance); an early stop ends the steps there."""
        for batches in (plan.denoise, plan.patched):
            for batch in batches:
                for s in batch:
                    s.steps_done += n
                    if s.stop_at is not None and s.steps_done >= s.stop_at:
                        s.steps_target = s.steps_done

    def _finish_run(self, gpu: _Gpu) -> list[_SimState]:
        """The run's last iteration ends: apply it as the Engine would; returns answers to escalate."""
        plan, scheduler, iterations = gpu.plan, gpu.scheduler, len(gpu.ends)
        # 1. Encode: the step target is set when the sampler is built (Engine._encode).
        for state in plan.encode:
            state.sampler, state.steps_target = _ENCODED, state.params.steps
            state.stop_at = self._stop_at(state)
            state.status = Status.DENOISING
        # 2. Denoise: the steps not yet applied.
        self._advance(plan, iterations - gpu.done)
        # 3. Decode: each resolution finishes when its VAE call does, right after this iteration's encode.
        escalated = []
        t = gpu.start + (gpu.first[0] if plan.encode else 0.0)
        for group, seconds in zip(gpu.groups, gpu.first[1 if plan.encode else 0:]):
            t += seconds
            for state in group:
                state.status = Status.FINISHED
                scheduler.release(state)
                self.load[gpu.index] -= 1
                escalated += self._answer(state, t)
        # 4. Account, and let the scheduler's predictor learn from the calls (Engine._unet / _encode / _decode).
        unet = [(key, seconds) for (kind, key, _), seconds in zip(gpu.calls, gpu.first) if kind == "unet"]
        gpu.busy_s += gpu.ends[-1] - gpu.start
        gpu.iterations += iterations
        gpu.unet_calls += iterations * len(unet)
        gpu.unet_rows += iterations * sum(key[3] for key, _ in unet)
        if self.sim.learn:
            predictor = scheduler.predictor
            for (kind, key, _), seconds in zip(gpu.calls, gpu.first):
                if kind == "unet":
                    predictor.observe_unet(*key, seconds)
                else:
                    predictor.observe_stage(kind, key, seconds)
        gpu.plan, gpu.ends, gpu.groups = None, None, []
        return escalated

    def _stop_at(self, state: _SimState) -> int | None:
        request, target = self.requests[state.index], state.steps_target
        run = request.steps_run
        if run is None and self.sim.auto_steps is not None and state.params.step_mode == "auto":
            run = self.sim.auto_steps(target)
            if not (_is_int(run) and run >= 1):
                raise ValueError(f"auto_steps: returned {run!r} for {target} steps; expected an integer >= 1")
        return None if run is None or run >= target else run

    def _answer(self, state: _SimState, t: float) -> list[_SimState]:
        record, cascade = self.records[state.index], self.sim.cascade
        if cascade is not None and state.model == cascade.light_model:
            self.light_answers += 1
            if state.escalate:
                self.escalated += 1
                record.escalated = True
                slo = record.slo_ms
                remaining = None if slo is None else slo - (t - record.arrival) * 1000.0
                return [self._state(state.index, cascade.heavy_model, remaining)]
        record.finish, record.model, record.steps = t, state.model, state.steps_done
        return []

    # ---- summary ---------------------------------------------------------------------------------
    def _summary(self) -> dict:
        records = self.records
        latencies = sorted(r.latency for r in records if r.finish is not None)
        met = sum(r.met for r in records)
        span = max([r.arrival for r in records] + [r.finish for r in records if r.finish is not None], default=0.0)
        rejected: dict[str, int] = {}
        models: dict[str, int] = {}
        for r in records:
            if r.rejected:
                rejected[r.rejected] = rejected.get(r.rejected, 0) + 1
            if r.model:
                models[r.model] = models.get(r.model, 0) + 1
        pct = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None
        calls = sum(g.unet_calls for g in self.gpus)
        utilization = [g.busy_s / span if span else 0.0 for g in self.gpus]
        return {
            "requests": len(records),
            "finished": len(latencies),
            "met": met,
            "rejected": dict(sorted(rejected.items())),
            "attainment": met / len(records) if records else None,
            "goodput_rps": met / span if span else 0.0,
            "throughput_rps": len(latencies) / span if span else 0.0,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "mean_ms": 1000 * sum(latencies) / len(latencies) if latencies else None,
            "span_s": span,
            "answers_by_model": dict(sorted(models.items())),
            "escalation_rate": (self.escalated / self.light_answers if self.light_answers else 0.0)
            if self.sim.cascade else None,
            "mean_batch_rows": sum(g.unet_rows for g in self.gpus) / calls if calls else 0.0,
            "gpu_utilization": utilization,
            "mean_gpu_utilization": sum(utilization) / len(utilization),
        }


# ---- validation against a measured run -------------------------------------------------------
VALIDATED = ("attainment", "throughput_rps")


def _rates(doc, name: str) -> dict[float, dict]:
    if not isinstance(doc, dict) or not isinstance(doc.get("rates"), dict):
        raise ValueError(f"{name}.rates: missing; expected {{\"rates\": {{rate: {{\"attainment\": ..., "
                         f"\"throughput_rps\": ...}}}}}}")
    out = {}
    for key, row in doc["rates"].items():
        try:
            rate = float(key)
        except ValueError:
            raise ValueError(f"{name}.rates: key {key!r} is not a rate") from None
        for metric in VALIDATED:
            if not isinstance(row, dict) or not _is_num(row.get(metric)):
                raise ValueError(f"{name}.rates.{key}.{metric}: missing or not a number")
        out[rate] = row
    return out


def validate(simulated: dict, measured: dict) -> dict:
    """Relative error |simulated - measured| / measured of attainment and throughput per load (rate),
    over the rates both hold; None where the measured value is 0 and the simulated one is not."""
    sim, real = _rates(simulated, "simulated"), _rates(measured, "measured")
    common = sorted(set(sim) & set(real))
    if not common:
        raise ValueError(f"no rate in both: simulated {sorted(sim)}, measured {sorted(real)}")
    rows, worst = {}, {}
    for rate in common:
        row = {}
        for metric in VALIDATED:
            s, m = float(sim[rate][metric]), float(real[rate][metric])
            error = abs(s - m) / abs(m) if m else (0.0 if s == m else None)
            row[metric] = {"simulated": s, "measured": m, "rel_error": error}
            if error is not None:
                worst[metric] = max(worst.get(metric, 0.0), error)
        rows[f"{rate:g}"] = row
    return {"rates": rows, "max_rel_error": worst,
            "simulated_only": [f"{r:g}" for r in sorted(set(sim) - set(real))],
            "measured_only": [f"{r:g}" for r in sorted(set(real) - set(sim))]}


# ---- command line ------------------------------------------------------------------------------
def _numbers(text: str, name: str, cast) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a comma-separated list of numbers") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name}: {text!r} is not allowed; allowed numbers > 0")
    return values


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m perf.simulator", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="latency profile JSON (profile.json format)")
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts")
    ap.add_argument("--rates", help="comma-separated arrival rates per GPU (req/s); total = rate x GPUs")
    ap.add_argument("--duration", type=float,
                    help="seconds of trace (default 600 for Poisson arrivals, the whole file for --request-intervals)")
    ap.add_argument("--request-intervals", help="trace file: one inter-arrival interval in microseconds a line")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sizes", default="512", help="comma-separated square image sizes, drawn uniformly")
    ap.add_argument("--slo-ms", type=float, default=5000.0)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--model", default="unet", help="UNet model name as in the profile")
    ap.add_argument("--policy", default="edf", choices=list(POLICIES))
    ap.add_argument("--max-active", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--dispatch", default="least_loaded", choices=list(DISPATCH))
    ap.add_argument("--noise", type=float, default=0.0, help="log-normal sigma of per-call time noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cascade", help="LIGHT,HEAVY model names: light first, escalate to heavy")
    ap.add_argument("--escalation-rate", type=float, default=0.0)
    ap.add_argument("--heavy-gpus", type=int, default=0, help="GPUs reserved for the heavy model (0: shared)")
    ap.add_argument("--auto-steps", type=float,
                    help="step_mode auto; the entropy stop runs this fraction of the steps (0..1]")
    ap.add_argument("--validate", help="measured JSON {\"rates\": {rate: {attainment, throughput_rps}}} of a "
                                       "one-GPU run; compared with the simulated one-GPU results")
    ap.add_argument("--out", help="write the report JSON here")
    return ap


def run_cli(args: argparse.Namespace) -> dict:
    # 1. Inputs: every file is read and checked before anything runs.
    latency = LatencyModel.from_file(args.profile, args.noise, args.seed)
    gpu_counts = _numbers(args.gpus, "--gpus", int)
    sizes = tuple(_numbers(args.sizes, "--sizes", int))
    measured = load_json(args.validate, "measured") if args.validate else None
    rates = _numbers(args.rates, "--rates", float) if args.rates else None
    if rates is None and measured is not None:
        rates = sorted(_rates(measured, "measured"))
    intervals = read_intervals(args.request_intervals) if args.request_intervals else None
    if rates is None and intervals is None:
        raise ValueError("--rates: required unless --request-intervals or --validate gives the load")
    if measured is not None and 1 not in gpu_counts:
        raise ValueError("--gpus: --validate compares a one-GPU run; include 1")
    duration = args.duration if args.duration is not None else (None if intervals else 600.0)
    # 2. What is simulated: the server's scheduler and policy, the request mix, an optional cascade.
    cascade = None
    if args.cascade:
        names = [n.strip() for n in args.cascade.split(",")]
        if len(names) != 2:
            raise ValueError(f"--cascade: {args.cascade!r} is not LIGHT,HEAVY")
        cascade = CascadeSpec(names[0], names[1], args.escalation_rate, args.seed, args.heavy_gpus)
    auto_steps = None
    if args.auto_steps is not None:
        if not 0 < args.auto_steps <= 1:
            raise ValueError(f"--auto-steps: {args.auto_steps} is not allowed; allowed a fraction in (0, 1]")
        auto_steps = lambda steps: max(1, math.ceil(args.auto_steps * steps))
    mix = RequestMix(sizes=sizes, steps=args.steps, slo_ms=args.slo_ms, guidance_scale=args.guidance_scale,
                     model=cascade.light_model if cascade else args.model,
                     step_mode="auto" if auto_steps else "fixed")
    make = scheduler_factory(latency.profile, args.policy, args.max_active, args.max_queue, args.max_batch)
    # 3. Replays: one per GPU count and rate.
    results = {}
    for gpus in gpu_counts:
        sim = Simulator(gpus, make, latency, args.dispatch, cascade, auto_steps)
        rows = {}
        for rate in rates or [None]:
            label = "trace" if rate is None else f"{rate:g}"
            seed = f"{args.seed}:{gpus}:{label}"
            if intervals is not None:
                arrivals = arrivals_from_intervals(intervals, None if rate is None else rate * gpus, duration)
            else:
                arrivals = poisson_arrivals(rate * gpus, duration, seed)
            started = time.perf_counter()
            summary = sim.run(mix.requests(arrivals, seed + ":mix")).summary
            summary["sim_wall_s"] = time.perf_counter() - started
            rows[label] = summary
            p99 = summary["p99_ms"]
            print(f"gpus {gpus:3d} rate {label:>6}/s/gpu: {summary['requests']} requests, attainment "
                  f"{summary['attainment'] or 0:.4f}, goodput {summary['goodput_rps']:.3f}/s, p99 "
                  f"{'-' if p99 is None else f'{p99:.0f} ms'}, utilization {summary['mean_gpu_utilization']:.2f}, "
                  f"rejected {sum(summary['rejected'].values())} [{summary['sim_wall_s']:.1f} s]", flush=True)
        results[str(gpus)] = {"rates": rows}
    report = {"bench": "simulator", "profile": str(args.profile),
              "config": {"gpus": gpu_counts, "rates_per_gpu": rates, "duration_s": duration,
                         "request_intervals": args.request_intervals, "steps": args.steps, "sizes": list(sizes),
                         "slo_ms": args.slo_ms, "policy": args.policy, "max_active": args.max_active,
                         "max_queue": args.max_queue, "max_batch": args.max_batch, "dispatch": args.dispatch,
                         "noise": args.noise, "seed": args.seed, "cascade": asdict(cascade) if cascade else None,
                         "auto_steps": args.auto_steps},
              "results": results}
    # 4. Validation: the one-GPU results against the measured run.
    if measured is not None:
        report["validation"] = validate(results["1"], measured)
        worst = report["validation"]["max_rel_error"]
        print("validation, max relative error: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        run_cli(args)
    except ValueError as exc:
        sys.exit("error: " + " ".join(str(exc).split()))


if __name__ == "__main__":
    main()
