"""Baselines served by the same server, so every benchmark compares like with like:

  baseline_sequential  a plain diffusers StableDiffusionPipeline loop, one request at a time
  baseline_batching    whole-request dynamic batching with fixed steps (Triton's dynamic batcher hands
                       the model several requests; same-shape ones run as one pipeline call to the end),
                       the shape of NVIDIA's reference deployment

They validate requests with the orchestrator's own rules and answer with the same image and metadata
outputs; what they lack is everything the orchestrator adds (step-level batching, SLO scheduling,
admission control, cascades, early stop)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .params import GenerationParams
from .sampling import SCHEDULER_CLASSES

MODES = ("sequential", "batching")


class DiffusersBaseline:
    def __init__(self, folder: str | Path, device: str = "cpu"):
        from diffusers import StableDiffusionPipeline

        folder = Path(folder)
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(f"{folder}: no diffusers pipeline (model_index.json); export with --baselines")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, safety_checker=None,
                                                            requires_safety_checker=False).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.pipe.scheduler.config)

    @staticmethod
    def _group_key(p: GenerationParams) -> tuple:
        return (p.height, p.width, p.steps, p.guidance_scale, p.scheduler)

    def generate(self, requests: list[GenerationParams]) -> list[tuple[np.ndarray, dict]]:
        """Images (H, W, 3) uint8 and metadata, in request order. Requests that share shape, steps,
        guidance and scheduler run as one pipeline call; the others one call each."""
        groups: dict[tuple, list[int]] = {}
        for i, params in enumerate(requests):
            groups.setdefault(self._group_key(params), []).append(i)
        results: list = [None] * len(requests)
        for (height, width, steps, guidance, scheduler), members in groups.items():
            start = time.perf_counter()
            batch = [requests[i] for i in members]
            self.pipe.scheduler = SCHEDULER_CLASSES[scheduler].from_config(self.scheduler_config)
            output = self.pipe(prompt=[p.prompt for p in batch], negative_prompt=[p.negative_prompt for p in batch],
                               height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                               generator=[torch.Generator().manual_seed(p.seed) for p in batch], output_type="np")
            elapsed_ms = round((time.perf_counter() - start) * 1000.0, 3)
            for i, image in zip(members, output.images):
                p = requests[i]
                results[i] = ((np.clip(image, 0, 1) * 255).round().astype(np.uint8),
                              {"seed": p.seed, "steps": p.steps, "steps_done": p.steps, "height": p.height,
                               "width": p.width, "batch": len(members), "slo_ms": p.slo_ms,
                               "timings_ms": {"total": elapsed_ms}})
        return results
