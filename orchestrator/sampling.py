"""Denoising math. Each request has its own diffusers scheduler (they are stateful) and seeded initial
latents. For the schedulers whose update is arithmetic on per-evaluation numbers (euler, euler_a, ddim,
dpmpp_2m) the same update also runs for many requests at once: a request's numbers are tabled once, on
the device, when its sampler is created, and a batch gathers one table row per request and steps them
all with one set of tensor ops (`BatchedStep`), in diffusers' own operation order so that both paths
agree to fp32 rounding. The other schedulers (pndm, unipc, heun) step one request at a time."""

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
    """One request's sampling state. `model_input` / `step` / `last_step` advance it alone through its
    diffusers scheduler; a sampler with a `rule` can also be stepped with others by `BatchedStep`, from
    its `table` (and, for euler_a, its pre-drawn `step_noise`; for dpmpp_2m, its `previous` x0)."""

    def __init__(self, params: GenerationParams, scheduler_config: dict, latent_shape: tuple[int, int, int],
                 device: str | torch.device = "cpu"):
        # 1. The request's own diffusers scheduler.
        overrides = {"skip_prk_steps": True} if params.scheduler == "pndm" else {}
        cls = SCHEDULER_CLASSES[params.scheduler]
        self.scheduler = cls.from_config(scheduler_config, **overrides)
        # Only the stochastic schedulers take a generator (euler_a, ddim with eta); heun, pndm, unipc refuse it.
        self._step_kwargs = {"generator": None} if _takes_generator(cls) else {}
        self.scheduler.set_timesteps(params.steps)
        self.timesteps = self.scheduler.timesteps
        self.guidance_scale = params.guidance_scale
        self.cfg = params.uses_cfg
        # 2. Seeded initial latents. CPU generator: the same seed gives the same image on any device.
        self.generator = torch.Generator().manual_seed(params.seed)
        if self._step_kwargs:
            self._step_kwargs["generator"] = self.generator
        latents = torch.randn((1, *latent_shape), generator=self.generator, dtype=torch.float32)
        # Latents live where the UNet runs (device-resident engine); the scheduler's tables stay on the CPU.
        self.device = torch.device(device)
        self.latents = (latents * self.scheduler.init_noise_sigma).to(self.device)
        # The UNet's timestep per evaluation, copied to the device once rather than every step.
        self.unet_timesteps = self.timesteps.float().to(self.device)
        # 3. The batched form: one table row per evaluation, on the device.
        rule = STEP_RULES.get(params.scheduler)
        self.rule = rule if rule is not None and rule.supports(self.scheduler.config) else None
        self.table = self.step_noise = self.previous = None
        if self.rule is not None:
            self.table = self.rule.table(self.scheduler, self.guidance_scale).to(self.device)
            if self.rule.ancestral:
                self.step_noise = self._draw_step_noise(latent_shape)

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def batch_key(self) -> tuple | None:
        """Samplers with equal keys step together; None: this one steps alone."""
        if self.rule is None:
            return None
        return (type(self.rule), self.scheduler.config.prediction_type, self.cfg, tuple(self.latents.shape))

    def _draw_step_noise(self, latent_shape) -> torch.Tensor:
        """The noise the diffusers scheduler would draw at each step, in order, from a copy of the request's
        generator (so `step` stays today's path): fresh noise costs no host work or copy per step."""
        generator = torch.Generator()
        generator.set_state(self.generator.get_state())
        draws = [torch.randn((1, *latent_shape), generator=generator, dtype=torch.float32) for _ in range(self.total)]
        return torch.cat(draws).to(self.device)

    def model_input(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet rows (uncond and cond with CFG) and their timesteps for evaluation `index`."""
        sample = self.scheduler.scale_model_input(self.latents, self.timesteps[index])
        rows = 2 if self.cfg else 1
        return sample.repeat(rows, 1, 1, 1), self.unet_timesteps[index].repeat(rows)

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


# ---- the batched form ------------------------------------------------------------------------------
class StepRule:
    """A scheduler's update as arithmetic on per-evaluation columns. `columns` runs once per request (CPU,
    fp32, one entry per evaluation); `scale`, `step` and `last` run once per batch on the gathered rows
    (each column shaped (B, 1, 1, 1)). Every formula follows diffusers' operation order."""

    own: tuple[str, ...] = ()  # the rule's columns, after the common ones
    predictions: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    ancestral = False  # draws fresh noise every step
    multistep = False  # uses the previous step's x0 (`step` returns this one's)
    k_diffusion = False  # latents are x0 + sigma * eps (else the variance-preserving form)

    @property
    def names(self) -> tuple[str, ...]:
        return ("timestep", "guidance") + (() if self.k_diffusion else ("last_a", "last_b")) + self.own

    def supports(self, config) -> bool:
        return config.prediction_type in self.predictions

    def columns(self, scheduler, n: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def table(self, scheduler, guidance_scale: float) -> torch.Tensor:
        """(evaluations, columns) float32."""
        timesteps = scheduler.timesteps
        n = len(timesteps)
        columns = {"timestep": timesteps.float(), "guidance": torch.full((n,), float(guidance_scale))}
        if not self.k_diffusion:  # the last step's alphas, as Sampler.last_step reads them
            alpha = scheduler.alphas_cumprod[timesteps.long()]
            columns["last_a"], columns["last_b"] = alpha.sqrt(), (1 - alpha).sqrt()
        columns.update(self.columns(scheduler, n))
        return torch.stack([columns[name].float() for name in self.names], dim=1)

    def scale(self, x, c):
        return x

    def step(self, x, eps, c, config, noise, previous):
        """(next latents, this step's x0 for the next step, or None)."""
        raise NotImplementedError

    def last(self, x, eps, c):
        if self.k_diffusion:
            return x - c["sigma"] * eps
        return (x - c["last_b"] * eps) / c["last_a"]


class EulerRule(StepRule):
    own = ("c_in", "sigma", "dt", "v_out", "v_skip")
    predictions = ("epsilon", "v_prediction", "sample", "original_sample")
    k_diffusion = True

    def columns(self, scheduler, n):
        sigma, after = scheduler.sigmas[:n], scheduler.sigmas[1:n + 1]
        c_in = (sigma**2 + 1) ** 0.5
        # s_churn = 0, so sigma_hat = sigma.
        return {"c_in": c_in, "sigma": sigma, "dt": after - sigma, "v_out": -sigma / c_in, "v_skip": sigma**2 + 1}

    def scale(self, x, c):
        return x / c["c_in"]

    def x0(self, x, eps, c, config):
        if config.prediction_type == "epsilon":
            return x - c["sigma"] * eps
        if config.prediction_type == "v_prediction":
            return eps * c["v_out"] + (x / c["v_skip"])
        return eps

    def step(self, x, eps, c, config, noise, previous):
        derivative = (x - self.x0(x, eps, c, config)) / c["sigma"]
        return x + derivative * c["dt"], None


class EulerAncestralRule(EulerRule):
    own = EulerRule.own + ("sigma_up",)
    predictions = ("epsilon", "v_prediction")
    ancestral = True

    def columns(self, scheduler, n):
        columns = super().columns(scheduler, n)
        sigma, after = scheduler.sigmas[:n], scheduler.sigmas[1:n + 1]
        sigma_up = (after**2 * (sigma**2 - after**2) / sigma**2) ** 0.5
        sigma_down = (after**2 - sigma_up**2) ** 0.5
        columns.update(sigma_up=sigma_up, dt=sigma_down - sigma)
        return columns

    def step(self, x, eps, c, config, noise, previous):
        x, _ = super().step(x, eps, c, config, noise, previous)
        return x + noise * c["sigma_up"], None


class DDIMRule(StepRule):
    own = ("sqrt_a", "sqrt_b", "sqrt_a_prev", "direction")

    def supports(self, config):
        return super().supports(config) and not config.thresholding

    def columns(self, scheduler, n):
        t = scheduler.timesteps.long()
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alpha = scheduler.alphas_cumprod[t]
        alpha_prev = torch.where(prev >= 0, scheduler.alphas_cumprod[prev.clamp(min=0)],
                                 scheduler.final_alpha_cumprod)
        # eta = 0: no variance term, so the direction is sqrt(1 - alpha_prev).
        return {"sqrt_a": alpha**0.5, "sqrt_b": (1 - alpha) ** 0.5, "sqrt_a_prev": alpha_prev**0.5,
                "direction": (1 - alpha_prev) ** 0.5}

    def step(self, x, eps, c, config, noise, previous):
        if config.prediction_type == "epsilon":
            x0 = (x - c["sqrt_b"] * eps) / c["sqrt_a"]
        elif config.prediction_type == "sample":
            x0, eps = eps, (x - c["sqrt_a"] * eps) / c["sqrt_b"]
        else:  # v_prediction
            x0, eps = c["sqrt_a"] * x - c["sqrt_b"] * eps, c["sqrt_a"] * eps + c["sqrt_b"] * x
        if config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        return c["sqrt_a_prev"] * x0 + c["direction"] * eps, None


class DPMSolverRule(StepRule):
    """DPM-Solver++ (2M, midpoint): first order at the first evaluation and, per the config, at the last;
    second order in between, from this step's x0 and the previous one."""

    own = ("alpha_s", "sigma_s", "a", "b", "c", "r")
    multistep = True

    def supports(self, config):
        return (super().supports(config) and config.algorithm_type == "dpmsolver++" and config.solver_order in (1, 2)
                and config.solver_type == "midpoint" and not config.thresholding and config.variance_type is None
                and not config.use_flow_sigmas)

    def columns(self, scheduler, n):
        config, sigmas = scheduler.config, scheduler.sigmas
        index = torch.arange(n)
        s0, t, s1 = sigmas[:n], sigmas[1:n + 1], sigmas[(index - 1).clamp(min=0)]

        def alpha_sigma(sigma):
            alpha = 1 / ((sigma**2 + 1) ** 0.5)
            return alpha, sigma * alpha

        alpha_t, sigma_t = alpha_sigma(t)
        alpha_s0, sigma_s0 = alpha_sigma(s0)
        alpha_s1, sigma_s1 = alpha_sigma(s1)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        b = alpha_t * (torch.exp(-h) - 1.0)
        lower_final = (config.euler_at_final or (config.lower_order_final and n < 15)
                       or config.final_sigmas_type == "zero")
        first = (index == 0) | ((index == n - 1) & lower_final) | (config.solver_order == 1)
        zero = torch.zeros(n)
        return {"alpha_s": alpha_s0, "sigma_s": sigma_s0, "a": sigma_t / sigma_s0, "b": b,
                "c": torch.where(first, zero, 0.5 * b), "r": torch.where(first, zero, 1.0 / (h_0 / h))}

    def step(self, x, eps, c, config, noise, previous):
        if config.prediction_type == "epsilon":
            x0 = (x - c["sigma_s"] * eps) / c["alpha_s"]
        elif config.prediction_type == "sample":
            x0 = eps
        else:  # v_prediction
            x0 = c["alpha_s"] * x - c["sigma_s"] * eps
        # First-order rows have c = r = 0; a request with no previous x0 uses its own (the term vanishes).
        if all(p is None for p in previous):
            before = x0
        else:
            before = torch.cat([p if p is not None else x0[j:j + 1] for j, p in enumerate(previous)])
        d1 = c["r"] * (x0 - before)
        return c["a"] * x - c["b"] * x0 - c["c"] * d1, x0


STEP_RULES: dict[str, StepRule] = {"euler": EulerRule(), "euler_a": EulerAncestralRule(), "ddim": DDIMRule(),
                                   "dpmpp_2m": DPMSolverRule()}


class BatchedStep:
    """One step for requests whose samplers share a `batch_key`, each at its own evaluation: their table
    rows and latents are gathered once, and scaling, guidance and the update run once for all of them.
    Nothing reads a number back to the host; the samplers change only when `step` has computed everything."""

    def __init__(self, samplers: list[Sampler], indices: list[int]):
        first = samplers[0]
        self.samplers, self.indices = samplers, indices
        self.rule, self.cfg, self.config = first.rule, first.cfg, first.scheduler.config
        rows = torch.cat([s.table[i:i + 1] for s, i in zip(samplers, indices)])
        self.timesteps = rows[:, 0]
        self.c = {name: rows[:, k].view(-1, 1, 1, 1) for k, name in enumerate(self.rule.names)}
        self.latents = torch.cat([s.latents for s in samplers])

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet rows ([uncond, cond] per request with CFG, as Sampler.model_input) and their timesteps."""
        sample, t = self.rule.scale(self.latents, self.c), self.timesteps
        if self.cfg:
            shape = sample.shape[1:]
            sample = sample.unsqueeze(1).expand(-1, 2, *shape).reshape(-1, *shape)
            t = t.unsqueeze(1).expand(-1, 2).reshape(-1)
        return sample, t

    def step(self, noise_pred: torch.Tensor, last: bool = False) -> None:
        """Advance every request by one evaluation (`last`: straight to the clean sample)."""
        if self.cfg:
            pairs = noise_pred.view(-1, 2, *noise_pred.shape[1:])
            uncond, cond = pairs[:, 0], pairs[:, 1]
            noise_pred = uncond + self.c["guidance"] * (cond - uncond)
        x0 = None
        if last:
            latents = self.rule.last(self.latents, noise_pred, self.c)
        else:
            noise = (torch.cat([s.step_noise[i:i + 1] for s, i in zip(self.samplers, self.indices)])
                     if self.rule.ancestral else None)
            previous = [s.previous for s in self.samplers] if self.rule.multistep else None
            latents, x0 = self.rule.step(self.latents, noise_pred, self.c, self.config, noise, previous)
        for j, sampler in enumerate(self.samplers):
            sampler.latents = latents[j:j + 1]
            if x0 is not None:
                sampler.previous = x0[j:j + 1]


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
