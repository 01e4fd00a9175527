"""Denoising math for one request: its own diffusers scheduler (they are stateful), seeded initial
latents, classifier-free guidance, and the latent-to-image conversion."""

from __future__ import annotations

import inspect

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

from .params import GenerationParams

SCHEDULER_CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
    "heun": HeunDiscreteScheduler,
}


# Schedulers whose latents are x0 + sigma * eps (k-diffusion form); the rest use the variance-preserving
# form sqrt(alpha) * x0 + sqrt(1 - alpha) * eps.
K_DIFFUSION = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler)


class Sampler:
    """One request's sampling state; `step` advances it by one UNet evaluation."""

    def __init__(self, params: GenerationParams, scheduler_config: dict, latent_shape: tuple[int, int, int],
                 device: str | torch.device = "cpu"):
        overrides = {"skip_prk_steps": True} if params.scheduler == "pndm" else {}
        cls = SCHEDULER_CLASSES[params.scheduler]
        self.scheduler = cls.from_config(scheduler_config, **overrides)
        # Only the stochastic schedulers take a generator (euler_a, ddim with eta); heun, pndm, unipc refuse it.
        self._step_kwargs = {"generator": None} if _takes_generator(cls) else {}
        self.scheduler.set_timesteps(params.steps)
        self.timesteps = self.scheduler.timesteps
        self.guidance_scale = params.guidance_scale
        self.cfg = params.uses_cfg
        # CPU generator: the same seed gives the same image on any device.
        self.generator = torch.Generator().manual_seed(params.seed)
        if self._step_kwargs:
            self._step_kwargs["generator"] = self.generator
        latents = torch.randn((1, *latent_shape), generator=self.generator, dtype=torch.float32)
        # Latents live where the UNet runs (device-resident engine); the scheduler's tables stay on the CPU.
        self.latents = (latents * self.scheduler.init_noise_sigma).to(device)

    @property
    def total(self) -> int:
        return len(self.timesteps)

    def model_input(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet rows (uncond and cond with CFG) and their timesteps for evaluation `index`."""
        t = self.timesteps[index]
        sample = self.scheduler.scale_model_input(self.latents, t)
        rows = 2 if self.cfg else 1
        return sample.repeat(rows, 1, 1, 1), t.float().repeat(rows)

    def last_step(self, index: int, noise_pred: torch.Tensor) -> None:
        """One last step: from evaluation `index` straight to the clean sample (x0), so an early stop still
        ends fully denoised. Euler-family schedulers keep sigmas; the others, alphas_cumprod."""
        if self.cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance_scale * (cond - uncond)
        scheduler = self.scheduler
        if isinstance(scheduler, K_DIFFUSION):  # latents carry noise of std sigma: x0 = x - sigma * eps
            self.latents = self.latents - scheduler.sigmas[index] * noise_pred
        else:
            alpha = scheduler.alphas_cumprod[int(self.timesteps[index])]
            self.latents = (self.latents - (1 - alpha).sqrt() * noise_pred) / alpha.sqrt()

    def step(self, index: int, noise_pred: torch.Tensor) -> None:
        if self.cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance_scale * (cond - uncond)
        t = self.timesteps[index]
        self.latents = self.scheduler.step(noise_pred, t, self.latents, **self._step_kwargs).prev_sample


def _takes_generator(cls) -> bool:
    return "generator" in inspect.signature(cls.step).parameters


def to_uint8_image(decoded: torch.Tensor) -> "torch.Tensor":
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    image = (decoded / 2 + 0.5).clamp(0, 1)
    return (image.permute(1, 2, 0) * 255).round().to(torch.uint8)


# Linear map from SD's 4 latent channels to RGB: a cheap preview with no VAE call (the widely used
# approximation for SD 1.x/2.x latents). Rows: latent channels; columns: R, G, B.
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                           [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])


def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """(1, 4, h, w) latents -> (h, w, 3) uint8 preview at latent resolution."""
    rgb = torch.einsum("chw,cr->hwr", latents[0, :4].float().cpu(), LATENT_RGB[: latents.shape[1]])
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
