"""What runs the models: the engine hands an executor whole batches and never knows whether they go
over BLS to Triton models or straight to a runtime in this process."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Executor(Protocol):
    def encode(self, input_ids: np.ndarray) -> np.ndarray:
        """(N, 77) int64 -> (N, 77, D) float32 text embeddings."""

    def denoise(self, model: str, sample: np.ndarray, timestep: np.ndarray,
                text_embeddings: np.ndarray, **residuals) -> np.ndarray:
        """One UNet evaluation for a batch of rows that may come from different requests and steps; with
        `residuals` ((rows, R) ControlNet residuals) on the controlled UNet `model` (unet_control)."""

    def controlnet(self, model: str, sample: np.ndarray, timestep: np.ndarray, text_embeddings: np.ndarray,
                   control_image: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """One ControlNet evaluation: the UNet's rows plus (rows, 3, H, W) control images in [0, 1] and a scale
        per row -> (rows, R) residuals, scaled (ControlNets only)."""

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """(N, 4, h, w) scaled latents -> (N, 3, 8h, 8w) images in [-1, 1]."""

    def score(self, images: np.ndarray, prompts: list[str] | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 images and their N prompts -> (N,) quality-gate scores in [0, 1] (cascades only)."""


class RuntimeExecutor:
    """Runs the exported components in this process (tests, benchmarks, the in-process baseline)."""

    def __init__(self, text_encoder, unets: dict, vae_decoder, gate=None, controlnets: dict | None = None):
        self.text_encoder, self.unets, self.vae_decoder, self.gate = text_encoder, unets, vae_decoder, gate
        self.controlnets = controlnets or {}  # model name -> runtime; unets holds the controlled UNet

    def encode(self, input_ids):
        return self.text_encoder.run({"input_ids": input_ids})["text_embeddings"]

    def denoise(self, model, sample, timestep, text_embeddings, **residuals):
        return self.unets[model].run({"sample": sample, "timestep": timestep,
                                      "encoder_hidden_states": text_embeddings, **residuals})["noise_pred"]

    def controlnet(self, model, sample, timestep, text_embeddings, control_image, scale):
        return run_controlnet(self.controlnets[model], sample, timestep, text_embeddings, control_image, scale)

    def decode(self, latent):
        return self.vae_decoder.run({"latent": latent})["image"]

    def score(self, images, prompts=None):
        if self.gate is None:
            raise RuntimeError("no quality gate is loaded; cascades need one")
        return self.gate.score(images, prompts)


def run_controlnet(runtime, sample, timestep, text_embeddings, control_image, scale):
    """A ControlNet runtime's call (components.ControlNet's names)."""
    return runtime.run({"sample": sample, "timestep": timestep, "encoder_hidden_states": text_embeddings,
                        "controlnet_cond": control_image, "conditioning_scale": scale})["residuals"]
