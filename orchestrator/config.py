"""The orchestrator's config.pbtxt parameters -> a ready engine. Plain Python, so a bad parameter fails
at model load with its name, and the Triton adapter stays thin."""

from __future__ import annotations

from .cascade import LoadController, options_from
from .engine import Engine, Observer, PipelineSpec
from .params import Limits
from .patches import PatchGrid
from .policies import create_policy
from .predictor import LatencyPredictor
from .scheduler import StepScheduler

DEFAULTS = {"max_active": "8", "max_queue": "64", "max_batch": "16", "policy": "edf", "hybrid": "bucket",
            "patch": "8", "halo": "4", "unet_executor": "bls", "runtime": "onnxruntime", "device": "cpu"}
ENTROPY = {"entropy_threshold": float, "entropy_patience": int, "entropy_min_fraction": float}
# Optional overrides of the pipeline's cascade: a fixed gate threshold, the controller's cadence and GPUs.
CASCADE = {"cascade_threshold": float, "controller_interval_s": float, "controller_gpus": int}


def check_parameters(params: dict[str, str]) -> dict[str, str]:
    known = set(DEFAULTS) | set(ENTROPY) | set(CASCADE)
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"unknown orchestrator parameter(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    return {**DEFAULTS, **params}


def cascade_of(params: dict[str, str], pipeline: dict) -> tuple[dict | None, LoadController | None]:
    """The pipeline's cascade (light, heavy, threshold) and, when it lists operating points, a controller.
    A `cascade_threshold` parameter fixes the threshold (benchmarks pick the escalated fraction)."""
    cascade = pipeline.get("cascade")
    if not cascade:
        return None, None
    cascade = dict(cascade)
    if "cascade_threshold" in params:
        cascade["threshold"] = float(params["cascade_threshold"])
        return cascade, None
    options = cascade.get("options")
    if not options:
        return cascade, None
    controller = LoadController(options_from(options), gpus=int(params.get("controller_gpus", 1)),
                                interval_s=float(params.get("controller_interval_s", 5.0)))
    return cascade, controller


def spec_of(pipeline: dict) -> PipelineSpec:
    return PipelineSpec(model=pipeline["model"], scheduler_config=pipeline["scheduler_config"],
                        latent_channels=pipeline["latent_channels"], vae_scale_factor=pipeline["vae_scale_factor"],
                        vae_scaling_factor=pipeline["vae_scaling_factor"])


def unets_of(pipeline: dict) -> dict[str, str]:
    """Request-facing UNet variant -> Triton model name ("cascade" starts on the light model)."""
    unets = dict(pipeline.get("unets", {"default": "unet"}))
    if pipeline.get("cascade"):
        unets["cascade"] = pipeline["cascade"]["light"]
    return unets


def build_engine(params: dict[str, str], pipeline: dict, executor, *, profile: dict | None = None,
                 observer: Observer | None = None) -> tuple[Engine, Limits]:
    params = check_parameters(params)
    spec = spec_of(pipeline)
    predictor = LatencyPredictor()
    if profile:  # measured at export; refined online from every call
        predictor.seed(profile)
    scheduler = StepScheduler(max_active=int(params["max_active"]), max_queue=int(params["max_queue"]),
                              max_batch=int(params["max_batch"]), policy=create_policy(params["policy"]),
                              predictor=predictor, hybrid=params["hybrid"],
                              patch_grid=PatchGrid(int(params["patch"]), int(params["halo"])),
                              latent_scale=spec.vae_scale_factor)
    # Entropy thresholds: the registry's per-family values, overridden by explicit parameters.
    entropy = dict(pipeline.get("registry", {}).get("entropy") or {})
    entropy.update({key.removeprefix("entropy_"): cast(params[key]) for key, cast in ENTROPY.items() if key in params})
    # An in-process torch UNet keeps per-request state on its device; everything else speaks numpy.
    device = params["device"] if params["unet_executor"] == "inprocess" and params["runtime"] == "torch" else None
    cascade, controller = cascade_of(params, pipeline)
    engine = Engine(executor, spec, scheduler, observer=observer, device=device, cascade=cascade,
                    controller=controller, entropy={name: entropy for name in unets_of(pipeline).values()})
    return engine, Limits.from_dict(pipeline.get("limits", {}))
