"""Discrete-event simulator for scale planning (after DiffServe and SD-as-a-Service).

It replays an arrival trace on N simulated GPUs. Every GPU runs the engine's loop on the server's own
StepScheduler: plan = scheduler.schedule(now); output = runner.execute(plan);
scheduler.update_from_output(plan, output, now + seconds). Only the runner is simulated (SimulatedRunner):
it makes the calls the Runner makes (sequential mode: encode of the joining requests, VAE decode of the
finished ones, then one UNet call per denoise batch), each timed from a measured latency profile, and
reports what the real one would (evaluations, entropy numbers, gate scores, call times). Admission,
batching, ordering, early stops, cascade routing, releases and the predictor's learning all happen in the
scheduler, as in the server; the simulator only dispatches arrivals to GPUs and keeps the clock.

Speed: a run of identical iterations (only denoising, nobody can join or finish) is one event; the
scheduler still applies every iteration's output, lazily. An arrival in the middle of it first applies
those that ended by then, so admission sees the progress it would see iteration by iteration.

    python -m perf.simulator --profile build/model_repository/orchestrator/1/profile.json \\
        --gpus 1,2,4,8,16,32,64 --rates 0.1,0.2,0.4 --duration 3600 --steps 50 --sizes 512,768 \\
        --slo-ms 5000 --policy edf --out perf/results/simulator.json
    python -m perf.simulator --profile P.json --gpus 1 --validate measured.json --duration 60
"""

from __future__ import annotations

import argparse
import bisect
import collections
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

from triffusion.orchestrator.cascade import LoadController
from triffusion.orchestrator.config import OrchestratorConfig, build_scheduler
from triffusion.orchestrator.errors import ServingError
from triffusion.orchestrator.params import STEP_MODES, GenerationParams
from triffusion.orchestrator.policies import POLICIES, create_policy
from triffusion.orchestrator.predictor import LatencyPredictor
from triffusion.orchestrator.request import RequestState, Status
from triffusion.orchestrator.scheduler import Cascade, Plan, RunnerOutput, StepScheduler

DISPATCH = ("least_loaded", "round_robin")


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
# Timed stages a profile may carry (server-learned profiles add the gate and ControlNet to encode and decode).
STAGES = ("encode", "decode", "gate", "controlnet")


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
        if not (isinstance(row, list) and len(row) == 3 and row[0] in STAGES
                and _is_int(row[1]) and row[1] > 0 and _is_num(row[2]) and row[2] >= 0):
            raise ValueError(f"profile.stages[{i}]: {row!r} is not [stage ({', '.join(STAGES)}), size, seconds]")
    share = profile.get("side_share", 0.0)
    if not (_is_num(share) and 0.0 <= share <= 1.0):
        raise ValueError(f"profile.side_share: {share!r} is not allowed; allowed a number from 0 to 1")
    for stage in ("encode", "decode"):
        if not any(row[0] == stage for row in stages):
            raise ValueError(f"profile.stages: no '{stage}' entry; without one its time would be a guess")


def served_profile(exported: dict, learned: dict) -> tuple[dict, dict]:
    """The profile to simulate the served system on: the export's profile (each call timed alone) overridden
    by what the server learned while serving (`learned`: its engine's profile, an EWMA of the calls it timed
    seeded from the export's), with the learned iteration scale folded into the UNet times and the learned
    `side_share`, forecast bias and stop fractions kept. Every entry the server never timed (its learned
    value is still the export's) is scaled by the geometric mean of served / alone over the entries it did
    time, per kind (UNet calls, side stages): on a host whose cores the models and the fronts share, served
    calls run slower than alone, and the batch sizes only heavy load reaches would otherwise look that much
    cheaper than the ones it timed.
    Returns the profile and the scales {"unet": s, "stages": s} (1.0 for a kind with nothing timed)."""
    profile, scales = {}, {}
    for kind, width in (("unet", 4), ("stages", 2)):
        alone = {tuple(row[:width]): row[width] for row in exported.get(kind, [])}
        served = {tuple(row[:width]): row[width] for row in learned.get(kind, [])}
        timed = {key: t for key, t in served.items() if key not in alone or t != alone[key]}
        ratios = [t / alone[key] for key, t in timed.items() if alone.get(key, 0) > 0 and t > 0]
        scale = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 1.0
        merged = {key: t * scale for key, t in alone.items()}
        merged.update({key: t for key, t in served.items() if key in timed})
        scales[kind] = round(scale, 4)
        profile[kind] = [[*key, t] for key, t in sorted(merged.items())]
    iteration = learned.get("iteration_scale", 1.0)
    profile["unet"] = [[*row[:4], row[4] * iteration] for row in profile["unet"]]
    profile["side_share"] = learned.get("side_share", 0.0)
    for key in ("forecast_bias", "stop_fraction"):  # the scheduler's learned state, for scheduler_factory
        if learned.get(key):
            profile[key] = dict(learned[key])
    check_profile(profile)
    return profile, scales


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
        # How much of an iteration's side stages and UNet calls do not overlap (the server's learned
        # `side_share`, as its engine's profile reports it); 0: the side stages run beside the UNet.
        self.side_share = float(profile.get("side_share", 0.0))

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

    def gate(self, images: int) -> float:
        """One quality-gate call scoring `images` light answers (free where the profile has no gate)."""
        return self._predictor.gate(images)

    def noise_stream(self) -> Callable[[float], float] | None:
        """A fresh seeded stream, seconds -> seconds x a log-normal factor of mean 1; None without noise.
        Fresh per replay, so replaying the same trace gives the same times."""
        factor = self.factor_stream()
        return None if factor is None else (lambda seconds: seconds * factor())

    def factor_stream(self, stream: int | None = None) -> Callable[[], float] | None:
        """A fresh seeded stream of log-normal factors of mean 1 (None without noise); `stream` numbers
        independent streams of the same seed (the simulator gives each GPU its own)."""
        if not self.noise:
            return None
        rng = random.Random(self.seed if stream is None else f"{self.seed}:{stream}")
        sigma = self.noise
        mu = -sigma * sigma / 2
        return lambda: rng.lognormvariate(mu, sigma)


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
    min_quality: float | None = None  # an SLO class's quality floor (needs the scheduler's step profiles)
    slo_class: str | None = None  # the served SLO class it names (the scheduler learns per class, as the server)
    escalate: bool | None = None  # cascade: True/False decides; None draws with the escalation rate
    # step_mode auto: the evaluations after which the latent settles (the simulated entropy stays flat
    # from there); the scheduler's entropy stop then ends the request there, or where its thresholds
    # first allow. None: Simulator(auto_steps=...) says, else the entropy never settles.
    steps_run: int | None = None

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
        if self.min_quality is not None and not (_is_num(self.min_quality) and 0 <= self.min_quality <= 1):
            bad("min_quality", "None or a number in 0..1")
        if self.slo_class is not None and not (isinstance(self.slo_class, str) and self.slo_class):
            bad("slo_class", "None or a class name")
        if self.escalate is not None and not isinstance(self.escalate, bool):
            bad("escalate", "None, true or false")
        if self.steps_run is not None and not (_is_int(self.steps_run) and self.steps_run >= 1):
            bad("steps_run", "None or an integer >= 1")
        if self.steps_run is not None and self.step_mode != "auto":
            raise ValueError(f"steps_run: {self.steps_run!r} needs step_mode 'auto'; only the server's entropy "
                             "stop ends a request before its steps")

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
    """Light model first; the gate escalates a light answer with probability `escalation_rate` (drawn
    per request from `seed` before the replay, or the request's own `escalate`; with a load controller,
    the escalation rate of its current operating point). The heavy run keeps the original deadline:
    latency counts from the first arrival. heavy_gpus 0: each GPU's scheduler routes and redoes the
    request in place (the server's cascade); n > 0: the dispatcher sends it to the heavy GPUs."""

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
    rejected: str | None = None  # the scheduler's reason ("queue_full", "slo"); "escalation_..." on the heavy GPUs
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
    """The simulator's sink: nothing leaves (the simulator reads the scheduler's updates, not the sinks)."""

    def progress(self, step, steps): ...
    def preview(self, image): ...
    def finish(self, image, metadata): ...
    def fail(self, error): ...


_SINK = _Silent()


@dataclass(eq=False)
class _SimState(RequestState):
    """A RequestState the scheduler handles like any other, plus the trace position it stands for and
    the simulated runner's own memo of where its entropy settles (no engine state)."""

    index: int = 0
    settle: int | None = None  # evaluations after which the simulated entropy stays flat (None: never)
    settle_known: bool = False


def scheduler_factory(profile: dict | None, policy: str = "edf", max_active: int = 8, max_queue: int = 64,
                      max_batch: int = 16, *, threshold: float = 0.5,
                      controller: Callable[[], LoadController] | None = None, entropy: dict | None = None,
                      best_effort_s: float = 30.0, patch: int = 8, halo: int = 4,
                      **options) -> Callable[..., StepScheduler]:
    """Schedulers made the way config.build_engine makes the server's: each GPU gets its own predictor
    seeded from the profile (it then learns online), its own policy object, a patch grid, the entropy
    thresholds (`entropy`: EntropyStop keywords, for every UNet of the profile) and, when the Simulator
    asks for one with `make(cascade=Cascade(light, heavy))`, the cascade with its gate `threshold` and
    a LoadController from `controller()` (if given: fresh, or restored to where a server's stands, whose
    operating point is then in force). `options` go to StepScheduler as they are."""
    create_policy(policy)  # an unknown policy fails here, by name
    models = sorted({row[0] for row in profile.get("unet", [])}) if profile else []
    served = {key: options.pop(key) for key in ("hybrid", "admission_headroom") if key in options}  # config fields
    config = OrchestratorConfig(max_active=max_active, max_queue=max_queue, max_batch=max_batch, policy=policy,
                                best_effort_s=best_effort_s, patch=patch, halo=halo, **served)

    def make(cascade: Cascade | None = None) -> StepScheduler:
        scheduler = build_scheduler(config, profile=profile, models=models, entropy=entropy, cascade=cascade,
                                    threshold=threshold,
                                    controller=controller() if cascade is not None and controller is not None else None,
                                    **options)
        ctl = scheduler.controller
        if ctl is not None and ctl.last is not None:  # a controller that goes on from a decision: it is in force
            scheduler.apply_option(ctl.last.option)
        if profile:  # what a server's engine learned (its profile()), as that server would go on with it
            scheduler.side_share = float(profile.get("side_share", 0.0))
            scheduler.forecast_bias.update(profile.get("forecast_bias") or {})
            for key, fraction in (profile.get("stop_fraction") or {}).items():
                model, _, level = key.partition("/")
                scheduler.stop_fraction[(model, level)] = fraction
        return scheduler

    return make


class Simulator:
    """N GPUs, each with its own StepScheduler from `make_scheduler` driven by a SimulatedRunner;
    arrivals are dispatched to one GPU at arrival time (least outstanding requests, or round robin),
    and never moved afterwards.

    Cascades: with `cascade.heavy_gpus == 0` every GPU's scheduler serves the cascade itself
    (`make_scheduler(cascade=Cascade(light, heavy))`): the simulated gate scores each light answer and
    the scheduler's router escalates it in place (same GPU, same slot). With `heavy_gpus > 0` (DiffServe's
    split of GPUs between the variants, a cluster decision) the schedulers serve plain requests and the
    dispatcher sends an escalated light answer to the heavy GPUs as a new request that keeps its
    deadline (`received` = its first arrival)."""

    def __init__(self, gpus: int, make_scheduler: Callable[..., StepScheduler], latency: LatencyModel,
                 dispatch: str = "least_loaded", cascade: CascadeSpec | None = None,
                 auto_steps: Callable[[int], int] | None = None, learn: bool = True,
                 max_decode_batch: int | None = None):
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
        if max_decode_batch is not None and not (_is_int(max_decode_batch) and max_decode_batch >= 1):
            raise ValueError(f"max_decode_batch: {max_decode_batch!r} is not allowed; allowed None or an integer >= 1")
        self.gpus, self.make_scheduler, self.latency = gpus, make_scheduler, latency
        self.dispatch, self.cascade = dispatch, cascade
        self.auto_steps = auto_steps  # step_mode "auto" requests: requested steps -> evaluations run
        self.learn = learn  # report call times to each scheduler (its predictor learns), as the Runner does
        self.max_decode_batch = max_decode_batch  # largest VAE batch, as the Runner's

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


def simulate(requests: Iterable[SimRequest | dict], gpus: int, make_scheduler: Callable[..., StepScheduler],
             latency: LatencyModel, **options) -> SimResult:
    """One replay: Simulator(gpus, make_scheduler, latency, **options).run(requests)."""
    return Simulator(gpus, make_scheduler, latency, **options).run(requests)


class SimulatedRunner:
    """Stands in for orchestrator.runner.Runner: `execute(plan)` returns the RunnerOutput the real
    runner would, with model call times from the latency profile instead of tensors. It decides nothing:
    the scheduler applies the output in `update_from_output` (steps, early stops, routing, releases,
    learning) exactly as it applies the real runner's.

    - encoded: the sampler's evaluations (the served `params.steps`);
    - stepped: None, or for the requests the plan asks to measure (step_mode auto) an entropy number
      that changes by more than the stop's threshold at every evaluation until the request's settle
      point (`steps_run`, or `auto_steps(steps)`, minus one) and stays flat after it, so the scheduler's
      own EntropyStop decides the early stop;
    - images: a placeholder per decoded request; scores: the gate's score of each light answer the plan
      gates, at the router's threshold if it is kept and one below it if it escalates;
    - unet_calls, stages, denoise_s: the calls' times (with the profile's noise).

    The calls run one after another (the Runner's sequential mode: encode, decode per resolution,
    then one UNet call per batch) and the iteration lasts the sum of their times, `seconds`. The noise
    is one stream per runner consumed call by call, in an order that does not depend on how the
    policy ordered the plan; `durations` reads ahead in that stream without consuming it."""

    def __init__(self, scheduler: StepScheduler, latency: LatencyModel, factors: Callable[[], float] | None,
                 settle: Callable[[_SimState], int | None], escalates: Callable[[_SimState, StepScheduler], bool],
                 learn: bool = True, max_decode_batch: int | None = None):
        self.scheduler, self.latency, self.learn = scheduler, latency, learn
        self.settle, self.escalates, self.max_decode_batch = settle, escalates, max_decode_batch
        self._draw = factors  # None: no noise
        self._buffer: list[float] = []  # noise factors drawn and not yet consumed, from _head on
        self._head = 0
        self._plan: Plan | None = None
        self.calls: list[tuple] = []  # (kind, key, seconds): the plan's calls without noise, in run order
        self._canon: list[int] = []  # call indices in the noise stream's order
        self._fixed: RunnerOutput | None = None  # the output, when it is the same at every repetition
        self._fixed_seconds = 0.0
        self._ahead: collections.deque = collections.deque()  # (times, seconds) read ahead for the plan
        self.seconds = 0.0  # duration of the last executed iteration

    # ---- the plan's calls ----------------------------------------------------------------------
    def _prepare(self, plan: Plan) -> None:
        latency, calls = self.latency, []
        if plan.encode:
            rows = sum(s.unet_rows for s in plan.encode)
            calls.append(("encode", rows, latency.encode(rows)))
        groups: dict[tuple[int, int], list[_SimState]] = {}
        for state in plan.decode:
            groups.setdefault((state.params.height, state.params.width), []).append(state)
        for (h, w), group in groups.items():
            cap = self.max_decode_batch or len(group)
            for i in range(0, len(group), cap):
                pixels = len(group[i:i + cap]) * h * w
                calls.append(("decode", pixels, latency.decode(pixels)))
        if plan.gate:
            calls.append(("gate", len(plan.gate), latency.gate(len(plan.gate))))
        for batch in plan.denoise:
            model, h, w = batch[0].bucket
            rows = sum(s.unet_rows for s in batch)
            calls.append(("unet", (model, h, w, rows), latency.unet(model, h, w, rows)))
        if plan.patched:
            grid, scale = self.scheduler.patch_grid, self.scheduler.latent_scale
            px = grid.tile * scale
            for batch in plan.patched:
                rows = sum(s.unet_rows * grid.count(s.params.height // scale, s.params.width // scale)
                           for s in batch)
                calls.append(("unet", (batch[0].model, px, px, rows), latency.unet(batch[0].model, px, px, rows)))
        self._plan, self.calls = plan, calls
        self._canon = sorted(range(len(calls)), key=lambda i: calls[i][:2])
        self._fixed = None
        self._ahead.clear()
        if self._draw is None and not (plan.entropy or plan.gate):
            self._fixed = self._output(plan, [seconds for _, _, seconds in calls])
            self._fixed_seconds = self._sum([seconds for _, _, seconds in calls])

    def _factors(self, start: int, n: int) -> list[float]:
        """n noise factors from position `start` after the head of the stream (drawing as needed)."""
        need = self._head + start + n - len(self._buffer)
        if need > 0:
            self._buffer.extend(self._draw() for _ in range(need))
        return self._buffer[self._head + start:self._head + start + n]

    def _times(self, start: int) -> list[float]:
        """The calls' times of the iteration `start` iterations ahead, in run order."""
        times = [seconds for _, _, seconds in self.calls]
        if self._draw is not None:
            for i, factor in zip(self._canon, self._factors(start * len(times), len(times))):
                times[i] *= factor
        return times

    def _sum(self, times: list[float]) -> float:
        """The iteration's duration. As the runner pipelines them, the side stages (encode, decode, gate) run
        beside the UNet calls, and the iteration lasts as long as the longer of the two, plus the share of
        the shorter that the host does not overlap (the profile's `side_share`: 0 on a GPU with a free core,
        0.25-0.34 measured on the 2-core CPU host, whose cores both kinds of call share)."""
        unet = side = 0.0
        for i in self._canon:  # the plan's order does not change the sum, not even in its last bit
            if self.calls[i][0] == "unet":
                unet += times[i]
            else:
                side += times[i]
        if unet <= 0:
            return side
        return max(unet, side) + self.latency.side_share * min(unet, side)

    def durations(self, plan: Plan, k: int) -> list[float]:
        """The durations of the next k executions of `plan`, without consuming the noise stream."""
        if plan is not self._plan:
            self._prepare(plan)
        if self._draw is None:
            return [self._sum(self._times(0))] * k
        for i in range(len(self._ahead), k):
            times = self._times(i)
            self._ahead.append((times, self._sum(times)))
        return [seconds for _, seconds in itertools.islice(self._ahead, k)]

    # ---- one iteration ---------------------------------------------------------------------------
    def execute(self, plan: Plan) -> RunnerOutput:
        if plan is not self._plan:
            self._prepare(plan)
        if self._fixed is not None:
            self.seconds = self._fixed_seconds
            return self._fixed
        if self._ahead:
            times, self.seconds = self._ahead.popleft()
        else:
            times = self._times(0)
            self.seconds = self._sum(times)
        if self._draw is not None:  # consume this iteration's factors
            self._head += len(times)
            if self._head > 4096:
                del self._buffer[:self._head]
                self._head = 0
        return self._output(plan, times)

    def _output(self, plan: Plan, times: list[float]) -> RunnerOutput:
        out = RunnerOutput()
        for state in plan.encode:
            out.encoded[state] = state.params.steps
        for batches in (plan.denoise, plan.patched):
            for batch in batches:
                for state in batch:
                    out.stepped[state] = None
        for state in plan.entropy:
            out.stepped[state] = self._entropy(state)
        for state in plan.decode:
            out.images[state] = None
        if plan.gate:
            threshold = self.scheduler.router.threshold
            for state in plan.gate:
                out.scores[state] = threshold - 1.0 if self.escalates(state, self.scheduler) else threshold
        if self.learn:
            denoise = 0.0
            for (kind, key, _), seconds in zip(self.calls, times):
                if kind == "unet":
                    out.unet_calls.append((key[:3], key[3], seconds))
                    denoise += seconds
                else:
                    out.stages.append((kind, key, seconds))
            out.denoise_s = denoise
            out.iteration_s = self._sum(times)  # the whole iteration, as the engine measures it
        return out

    def _entropy(self, state: _SimState) -> float:
        """The latent's entropy after this evaluation: rising by more than the stop's threshold until
        the settle point, flat from there on."""
        stop = state.stopper
        step = 2.0 * abs(stop.threshold) + 1.0
        settle = self.settle(state)
        evaluation = state.steps_done + 1
        if settle is None:
            return evaluation * step
        return max(min(evaluation, settle - 1 - stop.patience), 0) * step

    def horizon(self, state: _SimState) -> int | None:
        """Steps done after which an entropy stop may first be decided (the simulated entropy is
        flat for a whole patience window from there); None if it never settles."""
        settle = self.settle(state)
        return None if settle is None else settle - 1


class _Gpu:
    """One simulated GPU: its scheduler and runner, the run of identical iterations in flight, and its
    counters."""

    __slots__ = ("index", "scheduler", "runner", "plan", "start", "durations", "ends", "done", "version",
                 "busy_s", "unet_calls", "unet_rows", "iterations")

    def __init__(self, index: int, scheduler: StepScheduler, runner: SimulatedRunner):
        self.index, self.scheduler, self.runner = index, scheduler, runner
        self.plan: Plan | None = None  # the plan every iteration of the run executes
        self.start = 0.0
        self.durations: list[float] = []  # of the run's iterations
        self.ends: list[float] | None = None  # end time of each iteration of the run; None: idle
        self.done = 0  # iterations of the run already applied (scheduler.update_from_output)
        self.version = 0  # invalidates the heap entry of a run that was cut short
        self.busy_s, self.unet_calls, self.unet_rows, self.iterations = 0.0, 0, 0, 0


class _Replay:
    """One replay of a trace. Every GPU runs the engine's loop: plan = scheduler.schedule(start);
    output = runner.execute(plan); scheduler.update_from_output(plan, output, start + seconds). Events at
    the same instant are simultaneous: iterations ending at t are applied (finished requests leave),
    then everything arriving at t is queued, then idle GPUs with work plan their next iteration.

    Speed: when a plan can only repeat (it only denoises, and neither the policy's order, an entropy
    stop, a request running out of steps nor the load controller can change the next one), the GPU runs
    it k times as one event: the runner executes the same plan k times and the scheduler applies each
    output with update_from_output, at that iteration's end time. The outputs are applied lazily: an
    arrival on that GPU first applies those that ended by then (admission sees the progress it would
    see iteration by iteration), and one that can join cuts the run after the iteration in flight."""

    def __init__(self, sim: Simulator, requests: list[SimRequest]):
        self.sim, self.requests, self.latency = sim, requests, sim.latency
        cascade = sim.cascade
        self.inplace = cascade is not None and cascade.heavy_gpus == 0  # the schedulers serve the cascade
        self.gpus = []
        for i in range(sim.gpus):
            scheduler = self._make_scheduler()
            if any(g.scheduler is scheduler for g in self.gpus):
                raise ValueError("make_scheduler: returned the same scheduler twice; each GPU needs its own")
            runner = SimulatedRunner(scheduler, self.latency, self.latency.factor_stream(i), self._settle,
                                     self._escalates, sim.learn, sim.max_decode_batch)
            self.gpus.append(_Gpu(i, scheduler, runner))
        split = cascade.heavy_gpus if cascade is not None else 0
        every = list(range(len(self.gpus)))
        self.pools = [every[:len(every) - split], every[len(every) - split:] if split else every]
        self.turn = [0, 0]  # round robin position per pool
        self.load = [0] * len(self.gpus)  # requests waiting or running per GPU (a C-level min over 64 is cheap)
        # Each request's gate outcome is drawn before the replay, so the same requests escalate whatever the
        # GPUs do: a quantile, below the escalation rate escalates.
        rng = random.Random(cascade.seed if cascade else 0)
        self.quantile = [rng.random() if cascade and r.escalate is None else 0.0 for r in requests]
        self.records = [SimRecord(i, r.arrival, r.slo_ms) for i, r in enumerate(requests)]
        self.heap: list[tuple] = []
        self.seq = itertools.count()
        self.to_start: set[int] = set()
        self.redispatch: list[_SimState] = []  # heavy_gpus > 0: escalated light answers for the heavy GPUs
        self.light_answers = self.escalations = 0

    def _make_scheduler(self) -> StepScheduler:
        cascade = self.sim.cascade
        if not self.inplace:
            scheduler = self.sim.make_scheduler()
        else:
            pair = Cascade(cascade.light_model, cascade.heavy_model)
            try:
                scheduler = self.sim.make_scheduler(cascade=pair)
            except TypeError as exc:
                raise ValueError(f"make_scheduler: cannot make a cascade scheduler ({exc}); with a cascade it is "
                                 "called as make_scheduler(cascade=Cascade(light, heavy)), as scheduler_factory's "
                                 "schedulers are") from None
            if isinstance(scheduler, StepScheduler) and scheduler.cascade != pair:
                raise ValueError(f"make_scheduler: returned a scheduler serving cascade {scheduler.cascade}; "
                                 f"expected {pair}")
        if not isinstance(scheduler, StepScheduler):
            raise ValueError(f"make_scheduler: returned {type(scheduler).__name__}; expected a StepScheduler")
        return scheduler

    # ---- what the simulated runner reports --------------------------------------------------------
    def _settle(self, state: _SimState) -> int | None:
        """Evaluations the request's entropy stop should run: its steps_run, or auto_steps(steps)."""
        if not state.settle_known:
            run = self.requests[state.index].steps_run
            if run is None and self.sim.auto_steps is not None:
                steps = state.params.steps
                run = self.sim.auto_steps(steps)
                if not (_is_int(run) and run >= 1):
                    raise ValueError(f"auto_steps: returned {run!r} for {steps} steps; expected an integer >= 1")
            state.settle, state.settle_known = run, True
        return state.settle

    def _escalates(self, state: _SimState, scheduler: StepScheduler) -> bool:
        """The gate's verdict on a light answer: the request's own `escalate`, else its quantile against
        the escalation rate of the operating point in force (the controller's, else the CascadeSpec's)."""
        request = self.requests[state.index]
        if request.escalate is not None:
            return request.escalate
        controller = scheduler.controller
        rate = self.sim.cascade.escalation_rate
        if controller is not None and controller.last is not None:
            rate = controller.last.option.escalation
        return self.quantile[state.index] < rate

    # ---- event loop ----------------------------------------------------------------------------
    def run(self) -> SimResult:
        order = sorted(range(len(self.requests)), key=lambda i: self.requests[i].arrival)
        i, n = 0, len(order)
        while i < n or self.heap:
            t = min(self.requests[order[i]].arrival if i < n else math.inf,
                    self.heap[0][0] if self.heap else math.inf)
            # 1. Runs ending now: their last iterations are applied; finished requests leave.
            while self.heap and self.heap[0][0] <= t:
                _, _, g, version = heapq.heappop(self.heap)
                gpu = self.gpus[g]
                if version == gpu.version:
                    self._finish_run(gpu)
                    self.to_start.add(g)
            # 2. Escalated answers go to the heavy GPUs; arrivals are queued on their GPU.
            redispatch, self.redispatch = self.redispatch, []
            for state in redispatch:
                self._dispatch(state, t, pool=1, prefix="escalation_")
            while i < n and self.requests[order[i]].arrival <= t:
                index = order[i]
                self._dispatch(self._state(index), t)
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

    def _state(self, index: int, model: str | None = None, received: float | None = None) -> _SimState:
        r = self.requests[index]
        params = GenerationParams(prompt="", height=r.height, width=r.width, steps=r.steps,
                                  guidance_scale=r.guidance_scale, slo_ms=r.slo_ms, priority=r.priority,
                                  min_steps=r.min_steps, step_mode=r.step_mode, min_quality=r.min_quality,
                                  slo_class=r.slo_class)
        return _SimState(request_id=f"q{index}", params=params, sink=_SINK, input_ids=None,
                         model=model or r.model, received=received, cascade=self.inplace and model is None,
                         index=index)

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
        scheduler = gpu.scheduler
        try:
            scheduler.add(state, now)
            queued = True
        except ServingError as exc:  # QueueFull ("queue_full"), Rejected ("slo"), closed
            record.rejected = prefix + exc.reason
            queued = False
        if queued:
            self.load[gpu.index] += 1
        if gpu.ends is None:
            if queued:
                self.to_start.add(gpu.index)
        elif gpu.done + 1 < len(gpu.ends):
            if queued and len(scheduler.running) < scheduler.max_active:
                # A free slot: it joins at the next step boundary, so the run ends with the iteration in flight.
                del gpu.ends[gpu.done + 1:]
                self._push(gpu)
            else:
                self._bound(gpu)  # the arrival (even a rejected one) may have opened the controller's window

    def _push(self, gpu: _Gpu) -> None:
        gpu.version += 1
        heapq.heappush(self.heap, (gpu.ends[-1], next(self.seq), gpu.index, gpu.version))

    # ---- iterations ------------------------------------------------------------------------------
    def _start(self, gpu: _Gpu, now: float) -> None:
        """Plan one iteration and repeat it as long as the next plan can only be the same; schedule the end."""
        plan = gpu.scheduler.schedule(now)
        if plan.empty:
            raise RuntimeError(f"gpu {gpu.index}: the scheduler has work but planned nothing at t={now}")
        durations = gpu.runner.durations(plan, self._repeats(gpu, plan))
        gpu.plan, gpu.start, gpu.durations, gpu.done = plan, now, durations, 0
        gpu.ends = list(itertools.accumulate(durations, initial=now))[1:]  # sums in order, like a clock
        if len(gpu.ends) > 1:
            self._bound(gpu, push=False)
        self._push(gpu)

    def _bound(self, gpu: _Gpu, push: bool = True) -> None:
        """A load controller decides at the first schedule() at or after its window closes: the run ends
        with the iteration that ends there, so that schedule() happens."""
        controller = gpu.scheduler.controller
        due = None if controller is None else controller.due_at()
        if due is None:
            return
        last = bisect.bisect_left(gpu.ends, True, gpu.done, key=lambda end: end >= due)
        if last + 1 < len(gpu.ends):
            del gpu.ends[last + 1:]
            if push:
                self._push(gpu)

    def _repeats(self, gpu: _Gpu, plan: Plan) -> int:
        """How many iterations in a row execute exactly this plan: 1 unless it only denoises and its
        batches cannot change with the policy's order (which may shift with time); then until the first
        request runs out of steps or its entropy may settle."""
        if plan.encode or plan.decode or plan.cancelled or plan.restart or plan.gate:
            return 1
        scheduler = gpu.scheduler
        batches: dict[tuple, list[list]] = {}
        for batch in plan.denoise:
            batches.setdefault(batch[0].bucket, []).append(batch)
        for group in batches.values():
            if len(group) > 1 and len({s.unet_rows for batch in group for s in batch}) > 1:
                return 1
        models = [batch[0].model for batch in plan.patched]
        if len(models) != len(set(models)):
            return 1
        if scheduler.hybrid == "auto":  # the bucket-or-patch choice follows the predictor, which learns
            buckets = {s.bucket for s in plan.stepped}
            if len({b[0] for b in buckets}) != len(buckets):
                return 1
        repeats = math.inf
        measured = set(plan.entropy)
        for state in plan.stepped:
            if state.stopper is not None and state not in measured:  # its last step: the target drops
                return 1
            repeats = min(repeats, state.steps_target - state.steps_done)
        for state in plan.entropy:
            settle = gpu.runner.horizon(state)
            if settle is not None:
                repeats = min(repeats, settle - state.steps_done)
        return max(1, repeats)

    def _catch_up(self, gpu: _Gpu, now: float) -> None:
        """Apply the iterations of the run in flight that ended by `now` (never its last: its event does)."""
        if gpu.ends is None:
            return
        upto = min(bisect.bisect_right(gpu.ends, now, gpu.done), len(gpu.ends) - 1)
        self._apply(gpu, upto)

    def _apply(self, gpu: _Gpu, upto: int) -> None:
        """The engine's second half for iterations done..upto-1 of the run: the runner's output goes to
        the scheduler at the iteration's end."""
        plan, scheduler, runner = gpu.plan, gpu.scheduler, gpu.runner
        while gpu.done < upto:
            output = runner.execute(plan)
            update = scheduler.update_from_output(plan, output, gpu.ends[gpu.done])
            gpu.done += 1
            if update.finished or update.failed or update.routed:
                self._collect(gpu, update)

    def _finish_run(self, gpu: _Gpu) -> None:
        self._apply(gpu, len(gpu.ends))
        calls = gpu.runner.calls
        unet = [key for kind, key, _ in calls if kind == "unet"]
        iterations = len(gpu.ends)
        for seconds in gpu.durations[:iterations]:  # one by one, as iteration by iteration would
            gpu.busy_s += seconds
        gpu.iterations += iterations
        gpu.unet_calls += iterations * len(unet)
        gpu.unet_rows += iterations * sum(key[3] for key in unet)
        gpu.plan, gpu.ends = None, None

    def _collect(self, gpu: _Gpu, update) -> None:
        """What the scheduler's update says happened: answers, failures, the gate's routing."""
        for state in update.routed:
            self.light_answers += 1
            self.escalations += state.escalated
        cascade = self.sim.cascade
        for state in update.finished + update.failed:
            self.load[gpu.index] -= 1
            record = self.records[state.index]
            if state.status is not Status.FINISHED:  # the simulated runner never fails a request
                raise RuntimeError(f"request {state.index} failed in the simulation: {state.error}")
            if state.escalated:
                record.escalated = True
            if (cascade is not None and not self.inplace and state.model == cascade.light_model):
                # DiffServe's split: the gate runs where the light model does; an escalated answer goes to
                # the heavy GPUs as a new request that keeps its first arrival and deadline.
                self.light_answers += 1
                if self._escalates(state, gpu.scheduler):
                    self.escalations += 1
                    record.escalated = True
                    self.redispatch.append(self._state(state.index, cascade.heavy_model, record.arrival))
                    continue
            record.finish, record.model, record.steps = state.times["finished"], state.model, state.steps_done

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
            "escalation_rate": (self.escalations / self.light_answers if self.light_answers else 0.0)
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
                    help="step_mode auto; the latent settles after this fraction of the steps (0..1] and the "
                         "scheduler's entropy stop ends the request there or where its thresholds first allow")
    ap.add_argument("--entropy-threshold", type=float, help="EntropyStop threshold (the server's entropy_threshold)")
    ap.add_argument("--entropy-patience", type=int, help="EntropyStop patience (the server's entropy_patience)")
    ap.add_argument("--entropy-min-fraction", type=float,
                    help="EntropyStop min_fraction (the server's entropy_min_fraction)")
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
    for name, value, ok, allowed in (("threshold", args.entropy_threshold, lambda v: v >= 0, ">= 0"),
                                     ("patience", args.entropy_patience, lambda v: v >= 0, ">= 0"),
                                     ("min-fraction", args.entropy_min_fraction, lambda v: 0 <= v <= 1, "0..1")):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ValueError(f"--entropy-{name}: {value} is not allowed; allowed {allowed}")
    entropy = {name: value for name, value in (("threshold", args.entropy_threshold),
                                               ("patience", args.entropy_patience),
                                               ("min_fraction", args.entropy_min_fraction)) if value is not None}
    make = scheduler_factory(latency.profile, args.policy, args.max_active, args.max_queue, args.max_batch,
                             entropy=entropy)
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
                         "auto_steps": args.auto_steps, "entropy": entropy},
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
