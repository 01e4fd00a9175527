"""Test doubles for the orchestrator core: an executor with deterministic arithmetic and a sink that records."""

from __future__ import annotations

import numpy as np

from triffusion.orchestrator.params import GenerationParams
from triffusion.orchestrator.request import RequestState

SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                    "steps_offset": 1, "timestep_spacing": "leading"}


class FakeExecutor:
    """Records every call; the UNet's output depends only on each row's own input."""

    def __init__(self, fail_denoise: bool = False):
        self.calls: list[tuple[str, int]] = []
        self.fail_denoise = fail_denoise

    def encode(self, input_ids):
        self.calls.append(("encode", len(input_ids)))
        return np.repeat((input_ids[:, :, None] % 7).astype(np.float32), 4, axis=2)

    def denoise(self, model, sample, timestep, text_embeddings):
        self.calls.append(("denoise", len(sample)))
        if self.fail_denoise:
            raise RuntimeError("unet exploded")
        return 0.1 * sample + 1e-4 * timestep[:, None, None, None] + text_embeddings.mean(axis=(1, 2))[:, None, None, None]

    def decode(self, latent):
        self.calls.append(("decode", len(latent)))
        n, _, h, w = latent.shape
        return np.tanh(np.repeat(np.repeat(latent[:, :3], 8, axis=2), 8, axis=3))


class RecordingSink:
    """Records what the engine sends; with `cancel_after_steps`, the client goes away after that step."""

    def __init__(self, cancel_after_steps: int | None = None):
        self.events: list[tuple] = []
        self.cancel_after_steps = cancel_after_steps
        self.state = None  # make_state links it, so that a cancelling client can flag its request

    def progress(self, step, steps):
        self.events.append(("progress", step, steps))
        if self.cancel_after_steps is not None and step >= self.cancel_after_steps:
            self.state.cancel_requested = True

    def preview(self, image):
        self.events.append(("preview", image))

    def finish(self, image, metadata):
        self.events.append(("finish", image, metadata))

    def fail(self, error):
        self.events.append(("fail", error.code, error.message))

    @property
    def finals(self):
        return [e for e in self.events if e[0] in ("finish", "fail")]

    @property
    def outcome(self):
        return self.events[-1][0] if self.events else None


def make_state(i: int, *, size: int = 64, steps: int = 4, guidance: float = 7.5, stream: bool = True,
               sink: RecordingSink | None = None, seed: int | None = None) -> RequestState:
    params = GenerationParams(prompt=f"prompt {i}", height=size, width=size, steps=steps,
                              guidance_scale=guidance, seed=i if seed is None else seed, stream=stream)
    rows = 2 if params.uses_cfg else 1
    ids = np.full((rows, 77), 49407, np.int64)
    ids[:, 0] = 49406
    ids[-1, 1] = 100 + i
    state = RequestState(request_id=f"r{i}", params=params, sink=sink or RecordingSink(), input_ids=ids)
    state.sink.state = state
    return state


class SimClock:
    """Simulated time: only the fake executor moves it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TimedExecutor(FakeExecutor):
    """FakeExecutor whose calls take simulated time: unet a + b * rows, encode and decode fixed."""

    def __init__(self, clock: SimClock, unet_base=0.02, unet_per_row=0.01, encode=0.01, decode=0.02):
        super().__init__()
        self.clock, self.unet_base, self.unet_per_row = clock, unet_base, unet_per_row
        self.encode_s, self.decode_s = encode, decode

    def encode(self, input_ids):
        self.clock.now += self.encode_s
        return super().encode(input_ids)

    def denoise(self, model, sample, timestep, text_embeddings):
        self.clock.now += self.unet_base + self.unet_per_row * len(sample)
        return super().denoise(model, sample, timestep, text_embeddings)

    def decode(self, latent):
        self.clock.now += self.decode_s
        return super().decode(latent)


class LatentRecorder(FakeExecutor):
    """FakeExecutor that keeps every latent batch handed to the VAE (to compare two runs' final latents)."""

    def __init__(self):
        super().__init__()
        self.decoded: list[np.ndarray] = []

    def decode(self, latent):
        self.decoded.append(np.array(latent, copy=True))
        return super().decode(latent)


class TorchFakeExecutor(LatentRecorder):
    """FakeExecutor's UNet arithmetic on torch tensors in and out (an in-process torch UNet on `device`)."""

    def denoise(self, model, sample, timestep, text_embeddings):
        import torch

        assert all(isinstance(t, torch.Tensor) for t in (sample, timestep, text_embeddings))
        self.calls.append(("denoise", len(sample)))
        return (0.1 * sample + 1e-4 * timestep[:, None, None, None]
                + text_embeddings.mean(dim=(1, 2))[:, None, None, None])
