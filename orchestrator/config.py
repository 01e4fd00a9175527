"""One typed orchestrator config: defaults in one place, read from config.pbtxt parameters by the Triton
adapter and written by the export. A bad parameter fails at model load with its name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from triffusion.contract import TEXT_ENCODER_MAX_BATCH

from .cascade import LoadController, options_from
from .engine import Engine, Observer
from .group import EngineGroup
from .params import Limits
from .patches import PatchGrid
from .placement import PLACEMENTS
from .policies import POLICIES, create_policy
from .predictor import LatencyPredictor
from .quality import StepProfile
from .runner import PipelineSpec, Runner
from .scheduler import Cascade, StepScheduler

HYBRID = ("bucket", "patch", "auto")
UNET_EXECUTORS = ("bls", "inprocess")
RUNTIMES = ("onnxruntime", "torch")
SWITCH = ("on", "off")


@dataclass(frozen=True)
class OrchestratorConfig:
    max_active: int = 8  # requests denoising at once (slots)
    max_queue: int = 64  # requests waiting for a slot
    max_batch: int = 16  # UNet rows per call (CFG counts two rows per request)
    policy: str = "edf"  # fcfs, edf, srpt, priority
    hybrid: str = "bucket"  # bucket, patch, auto
    patch: int = 8  # latent pixels per patch side (hybrid patch/auto)
    halo: int = 4  # latent pixels of context around a patch
    unet_executor: str = "bls"  # bls: the UNet is its own Triton model; inprocess: it runs in the orchestrator
    runtime: str = "onnxruntime"  # what runs an in-process UNet
    device: str = "cpu"
    component_timeout_s: float = 60.0  # a component call that takes longer fails its requests (UNAVAILABLE)
    best_effort_s: float = 30.0  # edf: a request without slo_ms is ordered as if due this long after arrival
    max_decode_batch: int = 0  # largest VAE batch (the engine's profile); 0: no limit
    max_encode_rows: int = 0  # largest text-encoder batch in rows (the engine's profile); 0: its max_batch_size
    entropy_threshold: float | None = None  # step_mode auto; None: the registry's value or the default
    entropy_patience: int | None = None
    entropy_min_fraction: float | None = None
    cascade_threshold: float | None = None  # a fixed gate threshold; None: the pipeline's, or the controller's
    controller_interval_s: float = 5.0
    controller_gpus: int = 1
    # Features, on in service; the SLO benchmark turns one off at a time to measure what each adds.
    admission: str = "on"  # SLO admission control (reject what cannot meet its SLO, degrade steps to meet it)
    # Admission plans every request to finish this fraction of its SLO early: the forecast's spread (a
    # noisy neighbour, a slow gate call) lands in the slack instead of past the deadline.
    admission_headroom: float = 0.2
    auto_steps: str = "on"  # step_mode auto: the entropy stop and the SLO class's quality floor
    cascade_routing: str = "on"  # unet=cascade starts on the light model; off: the heavy model answers
    # Many devices in one orchestrator: an engine per device (cuda -> cuda:0..devices-1; cpu: stand-ins), each
    # request placed by `placement` (orchestrator.placement). 1: the single-engine path.
    devices: int = 1
    placement: str = "least_finish"
    # Every CPU session of the served repository (ONNX Runtime components, the gate's torch): intra-op threads
    # (0: the cores in the process's CPU mask) and whether idle ONNX Runtime workers spin. A CPU server runs
    # several models at once; one thread each served more than a spinning pool each (triffusion.runtime).
    threads: int = 0
    spinning: str = "on"

    def __post_init__(self):
        checks = {"policy": tuple(POLICIES), "hybrid": HYBRID, "unet_executor": UNET_EXECUTORS, "runtime": RUNTIMES,
                  "admission": SWITCH, "auto_steps": SWITCH, "cascade_routing": SWITCH, "placement": tuple(PLACEMENTS),
                  "spinning": SWITCH}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"orchestrator parameter {name}: '{getattr(self, name)}' is unknown; "
                                 f"choose one of: {', '.join(allowed)}")
        for name in ("max_active", "max_queue", "max_batch", "patch", "controller_gpus", "devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"orchestrator parameter {name}: {getattr(self, name)} is out of range; allowed >= 1")
        for name in ("halo", "max_decode_batch", "max_encode_rows", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"orchestrator parameter {name}: {getattr(self, name)} is out of range; allowed >= 0")
        if not 0 <= self.admission_headroom < 1:
            raise ValueError(f"orchestrator parameter admission_headroom: {self.admission_headroom} is out of range; "
                             "allowed 0 <= x < 1")
        for name in ("component_timeout_s", "best_effort_s", "controller_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"orchestrator parameter {name}: {getattr(self, name)} is out of range; allowed > 0")

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "OrchestratorConfig":
        """From config.pbtxt string parameters; unknown keys and unparsable values are named."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"unknown orchestrator parameter(s): {', '.join(unknown)}; known: {', '.join(known)}")
        values = {}
        for name, text in params.items():
            kind = _kind(known[name])
            if kind is not str and text in ("", "none", "None"):
                values[name] = None
                continue
            try:
                values[name] = kind(text)
            except ValueError:
                raise ValueError(f"orchestrator parameter {name}: '{text}' is not a {kind.__name__}") from None
        return cls(**values)

    def to_parameters(self) -> dict[str, str]:
        """config.pbtxt parameters: every field that is set."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    def replace(self, **changes) -> "OrchestratorConfig":
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown orchestrator parameter(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @property
    def entropy(self) -> dict:
        values = {"threshold": self.entropy_threshold, "patience": self.entropy_patience,
                  "min_fraction": self.entropy_min_fraction}
        return {k: v for k, v in values.items() if v is not None}

    @property
    def engine_device(self) -> str | None:
        """An in-process torch UNet keeps per-request state on its device; everything else speaks numpy."""
        return self.device if self.unet_executor == "inprocess" and self.runtime == "torch" else None


def _kind(f) -> type:
    annotation = str(f.type)
    return int if annotation.startswith("int") else float if annotation.startswith("float") else str


def cascade_of(config: OrchestratorConfig, pipeline: dict) -> tuple[Cascade | None, float, LoadController | None]:
    """The pipeline's cascade (light, heavy), its gate threshold and, when the pipeline lists operating points
    and no fixed threshold is configured, the load-adaptive controller that re-chooses it."""
    cascade = pipeline.get("cascade")
    if not cascade:
        return None, 0.5, None
    pair = Cascade(light=cascade["light"], heavy=cascade["heavy"])
    if config.cascade_threshold is not None:
        return pair, config.cascade_threshold, None
    threshold = float(cascade.get("threshold", 0.5))
    options = cascade.get("options")
    if not options:
        return pair, threshold, None
    controller = LoadController(options_from(options), gpus=config.controller_gpus,
                                interval_s=config.controller_interval_s)
    return pair, threshold, controller


def spec_of(pipeline: dict) -> PipelineSpec:
    control = pipeline.get("control") or {}
    return PipelineSpec(model=pipeline["model"], scheduler_config=pipeline["scheduler_config"],
                        latent_channels=pipeline["latent_channels"], vae_scale_factor=pipeline["vae_scale_factor"],
                        vae_scaling_factor=pipeline["vae_scaling_factor"],
                        controlnets=dict(control.get("controlnets", {})), control_unet=control.get("unet"))


def unets_of(pipeline: dict) -> dict[str, str]:
    """Request-facing UNet variant -> Triton model name ("cascade" starts on the light model)."""
    unets = dict(pipeline.get("unets", {"default": "unet"}))
    if pipeline.get("cascade"):
        unets["cascade"] = pipeline["cascade"]["light"]
    return unets


def build_scheduler(config: OrchestratorConfig, *, profile: dict | None = None, models=(), entropy: dict | None = None,
                    cascade: Cascade | None = None, threshold: float = 0.5, controller: LoadController | None = None,
                    latent_scale: int = 8, step_quality: dict | None = None) -> StepScheduler:
    """The scheduler the server runs for `config` (the simulator builds its GPUs' schedulers here too): a
    latency predictor seeded by the profile measured at export (refined online from every call), the policy,
    the patch grid, the entropy thresholds of every UNet in `models`, the step-quality profiles
    (pipeline.json `step_quality`, from `python -m perf.profile_steps`), and the cascade."""
    predictor = LatencyPredictor()
    if profile:
        predictor.seed(profile)
    policy = create_policy(config.policy, **({"best_effort_s": config.best_effort_s} if config.policy == "edf" else {}))
    return StepScheduler(max_active=config.max_active, max_queue=config.max_queue, max_batch=config.max_batch,
                         policy=policy, predictor=predictor, hybrid=config.hybrid,
                         patch_grid=PatchGrid(config.patch, config.halo), latent_scale=latent_scale,
                         cascade=cascade, threshold=threshold, controller=controller,
                         entropy={name: dict(entropy or {}) for name in models},
                         step_profiles={m: StepProfile.from_dict(p) for m, p in (step_quality or {}).items()},
                         admission=config.admission == "on", headroom=config.admission_headroom,
                         auto_steps=config.auto_steps == "on",
                         cascade_routing=config.cascade_routing == "on")


def build_engine(config: OrchestratorConfig, pipeline: dict, executor, *, profile: dict | None = None,
                 observer: Observer | None = None, clock=None) -> tuple[Engine, Limits]:
    spec = spec_of(pipeline)
    cascade, threshold, controller = cascade_of(config, pipeline)
    # Entropy thresholds: the registry's per-family values, overridden by explicit parameters.
    entropy = {**(pipeline.get("registry", {}).get("entropy") or {}), **config.entropy}
    scheduler = build_scheduler(config, profile=profile, models=unets_of(pipeline).values(), entropy=entropy,
                                cascade=cascade, threshold=threshold, controller=controller,
                                latent_scale=spec.vae_scale_factor, step_quality=pipeline.get("step_quality"))
    options = {} if clock is None else {"clock": clock}
    runner = Runner(executor, spec, device=config.engine_device, patch_grid=scheduler.patch_grid,
                    max_decode_batch=config.max_decode_batch or None,
                    max_encode_rows=config.max_encode_rows or TEXT_ENCODER_MAX_BATCH, **options)
    # Every call in an iteration has a deadline; a loop silent for longer than a few of them is wedged.
    engine = Engine(scheduler, runner, model=spec.model, observer=observer,
                    stuck_after_s=3 * config.component_timeout_s, **options)
    return engine, Limits.from_dict(pipeline.get("limits", {}))


def device_names(config: OrchestratorConfig) -> list[str]:
    """The devices of the orchestrator's engines: `device` alone, or cuda:0..N-1 (a CPU stand-in N times)."""
    if config.devices == 1:
        return [config.device]
    base = config.device.split(":")[0]
    return [f"{base}:{i}" if base == "cuda" else base for i in range(config.devices)]


def build_engines(config: OrchestratorConfig, pipeline: dict, executors: list, *, profile: dict | None = None,
                  observer: Observer | None = None, clock=None):
    """One engine per device (`executors`, one each, in device_names order): with one device exactly
    build_engine's engine; with more an EngineGroup placing requests by load, whose cascade split over the
    devices comes from a controller over all of them."""
    if len(executors) != config.devices:
        raise ValueError(f"executors: {len(executors)} for {config.devices} devices; give one per device")
    if config.devices == 1:
        return build_engine(config, pipeline, executors[0], profile=profile, observer=observer, clock=clock)
    engines = []
    for device, executor in zip(device_names(config), executors):
        engine, limits = build_engine(config.replace(device=device), pipeline, executor, profile=profile,
                                      observer=observer, clock=clock)
        engines.append(engine)
    _, _, split = cascade_of(config.replace(controller_gpus=max(config.devices, config.controller_gpus)), pipeline)
    return EngineGroup(engines, config.placement, controller=split), limits
