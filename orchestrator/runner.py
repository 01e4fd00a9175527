"""The runner executes a scheduler's plan and owns every tensor: per-request samplers and text
embeddings, classifier-free guidance, batch assembly, patch split and stitch, encode, decode, gate
calls and the numpy/torch boundary. It decides nothing: it returns per-request results or per-request
errors, so one request's failure never fails its batch neighbours.

Tensors are torch tensors on `device` from end to end: the GPU for an in-process torch UNet, the CPU
when the executor speaks numpy (BLS, onnxruntime), converted right at each executor call. One iteration
reads no number back to the host but where a decision needs one (the entropy of an early stop, a
preview) and, on the CPU, at the numpy executor's boundary: requests of a UNet batch whose samplers
share a step rule are scaled, guided and stepped together (`BatchedStep`).

A batched call that fails is retried one request at a time (unless the component is unavailable, which
fails everyone in it): the requests that fail alone fail, the others get their results."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from triffusion.contract import TEXT_ENCODER_MAX_BATCH

from .errors import Code, ComponentFailed, ServingError
from .sampling import BatchedStep, Sampler, latent_preview, to_uint8_image
from .scheduler import Plan, RunnerOutput
from .stepping import latent_entropy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSpec:
    """What the runner needs to know about the served pipeline (from pipeline.json)."""

    model: str
    scheduler_config: dict
    latent_channels: int = 4
    vae_scale_factor: int = 8
    vae_scaling_factor: float = 0.18215


@dataclass
class Slot:
    """One request's tensors while it runs."""

    embeddings: Any
    sampler: Sampler | None = None


def as_serving_error(component: str, exc: BaseException) -> ServingError:
    """What a client may read about a failed call: the component and a short reason, never a traceback,
    a path or an internal name (the full exception goes to the log)."""
    if isinstance(exc, ServingError):
        return exc
    return ComponentFailed(component, f"failed ({type(exc).__name__})")


def to_torch(value, device: torch.device | None = None) -> torch.Tensor:
    """An executor's output (numpy, or a torch tensor, possibly on a GPU through BLS) as a torch tensor on
    `device` (the CPU when None)."""
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    target = device or torch.device("cpu")
    return tensor if tensor.device == target else tensor.to(target)


class Runner:
    def __init__(self, executor, spec: PipelineSpec, *, device: str | None = None, pipelined: bool = True,
                 clock=time.monotonic, max_decode_batch: int | None = None, patch_grid=None,
                 max_encode_rows: int = TEXT_ENCODER_MAX_BATCH, batched_sampling: bool = True):
        self.executor, self.spec, self.clock = executor, spec, clock
        # device: latents and text embeddings live there and the executor takes and returns torch tensors
        # (an in-process torch UNet); None: the executor speaks numpy (BLS, onnxruntime) and the same torch
        # code runs on the CPU.
        self.torch_executor = device is not None
        self.device = torch.device(device or "cpu")
        # False: every request steps alone through its diffusers scheduler (the reference path).
        self.batched_sampling = batched_sampling
        self.pipelined = pipelined
        self.max_decode_batch = max_decode_batch  # the VAE engine's largest batch (TensorRT profiles)
        self.max_encode_rows = max_encode_rows  # the text encoder's max_batch_size
        self.patch_grid = patch_grid
        self._slots: dict[Any, Slot] = {}
        self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triffusion-side")

    def close(self) -> None:
        self._side.shutdown(wait=False)

    def release(self, states) -> None:
        for state in states:
            self._slots.pop(state, None)

    # ---- one plan ----------------------------------------------------------------------------
    def execute(self, plan: Plan) -> RunnerOutput:
        out = RunnerOutput()
        # CPU-GPU pipelining: text encoding of joining requests and VAE decoding of finished ones run on
        # the side thread while this thread drives the UNet steps of the others. The sets of requests
        # are disjoint, so no request's tensors are touched from two threads at once.
        side = None
        if self.pipelined and (plan.encode or plan.decode) and (plan.denoise or plan.patched):
            side = self._side.submit(self._side_stages, plan, out)
        else:
            self._side_stages(plan, out)
        start = self.clock()
        for state in plan.restart:
            self._guard(out, [state], "sampler", lambda s: self._new_sampler(s[0]))
        for batch in plan.denoise:
            self._denoise(batch, out, patched=False)
        for batch in plan.patched:
            self._denoise(batch, out, patched=True)
        out.denoise_s = self.clock() - start
        for state in plan.entropy:
            if state in out.stepped:
                out.stepped[state] = latent_entropy(self._slots[state].sampler.latents)
        for state in plan.previews:
            if state in out.stepped:
                self._guard(out, [state], "preview", lambda s: out.previews.__setitem__(
                    s[0], latent_preview(self._slots[s[0]].sampler.latents).numpy()))
        if side is not None:
            side.result()
        return out

    def _side_stages(self, plan: Plan, out: RunnerOutput) -> None:
        chunk, rows = [], 0
        for state in plan.encode + [None]:  # text encoder calls within its batch limit
            if chunk and (state is None or rows + state.unet_rows > self.max_encode_rows):
                self._isolated(chunk, out, "text_encoder", self._encode)
                chunk, rows = [], 0
            if state is not None:
                chunk.append(state)
                rows += state.unet_rows
        by_size: dict[tuple[int, int], list] = {}
        for state in plan.decode:
            by_size.setdefault((state.params.height, state.params.width), []).append(state)
        for group in by_size.values():  # a VAE batch shares a shape and stays within the engine's batch
            cap = self.max_decode_batch or len(group)
            for i in range(0, len(group), cap):
                self._isolated(group[i:i + cap], out, "vae_decoder", self._decode)
        gated = [s for s in plan.gate if s in out.images]
        by_size = {}
        for state in gated:
            by_size.setdefault(out.images[state].shape, []).append(state)
        for group in by_size.values():
            self._score(group, out)

    # ---- failure containment -------------------------------------------------------------------
    def _guard(self, out: RunnerOutput, states: list, component: str, body: Callable[[list], None]) -> bool:
        """Run `body(states)`; on failure every request in `states` gets the error. True if it succeeded."""
        try:
            body(states)
            return True
        except Exception as exc:  # noqa: BLE001 - contained per request, logged in full here
            error = as_serving_error(component, exc)
            if not isinstance(exc, ServingError):
                log.exception("%s failed for %s", component, [s.request_id for s in states])
            for state in states:
                out.errors.setdefault(state, error)
            return False

    def _isolated(self, states: list, out: RunnerOutput, component: str, call: Callable[[list, RunnerOutput], None]):
        """A batched call; if it fails for a reason that is not the component being down, each request
        is tried alone so that only the ones that fail alone fail."""
        try:
            call(states, out)
            return
        except Exception as exc:  # noqa: BLE001
            error = as_serving_error(component, exc)
            if not isinstance(exc, ServingError):
                log.exception("%s failed for %s", component, [s.request_id for s in states])
        if len(states) == 1 or error.code is Code.UNAVAILABLE:
            for state in states:
                out.errors.setdefault(state, error)
            return
        for state in states:
            self._guard(out, [state], component, lambda s: call(s, out))

    # ---- stages ---------------------------------------------------------------------------------
    def _encode(self, states: list, out: RunnerOutput) -> None:
        input_ids = np.concatenate([s.input_ids for s in states])
        start = self.clock()
        embeddings = to_torch(self.executor.encode(input_ids), self.device)
        out.stages.append(("encode", len(input_ids), self.clock() - start))
        if embeddings.shape[0] != len(input_ids):
            raise ComponentFailed("text_encoder", f"returned {embeddings.shape[0]} rows for {len(input_ids)}")
        offset = 0
        for state in states:
            rows = state.input_ids.shape[0]
            self._slots[state] = Slot(embeddings[offset:offset + rows].clone())
            offset += rows
            if self._guard(out, [state], "sampler", lambda s: self._new_sampler(s[0])):
                out.encoded[state] = self._slots[state].sampler.total

    def _new_sampler(self, state) -> None:
        latent = (self.spec.latent_channels, state.params.height // self.spec.vae_scale_factor,
                  state.params.width // self.spec.vae_scale_factor)
        self._slots[state].sampler = Sampler(state.params, self.spec.scheduler_config, latent, device=self.device)

    def _denoise(self, batch: list, out: RunnerOutput, patched: bool) -> None:
        # 1. Rows: requests whose samplers share a step rule (and guidance mode, latent shape and step kind)
        #    are gathered and scaled together; the others build theirs alone. A group that fails is retried
        #    one request at a time, so a request whose inputs cannot be built fails alone.
        inputs: dict = {}
        groups: list[tuple[list, BatchedStep | None]] = []
        for group in self._step_groups(batch):
            self._isolated(group, out, "sampler", lambda states, _: self._rows(states, inputs, groups))
        ready = [state for states, _ in groups for state in states]
        if not ready:
            return
        # 2. One UNet call for all of them (retried alone on a failure that is not an outage).
        noise: dict = {}
        self._isolated(ready, out, ready[0].model,
                       lambda states, _: noise.update(self._unet_call(states, inputs, out, patched)))
        # 3. The steps: one per group (retried one request at a time), or per request for a sampler that
        #    steps alone. A group's stepper holds the rows it gathered; a part of a group gathers anew.
        for states, stepper in groups:
            stepped = [s for s in states if s in noise]
            if len(stepped) < len(states):
                stepper = None
            if stepped:
                self._isolated(stepped, out, "sampler",
                               lambda subset, _: self._step(subset, stepper if subset is stepped else None, noise, out))

    def _alone(self, sampler: Sampler) -> bool:
        """Whether this sampler steps through its own diffusers scheduler (pndm, unipc, heun)."""
        return sampler.batch_key is None or not self.batched_sampling

    def _step_groups(self, batch: list) -> list[list]:
        """The requests of one UNet batch that step together: same step rule, guidance mode, latent shape,
        and all taking an ordinary step or all the last one."""
        groups: dict = {}
        for state in batch:
            slot = self._slots.get(state)
            alone = slot is None or slot.sampler is None or self._alone(slot.sampler)
            key = id(state) if alone else slot.sampler.batch_key
            groups.setdefault((key, state.last_step_pending), []).append(state)
        return list(groups.values())

    def _rows(self, states: list, inputs: dict, groups: list) -> None:
        """The UNet rows of `states` (one group) into `inputs`; the group and its stepper into `groups`."""
        samplers = [self._slots[s].sampler for s in states]
        if self._alone(samplers[0]):
            inputs[states[0]] = samplers[0].model_input(states[0].steps_done)
            groups.append((states, None))
            return
        stepper = BatchedStep(samplers, [s.steps_done for s in states])
        sample, timestep = stepper.model_input()
        rows = [s.unet_rows for s in states]
        inputs.update(zip(states, zip(sample.split(rows), timestep.split(rows))))
        groups.append((states, stepper))

    def _step(self, states: list, stepper: BatchedStep | None, noise: dict, out: RunnerOutput) -> None:
        """One step for `states` (one group, or one request of it), from their UNet output in `noise`."""
        samplers = [self._slots[s].sampler for s in states]
        last = states[0].last_step_pending  # one last step: this evaluation lands on the clean sample
        if self._alone(samplers[0]):
            step = samplers[0].last_step if last else samplers[0].step
            step(states[0].steps_done, noise[states[0]])
        else:
            stepper = stepper or BatchedStep(samplers, [s.steps_done for s in states])
            stepper.step(torch.cat([noise[s] for s in states]), last=last)
        for state in states:
            out.stepped[state] = None

    def _unet_call(self, states, inputs: dict, out: RunnerOutput, patched: bool) -> dict:
        rows = [inputs[s] for s in states]
        embeddings = [self._slots[s].embeddings for s in states]
        if not patched:
            sample = torch.cat([x for x, _ in rows])
            noise = self._unet(states[0].bucket, sample, torch.cat([t for _, t in rows]), torch.cat(embeddings), out)
            return dict(zip(states, noise.split([s.unet_rows for s in states])))
        # Patch-level batching: one call over the patches of requests of several resolutions.
        grid = self.patch_grid
        tiles, timesteps, embeds, counts = [], [], [], []
        for (sample, t), embedding in zip(rows, embeddings):
            patches = grid.split(sample)
            per_row = patches.shape[0] // sample.shape[0]
            tiles.append(patches)
            timesteps.append(t.repeat_interleave(per_row))
            embeds.append(embedding.repeat_interleave(per_row, dim=0))
            counts.append(patches.shape[0])
        tile_px = grid.tile * self.spec.vae_scale_factor
        noise = self._unet((states[0].model, tile_px, tile_px), torch.cat(tiles), torch.cat(timesteps),
                           torch.cat(embeds), out)
        scale = self.spec.vae_scale_factor
        return {s: grid.stitch(part, s.params.height // scale, s.params.width // scale)
                for s, part in zip(states, noise.split(counts))}

    def _unet(self, bucket: tuple, sample, timestep, embeddings, out: RunnerOutput) -> torch.Tensor:
        start = self.clock()
        if self.torch_executor:  # tensors stay on the device; the runtime returns when the GPU is done
            noise = self.executor.denoise(bucket[0], sample, timestep, embeddings)
        else:  # the numpy boundary, on the CPU
            noise = to_torch(self.executor.denoise(bucket[0], sample.numpy(), timestep.numpy(), embeddings.numpy()))
        if tuple(noise.shape) != tuple(sample.shape):
            raise ComponentFailed(bucket[0], f"returned shape {tuple(noise.shape)} for input {tuple(sample.shape)}")
        out.unet_calls.append((bucket, len(sample), self.clock() - start))
        return noise

    def _decode(self, states: list, out: RunnerOutput) -> None:
        latents = torch.cat([self._slots[s].sampler.latents for s in states]).cpu() / self.spec.vae_scaling_factor
        if not torch.isfinite(latents).all():  # a UNet that returned garbage; alone, only its request fails
            raise ComponentFailed(states[0].model, "produced non-finite latents")
        start = self.clock()
        images = to_torch(self.executor.decode(latents.numpy())).numpy()
        h, w = states[0].params.height, states[0].params.width
        if images.shape != (len(states), 3, h, w) or not np.isfinite(images).all():
            raise ComponentFailed("vae_decoder", "returned a malformed image batch")
        out.stages.append(("decode", len(states) * h * w, self.clock() - start))
        for state, image in zip(states, torch.from_numpy(images)):
            out.images[state] = to_uint8_image(image).numpy()

    def _score(self, group: list, out: RunnerOutput) -> None:
        """Cascade: the gate scores the light answers in one call. If it fails, the light answers stand."""
        try:
            start = self.clock()
            scores = np.asarray(self.executor.score(np.stack([out.images[s] for s in group]),
                                                    [s.params.prompt for s in group]), dtype=np.float64).reshape(-1)
            out.stages.append(("gate", len(group), self.clock() - start))
            if len(scores) != len(group) or not np.isfinite(scores).all():
                raise ComponentFailed("quality_gate", "returned malformed scores")
        except Exception as exc:  # noqa: BLE001
            error = as_serving_error("quality_gate", exc)
            if not isinstance(exc, ServingError):
                log.exception("quality_gate failed")
            for state in group:
                out.gate_errors[state] = error.message
            return
        for state, score in zip(group, scores):
            out.scores[state] = float(score)
