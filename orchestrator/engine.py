"""The engine loop: scheduler.schedule() -> executor calls -> state updates, on one thread.

New requests join at step boundaries, finished ones leave, and nobody waits for a whole batch."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .cascade import CascadeRouter, LoadController
from .executor import Executor
from .request import RequestState, Status
from .sampling import Sampler, latent_preview, to_uint8_image
from .scheduler import Plan, StepScheduler
from .stepping import EntropyStop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSpec:
    """What the engine needs to know about the served pipeline (from pipeline.json)."""

    model: str
    scheduler_config: dict
    latent_channels: int = 4
    vae_scale_factor: int = 8
    vae_scaling_factor: float = 0.18215


class Observer:
    """Hooks for metrics; the Triton adapter exports them on /metrics. Defaults do nothing."""

    def request_done(self, state: RequestState) -> None: ...
    def unet_call(self, bucket: tuple, rows: int, seconds: float) -> None: ...
    def stage(self, stage: str, seconds: float) -> None: ...
    def queue_depth(self, depth: int) -> None: ...
    def cascade(self, score: float, escalated: bool, router) -> None: ...
    def decision(self, decision) -> None: ...


class Engine:
    def __init__(self, executor: Executor, spec: PipelineSpec, scheduler: StepScheduler | None = None,
                 clock=time.monotonic, observer: Observer | None = None, pipelined: bool = True,
                 entropy: dict[str, dict] | None = None, device: str | None = None,
                 cascade: dict | None = None, controller: LoadController | None = None):
        self.executor, self.spec, self.clock = executor, spec, clock
        # Cascade: {"light": model, "heavy": model, "threshold": gate score below which the heavy redoes it}.
        self.cascade = cascade
        self.router = CascadeRouter(cascade["threshold"]) if cascade else None
        self.controller = controller  # re-chooses the threshold and step budget as demand changes
        self.step_budget: int | None = None
        # device: latents and text embeddings live there and the executor takes and returns torch tensors
        # (an in-process torch UNet); None: the executor speaks numpy (BLS, onnxruntime).
        self.device = torch.device(device) if device else None
        self.pipelined = pipelined
        self.entropy = entropy or {}  # model -> EntropyStop thresholds (step_mode "auto")
        self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triffusion-side")
        self.scheduler = scheduler or StepScheduler()
        self.predictor = self.scheduler.predictor
        self.observer = observer or Observer()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- intake (any thread) -------------------------------------------------------------
    def submit(self, state: RequestState) -> None:
        """Queue a request; raises QueueFull (bounded queue) or Rejected (SLO infeasible) at once."""
        with self._cv:
            now = self.clock()
            if self.controller is not None:
                self.controller.observe_arrival(now)
            if state.cascade and self.step_budget and state.params.steps > self.step_budget:
                state.degraded_from, state.params.steps = state.params.steps, self.step_budget
            try:
                self.scheduler.add(state, now)
            except Exception:
                state.enter(Status.REJECTED, now)
                self.observer.request_done(state)
                raise
            state.enter(Status.QUEUED, now)
            self.observer.queue_depth(self.scheduler.queue_depth)
            self._cv.notify()

    # ---- loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="triffusion-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread:
            self._thread.join(timeout_s)
        self._side.shutdown(wait=False)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self.scheduler.has_work and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    break
                self._control(self.clock())
                plan = self.scheduler.schedule(self.clock())
                self.observer.queue_depth(self.scheduler.queue_depth)
            self.execute(plan)
        for state in list(self.scheduler.waiting) + list(self.scheduler.running):
            self._fail(state, Status.FAILED, "server is shutting down")

    def _control(self, now: float) -> None:
        """Apply the load-adaptive controller's decision, when it makes one (every interval)."""
        if self.controller is None or self.router is None:
            return
        decision = self.controller.decide(now)
        if decision is not None:
            self.router.threshold = decision.option.threshold
            self.step_budget = decision.option.steps
            self.observer.decision(decision)

    def step(self) -> bool:
        """One iteration on the caller's thread (tests drive the engine this way)."""
        with self._cv:
            self._control(self.clock())
            plan = self.scheduler.schedule(self.clock())
        self.execute(plan)
        return not plan.empty

    def execute(self, plan: Plan) -> None:
        for state in plan.cancelled:
            self._fail(state, Status.CANCELLED, "cancelled by the client")
        # CPU-GPU pipelining: text encoding of joining requests and VAE decoding of finished ones run
        # on the side thread while this thread drives the UNet steps of the others. The three sets of
        # requests are disjoint, so no request state is touched from two threads at once.
        side = None
        if self.pipelined and (plan.encode or plan.decode) and (plan.denoise or plan.patched):
            side = self._side.submit(self._side_stages, plan)
        else:
            self._side_stages(plan)
        start = self.clock()
        for batch in plan.denoise:
            self._guarded(batch, self._denoise)
        for batch in plan.patched:
            self._guarded(batch, self._denoise_patched)
        stepped = [s for batch in plan.denoise + plan.patched for s in batch]
        if stepped:
            # Only the denoising part: encode and decode are predicted as stages of their own.
            with self._cv:
                self.scheduler.observe_iteration(stepped, self.clock() - start)
        if side is not None:
            side.result()

    def _side_stages(self, plan: Plan) -> None:
        self._guarded(plan.encode, self._encode)
        self._guarded(plan.decode, self._decode)

    def _guarded(self, states: list[RequestState], stage) -> None:
        """A failing model call fails the requests it carried; the engine keeps serving."""
        if not states:
            return
        try:
            stage(states)
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged here
            log.exception("%s failed", stage.__name__)
            for state in states:
                self._fail(state, Status.FAILED, f"{stage.__name__.strip('_')} failed: {exc}")

    # ---- stages ----------------------------------------------------------------------------
    def _encode(self, states: list[RequestState]) -> None:
        now = self.clock()
        for state in states:
            state.enter(Status.ENCODING, now)
        input_ids = np.concatenate([s.input_ids for s in states])
        embeddings = self.executor.encode(input_ids)
        elapsed = self.clock() - now
        self.predictor.observe_stage("encode", len(input_ids), elapsed)
        self.observer.stage("encode", elapsed)
        offset = 0
        h_w = lambda s: (s.params.height // self.spec.vae_scale_factor, s.params.width // self.spec.vae_scale_factor)
        for state in states:
            rows = state.input_ids.shape[0]
            state.text_embeddings = torch.from_numpy(embeddings[offset:offset + rows].copy())
            if self.device is not None:
                state.text_embeddings = state.text_embeddings.to(self.device)
            offset += rows
            state.sampler = Sampler(state.params, self.spec.scheduler_config,
                                    (self.spec.latent_channels, *h_w(state)), device=self.device or "cpu")
            state.steps_target = state.sampler.total
            if state.params.step_mode == "auto":
                state.stopper = EntropyStop(**self.entropy.get(state.model, {}))
            state.enter(Status.DENOISING, self.clock())

    def _denoise(self, states: list[RequestState]) -> None:
        inputs = [s.sampler.model_input(s.steps_done) for s in states]
        sample = torch.cat([x for x, _ in inputs])
        timestep = torch.cat([t for _, t in inputs])
        embeddings = torch.cat([s.text_embeddings for s in states])
        noise = self._unet(states[0].bucket, sample, timestep, embeddings)
        self._advance(states, list(noise.split([s.unet_rows for s in states])))

    def _denoise_patched(self, states: list[RequestState]) -> None:
        """One UNet call over the patches of requests of several resolutions."""
        grid = self.scheduler.patch_grid
        tiles, timesteps, embeddings, counts = [], [], [], []
        for state in states:
            sample, t = state.sampler.model_input(state.steps_done)
            patches = grid.split(sample)
            per_row = patches.shape[0] // sample.shape[0]
            tiles.append(patches)
            timesteps.append(t.repeat_interleave(per_row))
            embeddings.append(state.text_embeddings.repeat_interleave(per_row, dim=0))
            counts.append(patches.shape[0])
        tile_px = grid.tile * self.spec.vae_scale_factor
        noise = self._unet((states[0].model, tile_px, tile_px), torch.cat(tiles), torch.cat(timesteps),
                           torch.cat(embeddings))
        latent_size = lambda s: (s.params.height // self.spec.vae_scale_factor, s.params.width // self.spec.vae_scale_factor)
        self._advance(states, [grid.stitch(part, *latent_size(s)) for s, part in zip(states, noise.split(counts))])

    def _unet(self, bucket: tuple, sample, timestep, embeddings) -> torch.Tensor:
        start = self.clock()
        if self.device is not None:  # tensors stay on the device; the runtime returns when the GPU is done
            noise = self.executor.denoise(bucket[0], sample, timestep, embeddings)
        else:
            noise = torch.from_numpy(self.executor.denoise(bucket[0], sample.numpy(), timestep.numpy(),
                                                           embeddings.numpy()))
        elapsed = self.clock() - start
        model, h, w = bucket
        self.predictor.observe_unet(model, h, w, len(sample), elapsed)
        self.observer.unet_call(bucket, len(sample), elapsed)
        return noise

    def _advance(self, states: list[RequestState], noise: list[torch.Tensor]) -> None:
        for state, prediction in zip(states, noise):
            if state.last_step_pending:  # one last step: this evaluation lands on the clean sample
                state.sampler.last_step(state.steps_done, prediction)
                state.steps_done += 1
                state.steps_target = state.steps_done
            else:
                state.sampler.step(state.steps_done, prediction)
                state.steps_done += 1
                if (state.stopper is not None and state.steps_done < state.steps_target - 1
                        and state.stopper.observe(state.sampler.latents, state.steps_done, state.steps_target)):
                    state.last_step_pending = True
            if state.params.stream:
                state.sink.progress(state.steps_done, state.steps_target)
                every = state.params.preview_every
                if every and state.steps_done % every == 0 and state.steps_done < state.steps_target:
                    state.sink.preview(latent_preview(state.sampler.latents).numpy())

    def _decode(self, states: list[RequestState]) -> None:
        now = self.clock()
        for state in states:
            state.enter(Status.DECODING, now)
        # One VAE call per resolution: a batch must share a shape.
        by_size: dict[tuple[int, int], list[RequestState]] = {}
        for state in states:
            by_size.setdefault((state.params.height, state.params.width), []).append(state)
        for group in by_size.values():
            latents = torch.cat([s.sampler.latents for s in group]).cpu() / self.spec.vae_scaling_factor
            start = self.clock()
            images = torch.from_numpy(self.executor.decode(latents.numpy()))
            elapsed = self.clock() - start
            self.predictor.observe_stage("decode", len(group) * group[0].params.height * group[0].params.width,
                                         elapsed)
            self.observer.stage("decode", elapsed)
            pixels = [to_uint8_image(image).numpy() for image in images]
            gated = [i for i, state in enumerate(group) if state.cascade and not state.escalated]
            if gated:  # cascade: the gate scores the light model's answers in one call
                scores = self.executor.score(np.stack([pixels[i] for i in gated]),
                                             [group[i].params.prompt for i in gated])
                for i, score in zip(gated, scores):
                    group[i].gate_score = float(score)
            for state, image in zip(group, pixels):
                if state.cascade and not state.escalated:
                    escalate = self.router.route(state.gate_score) == "heavy"
                    self.observer.cascade(state.gate_score, escalate, self.router)
                    if escalate:
                        self._escalate(state)
                        continue
                state.enter(Status.FINISHED, self.clock())
                with self._cv:
                    self.scheduler.release(state)
                self.observer.request_done(state)
                state.sink.finish(image, self.metadata(state))

    def _escalate(self, state: RequestState) -> None:
        """Redo the request on the heavy model: it keeps its slot, its deadline and its text embeddings
        (the variants share the text encoder), and starts from the same seeded noise."""
        state.escalated, state.model = True, self.cascade["heavy"]
        h_w = (state.params.height // self.spec.vae_scale_factor, state.params.width // self.spec.vae_scale_factor)
        state.sampler = Sampler(state.params, self.spec.scheduler_config, (self.spec.latent_channels, *h_w),
                                device=self.device or "cpu")
        state.steps_done, state.steps_target, state.last_step_pending = 0, state.sampler.total, False
        if state.stopper is not None:
            state.stopper = EntropyStop(**self.entropy.get(state.model, {}))
        state.enter(Status.DENOISING, self.clock())

    def _fail(self, state: RequestState, status: Status, message: str) -> None:
        state.error = message
        state.enter(status, self.clock())
        with self._cv:
            self.scheduler.release(state)
        self.observer.request_done(state)
        state.sink.fail(status, message)

    def metadata(self, state: RequestState) -> dict:
        t = state.times
        ms = lambda a, b: round((t[b] - t[a]) * 1000.0, 3) if a in t and b in t else None
        p = state.params
        return {
            "request_id": state.request_id,
            "model": self.spec.model,
            "unet": state.model,
            "seed": p.seed,
            "steps": p.steps,
            "steps_done": state.steps_done,
            "early_stop": state.last_step_pending,
            "scheduler": p.scheduler,
            "guidance_scale": p.guidance_scale,
            "height": p.height,
            "width": p.width,
            "slo_ms": p.slo_ms,
            "slo_met": state.slo_met,
            "priority": p.priority,
            "degraded_from_steps": state.degraded_from,
            "cascade": ({"light": self.cascade["light"], "score": state.gate_score, "threshold": self.router.threshold,
                         "escalated": state.escalated} if state.cascade else None),
            "timings_ms": {
                "queue": ms("queued", "encoding"),
                "encode": ms("encoding", "denoising"),
                "denoise": ms("denoising", "decoding"),
                "decode": ms("decoding", "finished"),
                "total": ms("queued", "finished"),
            },
        }
