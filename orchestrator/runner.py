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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from triffusion.contract import TEXT_ENCODER_MAX_BATCH

from .errors import Code, ComponentFailed, InvalidRequest, ServingError
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
    # ControlNets (pipeline.json `control`): request name -> Triton model, and the UNet taking their residuals
    controlnets: Mapping[str, str] = field(default_factory=dict)
    control_unet: str | None = None


@dataclass
class Slot:
    """One request's tensors while it runs."""

    embeddings: Any
    sampler: Sampler | None = None
    control: Any = None  # with a ControlNet: its control image, (1, 3, H, W) in [0, 1] on the device


@dataclass
class Prepared:
    """One UNet batch's rows, built before any UNet call of the iteration: the step groups (with their
    batched steppers), each request's (sample, timestep) rows, and the requests whose rows were built."""

    patched: bool
    inputs: dict = field(default_factory=dict)
    groups: list = field(default_factory=list)
    ready: list = field(default_factory=list)


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


def _row_adapters(states, rows: list[int]) -> list | None:
    """Each UNet row's LoRA (name, scale) pairs (a request's rows share them), or None when no row has any."""
    if not any(s.params.lora for s in states):
        return None
    return [s.params.lora for s, n in zip(states, rows) for _ in range(n)]


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
        # ControlNets run here, ahead of the UNet calls that take their residuals (see _control_ahead); on a GPU
        # on a stream of their own, so that they overlap the UNet call of the batch before.
        self._control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triffusion-controlnet")
        self._control_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def close(self) -> None:
        self._side.shutdown(wait=False)
        self._control.shutdown(wait=False)

    def release(self, states) -> None:
        for state in states:
            self._slots.pop(state, None)
        release = getattr(self.executor, "release", None)  # an executor holding per-request resources (LoRA)
        if release is not None:
            release(states)

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
        # Every batch's rows first, so that the ControlNet of a batch runs (on its own thread) while the UNet
        # of the batch before it does: a UNet call needs its own batch's residuals, no one else's.
        prepared = [self._prepare(batch, out, patched=False) for batch in plan.denoise]
        prepared += [self._prepare(batch, out, patched=True) for batch in plan.patched]
        ahead = [self._control_ahead(p, out) for p in prepared]
        for batch, residuals in zip(prepared, ahead):
            self._step_batch(batch, out, residuals)
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

    def _prepare(self, batch: list, out: RunnerOutput, patched: bool) -> "Prepared":
        """1. Rows: requests whose samplers share a step rule (and guidance mode, latent shape and step kind)
        are gathered and scaled together; the others build theirs alone. A group that fails is retried one
        request at a time, so a request whose inputs cannot be built fails alone."""
        prepared = Prepared(patched)
        for group in self._step_groups(batch):
            self._isolated(group, out, "sampler",
                           lambda states, _: self._rows(states, prepared.inputs, prepared.groups))
        prepared.ready = [state for states, _ in prepared.groups for state in states]
        return prepared

    def _denoise(self, batch: list, out: RunnerOutput, patched: bool) -> None:
        """One UNet batch's step, start to end (its ControlNet residuals, if any, computed inline)."""
        self._step_batch(self._prepare(batch, out, patched), out)

    def _step_batch(self, prepared: "Prepared", out: RunnerOutput, residuals=None) -> None:
        groups, ready, patched = prepared.groups, prepared.ready, prepared.patched
        if not ready:
            return
        # 2. One UNet call for all of them (retried alone on a failure that is not an outage), with the
        #    ControlNet residuals computed ahead for the whole batch; a retry computes its own.
        noise: dict = {}
        self._isolated(ready, out, ready[0].model, lambda states, _: noise.update(self._unet_call(
            states, prepared.inputs, out, patched, residuals if states is ready else None)))
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

    def _unet_call(self, states, inputs: dict, out: RunnerOutput, patched: bool, residuals=None) -> dict:
        rows = [inputs[s] for s in states]
        embeddings = [self._slots[s].embeddings for s in states]
        controlled = any(s.params.controlnet for s in states)
        if controlled and patched:
            raise InvalidRequest("controlnet", "is not served in patch mode (hybrid=patch); serve with hybrid=bucket")
        if not patched:
            sample = torch.cat([x for x, _ in rows])
            if controlled:  # computed ahead for the whole batch, or here for a part of it (a retry)
                residuals = residuals.result() if residuals is not None else self._residuals(states, inputs, out)
            noise = self._unet(states[0].bucket, sample, torch.cat([t for _, t in rows]), torch.cat(embeddings), out,
                               residuals if controlled else None, _row_adapters(states, [s.unet_rows for s in states]))
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
                           torch.cat(embeds), out, adapters=_row_adapters(states, counts))
        scale = self.spec.vae_scale_factor
        return {s: grid.stitch(part, s.params.height // scale, s.params.width // scale)
                for s, part in zip(states, noise.split(counts))}

    def _unet(self, bucket: tuple, sample, timestep, embeddings, out: RunnerOutput, residuals=None,
              adapters=None) -> torch.Tensor:
        start = self.clock()
        # With ControlNet residuals the batch runs on the controlled UNet (same weights, one more input).
        model, extra = (bucket[0], {}) if residuals is None else (self.spec.control_unet, {"residuals": residuals})
        # LoRA: each row's (adapter, scale) pairs travel with the call, when a row has any (orchestrator.adapters)
        extra_adapters = {"adapters": adapters} if adapters else {}
        if self.torch_executor:  # tensors stay on the device; the runtime returns when the GPU is done
            noise = self.executor.denoise(model, sample, timestep, embeddings, **extra, **extra_adapters)
        else:  # the numpy boundary, on the CPU
            extra = {k: v.numpy() for k, v in extra.items()}
            noise = to_torch(self.executor.denoise(model, sample.numpy(), timestep.numpy(), embeddings.numpy(), **extra,
                                                   **extra_adapters))
        if tuple(noise.shape) != tuple(sample.shape):
            raise ComponentFailed(bucket[0], f"returned shape {tuple(noise.shape)} for input {tuple(sample.shape)}")
        out.unet_calls.append((bucket, len(sample), self.clock() - start))
        return noise

    # ---- ControlNet --------------------------------------------------------------------------------
    def _control_ahead(self, prepared: "Prepared", out: RunnerOutput):
        """The ControlNet residuals of a whole UNet batch, started now on the ControlNet thread (a future), or
        None for a batch without control. They queue there in batch order: while the UNet of batch k runs on
        this thread, the ControlNets of batch k + 1 run on that one (on a GPU, on their own stream). Batch 0's
        cannot overlap its own UNet call, which consumes them; it overlaps the side stages (encode, decode)."""
        ready = prepared.ready
        if prepared.patched or not any(s.params.controlnet for s in ready):
            return None
        if self._control_stream is None:
            return self._control.submit(self._residuals, ready, prepared.inputs, out)
        produced = torch.cuda.Event()
        produced.record()  # the rows were made on this thread's stream; the ControlNet stream waits for them

        def on_stream():
            with torch.cuda.stream(self._control_stream):
                self._control_stream.wait_event(produced)
                residuals = self._residuals(ready, prepared.inputs, out)
                self._control_stream.synchronize()  # the UNet call on the other stream reads them next
                return residuals
        return self._control.submit(on_stream)

    def _residuals(self, states: list, inputs: dict, out: RunnerOutput) -> torch.Tensor:
        """(rows, R) ControlNet residuals for one UNet batch: each served ControlNet runs once over the rows of
        the requests that named it (both CFG rows, with the control image repeated, as diffusers runs it),
        each row scaled by its request's controlnet_scale; rows without control stay zero."""
        offsets, total = [], 0
        for state in states:
            offsets.append(total)
            total += state.unet_rows
        by_net: dict[str, list[int]] = {}
        for i, state in enumerate(states):
            if state.params.controlnet:
                by_net.setdefault(state.params.controlnet, []).append(i)
        residuals = None
        for name, members in by_net.items():
            model = self.spec.controlnets[name]
            index = torch.cat([torch.arange(offsets[i], offsets[i] + states[i].unet_rows) for i in members])
            part = [states[i] for i in members]
            sample = torch.cat([inputs[s][0] for s in part])
            timestep = torch.cat([inputs[s][1] for s in part])
            embeddings = torch.cat([self._slots[s].embeddings for s in part])
            cond = torch.cat([self._control_image(s).expand(s.unet_rows, -1, -1, -1) for s in part])
            scale = torch.cat([torch.full((s.unet_rows,), float(s.params.controlnet_scale), device=self.device)
                               for s in part])
            start = self.clock()
            try:
                if self.torch_executor:
                    result = self.executor.controlnet(model, sample, timestep, embeddings, cond, scale)
                else:
                    result = to_torch(self.executor.controlnet(model, sample.numpy(), timestep.numpy(),
                                                               embeddings.numpy(), cond.numpy(), scale.numpy()))
            except Exception as exc:  # noqa: BLE001 - named after the ControlNet, not the UNet
                if not isinstance(exc, ServingError):
                    log.exception("%s failed for %s", model, [s.request_id for s in part])
                raise as_serving_error(model, exc) from None
            if result.ndim != 2 or result.shape[0] != len(index) or not torch.isfinite(result).all():
                raise ComponentFailed(model, f"returned residuals of shape {tuple(result.shape)} for {len(index)} rows")
            out.stages.append(("controlnet", len(index), self.clock() - start))
            if residuals is None:
                residuals = torch.zeros((total, result.shape[1]), dtype=result.dtype, device=result.device)
            residuals[index.to(result.device)] = result
        return residuals

    def _control_image(self, state) -> torch.Tensor:
        """The request's control image as the ControlNet takes it: (1, 3, H, W) float in [0, 1] (diffusers'
        control image processor: RGB, /255, no normalisation), made once per request."""
        slot = self._slots[state]
        if slot.control is None:
            image = torch.from_numpy(np.ascontiguousarray(state.params.control_image))
            slot.control = (image.permute(2, 0, 1)[None].float() / 255.0).to(self.device)
        return slot.control

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
