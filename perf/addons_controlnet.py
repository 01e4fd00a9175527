"""ControlNet parity (issue 14): our serving path against diffusers' StableDiffusionControlNetPipeline.

    python -m perf.addons_controlnet [--repo DIR] [--steps 8]

Exports the registry's `tiny-control` family (the tiny preset and the tiny ControlNet, seeded random weights;
about 20 s on 2 cores) unless --repo names one, then serves, in this process, with the exported ONNX
components and the orchestrator's own engine (scheduler, runner, batched sampler): a control request alone,
a plain request alone, and both in one batch. Each image is compared with diffusers' pipeline for the same
seed (StableDiffusionControlNetPipeline from the exported diffusers folder, resp. StableDiffusionPipeline).

Parity holds when every served image is within TOLERANCE of diffusers' (uint8 levels: onnxruntime against
torch rounds differently, about 1e-6 per call), every batched image equals its solo run within the same
tolerance, and the control image visibly changes the output (otherwise a ControlNet that adds nothing
would pass). `controlnet_parity()` is what perf/addons.py reports as `controlnet_parity_ok`.

The test through the real server is tests/integration/test_controlnet.py; both use `reference_image` and
`control_image` from here."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.inprocess import serve_fields

ROOT = Path(__file__).resolve().parents[1]
FAMILY = "tiny-control"
CONTROLNET = "canny"
# uint8 levels: max |served - diffusers| per pixel, and the mean over pixels
TOLERANCE_MAX, TOLERANCE_MEAN = 2, 0.5
# the control image must move the image by more than this (max uint8 levels) for the check to mean anything
MIN_CONTROL_EFFECT = 8


def control_image(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """A processed control map as users send one: white edges (a ring and a few lines, Canny-like) on black,
    (height, width, 3) uint8, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx, r = height * rng.uniform(0.35, 0.65), width * rng.uniform(0.35, 0.65), min(height, width) * 0.3
    edges = np.abs(np.hypot(yy - cy, xx - cx) - r) < 1.0
    for _ in range(3):
        a, b = rng.uniform(-1, 1), rng.uniform(0, height)
        edges |= np.abs(yy - (a * xx + b)) < 0.7
    return np.repeat((edges * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def export_family(out: Path) -> Path:
    """The registry's tiny-control family, exported like `make serve` exports tiny (no latency profile)."""
    from triffusion.export.__main__ import main as export_main

    export_main(["build", "--registry", str(ROOT / "registry.example.yaml"), "--family", FAMILY, "--out", str(out),
                 "--no-profile"])
    return out


def diffusers_folder(repo: Path) -> Path:
    """Where the export wrote the preset as a diffusers folder (ControlNets beside it)."""
    pipeline = json.loads((repo / "orchestrator" / "1" / "pipeline.json").read_text())
    return repo.parent / "models" / f"{pipeline['model']}-seed{pipeline['seed']}"


def reference_image(folder: Path, prompt: str, seed: int, steps: int, guidance_scale: float = 7.5,
                    height: int = 64, width: int = 64, negative_prompt: str = "", scheduler: str = "euler",
                    controlnet: str | None = None, image: np.ndarray | None = None, scale: float = 1.0,
                    lora: tuple = ()) -> np.ndarray:
    """diffusers' own pipeline for one request: StableDiffusionControlNetPipeline with the ControlNet model folder
    `controlnet` (under `folder`), else StableDiffusionPipeline; (H, W, 3) uint8 as the server rounds it.
    `lora`: (adapter, scale) pairs (triffusion.lora.Adapter) merged into the pipeline's UNet weights first."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()

    from triffusion.orchestrator.sampling import SCHEDULER_CLASSES

    options = {"safety_checker": None, "requires_safety_checker": False}
    if controlnet:
        model = ControlNetModel.from_pretrained(str(folder / controlnet))
        pipe = StableDiffusionControlNetPipeline.from_pretrained(str(folder), controlnet=model, **options)
        extra = {"image": Image.fromarray(image), "controlnet_conditioning_scale": scale}
    else:
        pipe, extra = StableDiffusionPipeline.from_pretrained(str(folder), **options), {}
    pipe.set_progress_bar_config(disable=True)
    for adapter, adapter_scale in lora:
        from triffusion import lora as lora_module

        lora_module.merge(pipe.unet, adapter, adapter_scale)
    pipe.scheduler = SCHEDULER_CLASSES[scheduler].from_config(pipe.scheduler.config)
    out = pipe(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_inference_steps=steps,
               guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed), output_type="np", **extra)
    return (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)


def serve_in_process(repo: Path, requests: list[dict]) -> list[tuple[np.ndarray, dict]]:
    """The requests (request fields, as a client sends them) submitted together to the orchestrator's engine
    over the exported ONNX components in this process; (image, metadata) each, in order."""
    from triffusion.orchestrator.config import OrchestratorConfig, build_engine
    from triffusion.orchestrator.executor import RuntimeExecutor
    from triffusion.orchestrator.params import Limits
    from triffusion.runtime import create_runtime

    pipeline = json.loads((repo / "orchestrator" / "1" / "pipeline.json").read_text())
    load = lambda name: create_runtime("onnxruntime", repo / pipeline["artifacts"][name])
    control = pipeline["control"]
    executor = RuntimeExecutor(load("text_encoder"), {"unet": load("unet"), control["unet"]: load(control["unet"])},
                               load("vae_decoder"), controlnets={m: load(m) for m in control["controlnets"].values()})
    engine, _ = build_engine(OrchestratorConfig(), pipeline, executor)
    return serve_fields(engine, Limits.from_dict(pipeline["limits"]), repo, requests, prefix="parity")


def diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return int(d.max()), float(d.mean())


def within(a: np.ndarray, b: np.ndarray) -> bool:
    worst, mean = diff(a, b)
    return worst <= TOLERANCE_MAX and mean <= TOLERANCE_MEAN


def parity_report(repo: Path | None = None, steps: int = 8, log=print) -> dict:
    """Served (in process) against diffusers, solo and batched; the numbers and whether parity holds."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="controlnet-parity-") as tmp:
        repo = repo or export_family(Path(tmp) / "model_repository")
        folder = diffusers_folder(repo)
        image = control_image(64, 64, seed=3)
        control = {"prompt": "a lighthouse on a cliff", "seed": 11, "steps": steps, "controlnet": CONTROLNET,
                   "controlnet_scale": 0.8, "control_image": image}
        plain = {"prompt": "a red bicycle", "seed": 5, "steps": steps}
        (solo_control, meta), = serve_in_process(repo, [control])
        (solo_plain, _), = serve_in_process(repo, [plain])
        (batched_control, _), (batched_plain, _) = serve_in_process(repo, [control, plain])
        model = json.loads((repo / "orchestrator/1/pipeline.json").read_text())["control"]["controlnets"][CONTROLNET]
        ref_control = reference_image(folder, control["prompt"], control["seed"], steps, controlnet=model, image=image,
                                      scale=control["controlnet_scale"])
        ref_plain = reference_image(folder, plain["prompt"], plain["seed"], steps)
        ref_uncontrolled = reference_image(folder, control["prompt"], control["seed"], steps)
    report = {
        "tolerance": {"max": TOLERANCE_MAX, "mean": TOLERANCE_MEAN},
        "control_vs_diffusers": diff(solo_control, ref_control),
        "plain_vs_diffusers": diff(solo_plain, ref_plain),
        "batched_control_vs_solo": diff(batched_control, solo_control),
        "batched_plain_vs_solo": diff(batched_plain, solo_plain),
        "control_effect": diff(ref_control, ref_uncontrolled),
        "metadata_controlnet": meta["controlnet"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    report["ok"] = bool(within(solo_control, ref_control) and within(solo_plain, ref_plain)
                        and within(batched_control, solo_control) and within(batched_plain, solo_plain)
                        and report["control_effect"][0] > MIN_CONTROL_EFFECT
                        and meta["controlnet"] == {"name": CONTROLNET, "model": model, "scale": 0.8})
    log(json.dumps(report))
    return report


def controlnet_parity(repo: Path | None = None) -> bool:
    """Whether the served ControlNet path matches diffusers' ControlNet pipeline (see the module doc)."""
    return parity_report(repo, log=lambda _: None)["ok"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, help="an exported tiny-control repository (default: export one)")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    return 0 if parity_report(args.repo, args.steps)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
