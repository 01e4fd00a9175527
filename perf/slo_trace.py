"""SLO trace replay, three systems side by side in one run on the same components and device:

  naive            a plain diffusers StableDiffusionPipeline loop, one request at a time (the seeds' SD baseline)
  request_batching whole-request dynamic batching with fixed steps: same-resolution requests queued at
                   dispatch run together to completion (the shape of NVIDIA's reference), torch runtime
  step_batching    this project's engine: step-level batching, EDF, SLO admission, pipelined stages

A Poisson trace of mixed resolutions is replayed at each rate; each system reports SLO attainment,
goodput (requests/s that met the SLO), p50/p99 latency, and the highest rate that kept 99% attainment.

GPU host (SD1.5 architecture, random weights, fp16, CUDA graphs):
    python perf/slo_trace.py --preset sd15 --device cuda --sizes 512,768 --steps 50 --slo-ms 5000 \
        --rates 0.25,0.5,1,1.5,2,3 --duration 60 --out perf/results/slo_trace_h100.json
CPU smoke (tiny preset):
    python perf/slo_trace.py --preset tiny --sizes 64,128 --steps 10 --slo-ms 2000 --rates 1,4 --duration 5
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from triffusion import contract
from triffusion.export.onnx_export import TextEncoderComponent, UNetComponent, VaeDecoderComponent
from triffusion.export.presets import build_preset
from triffusion.export.tokenizer import write_tokenizer
from triffusion.orchestrator.engine import make_engine
from triffusion.orchestrator.executor import RuntimeExecutor
from triffusion.orchestrator.params import GenerationParams
from triffusion.orchestrator.policies import create_policy
from triffusion.orchestrator.request import RequestState
from triffusion.orchestrator.runner import PipelineSpec
from triffusion.orchestrator.sampling import Sampler, to_uint8_image
from triffusion.orchestrator.scheduler import QueueFull, Rejected, StepScheduler
from triffusion.orchestrator.text import PromptTokenizer
from triffusion.runtime import TorchRuntime


@dataclass
class Arrival:
    index: int
    at: float  # seconds after the trace starts
    size: int


@dataclass
class Outcome:
    latency_s: float | None = None  # None: rejected or failed
    done: threading.Event = field(default_factory=threading.Event)


def poisson_trace(rate: float, duration: float, sizes: list[int], seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration:
        arrivals.append(Arrival(len(arrivals), t, rng.choice(sizes)))
        t += rng.expovariate(rate)
    return arrivals


class Setup:
    """The components once, shared by every system: torch modules, runtimes, tokenizer."""

    def __init__(self, preset: str, device: str, sizes: list[int], max_batch: int, graphs: bool):
        self.pipeline = build_preset(preset, seed=0)
        self.device = device
        self.tokenizer_dir = Path(tempfile.mkdtemp()) / "tokenizer"
        write_tokenizer(self.tokenizer_dir)
        self.tokenizer = PromptTokenizer(self.tokenizer_dir)
        vae_scale = 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)
        channels, hidden = self.pipeline.unet.config.in_channels, self.pipeline.text_encoder.config.hidden_size
        unet_graphs = [{"sample": (rows, channels, s // vae_scale, s // vae_scale), "timestep": (rows,),
                        "encoder_hidden_states": (rows, contract.TEXT_MAX_LENGTH, hidden)}
                       for s in sizes for rows in (2, 4, 8, 16) if rows <= max_batch] if graphs else []
        make = lambda component, shapes=(): TorchRuntime(component.module, component.input_names,
                                                         component.output_names, device=device, graph_shapes=shapes)
        self.executor = RuntimeExecutor(make(TextEncoderComponent(self.pipeline.text_encoder)),
                                        {"unet": make(UNetComponent(self.pipeline.unet), unet_graphs)},
                                        make(VaeDecoderComponent(self.pipeline.vae)))
        self.spec = PipelineSpec(model=preset, scheduler_config=dict(self.pipeline.scheduler.config),
                                 latent_channels=channels, vae_scale_factor=vae_scale,
                                 vae_scaling_factor=self.pipeline.vae.config.scaling_factor)

    def diffusers_pipeline(self):
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTokenizer

        p = self.pipeline
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        pipe = StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, unet=p.unet, scheduler=p.scheduler,
                                       tokenizer=CLIPTokenizer.from_pretrained(str(self.tokenizer_dir)),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = pipe.to(self.device, dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def params_for(arrival: Arrival, steps: int, slo_ms: int) -> GenerationParams:
    return GenerationParams(prompt=f"a lighthouse on a cliff, request {arrival.index}", height=arrival.size,
                            width=arrival.size, steps=steps, seed=arrival.index, slo_ms=slo_ms)


def replay(arrivals: list[Arrival], submit) -> tuple[list[Outcome], float]:
    """Call submit(arrival, outcome, start) at each arrival time; return outcomes once all are done."""
    outcomes = [Outcome() for _ in arrivals]
    start = time.monotonic()
    for arrival, outcome in zip(arrivals, outcomes):
        delay = start + arrival.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the trace's own clock: requests arrive when the trace says
        submit(arrival, outcome, start)
    for outcome in outcomes:
        outcome.done.wait()
    return outcomes, time.monotonic() - start


def finish(outcome: Outcome, arrival: Arrival, start: float, ok: bool = True) -> None:
    outcome.latency_s = (time.monotonic() - start - arrival.at) if ok else None
    outcome.done.set()


def run_worker(arrivals, serve_batch, pick) -> tuple[list[Outcome], float]:
    """A single worker thread for the baselines: `pick` chooses the next batch from the queue."""
    pending: "queue.Queue[tuple]" = queue.Queue()

    def worker():
        while True:
            item = pending.get()
            if item is None:
                return
            batch = pick(item, pending)
            serve_batch([a for a, _, _ in batch])
            for arrival, outcome, start in batch:
                finish(outcome, arrival, start)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    outcomes, wall = replay(arrivals, lambda a, o, s: pending.put((a, o, s)))
    pending.put(None)
    thread.join()
    return outcomes, wall


def naive(setup: Setup, arrivals, steps, slo_ms, max_batch):
    pipe = setup.diffusers_pipeline()

    def serve(batch):
        (a,) = batch
        pipe(prompt=params_for(a, steps, slo_ms).prompt, height=a.size, width=a.size, num_inference_steps=steps,
             guidance_scale=7.5, generator=torch.Generator().manual_seed(a.index), output_type="np")

    return run_worker(arrivals, serve, lambda first, q: [first])


def request_batching(setup: Setup, arrivals, steps, slo_ms, max_batch):
    ex, spec = setup.executor, setup.spec

    def pick(first, pending):
        """The oldest request plus every queued one of its resolution, up to the batch limit."""
        batch, later = [first], []
        while True:
            try:
                item = pending.get_nowait()
            except queue.Empty:
                break
            if item is None or item[0].size != first[0].size or 2 * (len(batch) + 1) > max_batch:
                later.append(item)
            else:
                batch.append(item)
        for item in later:
            pending.put(item)
        return batch

    def serve(batch):
        params = [params_for(a, steps, slo_ms) for a in batch]
        ids = np.concatenate([setup.tokenizer.input_ids(p.prompt, "", True) for p in params])
        embeddings = torch.from_numpy(ex.encode(ids))
        latent = batch[0].size // spec.vae_scale_factor
        samplers = [Sampler(p, spec.scheduler_config, (spec.latent_channels, latent, latent)) for p in params]
        for i in range(samplers[0].total):
            inputs = [s.model_input(i) for s in samplers]
            noise = torch.from_numpy(ex.denoise("unet", torch.cat([x for x, _ in inputs]).numpy(),
                                                torch.cat([t for _, t in inputs]).numpy(), embeddings.numpy()))
            for s, part in zip(samplers, noise.chunk(len(samplers))):
                s.step(i, part)
        images = ex.decode((torch.cat([s.latents for s in samplers]) / spec.vae_scaling_factor).numpy())
        [to_uint8_image(torch.from_numpy(im)) for im in images]

    return run_worker(arrivals, serve, pick)


class _Sink:
    def __init__(self, outcome, arrival, start):
        self.outcome, self.arrival, self.start = outcome, arrival, start

    def progress(self, step, steps): ...
    def finish(self, image, metadata): finish(self.outcome, self.arrival, self.start)
    def preview(self, image): ...
    def fail(self, error): finish(self.outcome, self.arrival, self.start, ok=False)


def step_batching(setup: Setup, arrivals, steps, slo_ms, max_batch, profile=None):
    scheduler = StepScheduler(max_active=max_batch, max_queue=256, max_batch=max_batch, policy=create_policy("edf"))
    if profile:
        scheduler.predictor.seed(profile)
    engine = make_engine(setup.executor, setup.spec, scheduler)
    engine.start()

    def submit(arrival, outcome, start):
        params = params_for(arrival, steps, slo_ms)
        state = RequestState(f"q{arrival.index}", params, _Sink(outcome, arrival, start),
                             setup.tokenizer.input_ids(params.prompt, "", True))
        try:
            engine.submit(state)
        except (Rejected, QueueFull):
            finish(outcome, arrival, start, ok=False)

    try:
        result = replay(arrivals, submit)
    finally:
        engine.stop()
    return result, scheduler.predictor.to_profile()


def summarize(outcomes: list[Outcome], wall: float, slo_ms: int) -> dict:
    latencies = sorted(o.latency_s for o in outcomes if o.latency_s is not None)
    met = sum(1 for o in outcomes if o.latency_s is not None and o.latency_s * 1000 <= slo_ms)
    pct = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None
    return {"requests": len(outcomes), "attainment": round(met / max(len(outcomes), 1), 4),
            "goodput_rps": round(met / wall, 4), "rejected": sum(1 for o in outcomes if o.latency_s is None),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--slo-ms", type=int, default=2000)
    ap.add_argument("--rates", default="1,4")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--systems", default="naive,request_batching,step_batching")
    ap.add_argument("--no-graphs", action="store_true", help="skip CUDA graph capture")
    ap.add_argument("--out")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    setup = Setup(args.preset, args.device, sizes, args.max_batch, graphs=not args.no_graphs)
    report = {"bench": "slo_trace", "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.machine(),
              "preset": args.preset, "sizes": sizes, "steps": args.steps, "slo_ms": args.slo_ms,
              "duration_s": args.duration, "rates": rates, "systems": {}, "max_load_at_99": {}}
    systems = {"naive": naive, "request_batching": request_batching, "step_batching": step_batching}
    profile = None
    for name in args.systems.split(","):
        # Unrecorded warm-up: one request per size, so first-call costs stay out of the figures.
        warm = [Arrival(i, 0.0, size) for i, size in enumerate(sizes)]
        if name == "step_batching":
            _, profile = step_batching(setup, warm, args.steps, 10 ** 9, args.max_batch, profile)
        else:
            systems[name](setup, warm, args.steps, 10 ** 9, args.max_batch)
        rows = {}
        for rate in rates:
            arrivals = poisson_trace(rate, args.duration, sizes, seed=int(rate * 1000))
            if name == "step_batching":
                (outcomes, wall), profile = step_batching(setup, arrivals, args.steps, args.slo_ms, args.max_batch, profile)
            else:
                outcomes, wall = systems[name](setup, arrivals, args.steps, args.slo_ms, args.max_batch)
            rows[str(rate)] = summarize(outcomes, wall, args.slo_ms)
            print(f"{name:17s} rate {rate:6.2f}/s: {json.dumps(rows[str(rate)])}", flush=True)
        report["systems"][name] = rows
        ok = [r for r in rates if rows[str(r)]["attainment"] >= 0.99]
        report["max_load_at_99"][name] = max(ok) if ok else 0.0
    loads = report["max_load_at_99"]
    print("max load at 99% attainment (req/s): " + ", ".join(f"{k} {v}" for k, v in loads.items()))
    if loads.get("naive") and loads.get("step_batching"):
        print(f"step_batching / naive = {loads['step_batching'] / loads['naive']:.2f}x, "
              f"step_batching / request_batching = {loads['step_batching'] / max(loads['request_batching'], 1e-9):.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
