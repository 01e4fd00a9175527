"""Profile run that seeds the latency predictor: UNet step times per (size, rows), text encoding and
VAE decoding, measured through any executor (in-process at export, or over BLS)."""

from __future__ import annotations

import time

import numpy as np

from .predictor import LatencyPredictor


def profile(executor, model: str, sizes: list[int], rows: list[int], *, latent_channels: int = 4,
            vae_scale: int = 8, text_hidden: int = 768, text_length: int = 77, repeats: int = 2,
            clock=time.perf_counter) -> dict:
    """Best-of-`repeats` times, in the predictor's profile format (pixel sizes, seconds)."""
    predictor = LatencyPredictor()
    rng = np.random.default_rng(0)

    def best(call) -> float:
        call()  # warm-up: first calls pay for allocation and kernel selection
        times = []
        for _ in range(repeats):
            start = clock()
            call()
            times.append(clock() - start)
        return min(times)

    ids = np.full((2, text_length), 49407, dtype=np.int64)
    predictor.observe_stage("encode", 2, best(lambda: executor.encode(ids)))
    for size in sizes:
        h = w = size // vae_scale
        for n in rows:
            sample = rng.standard_normal((n, latent_channels, h, w), dtype=np.float32)
            timestep = np.full((n,), 500.0, np.float32)
            hidden = rng.standard_normal((n, text_length, text_hidden), dtype=np.float32)
            predictor.observe_unet(model, size, size, n,
                                   best(lambda: executor.denoise(model, sample, timestep, hidden)))
        latent = rng.standard_normal((1, latent_channels, h, w), dtype=np.float32)
        predictor.observe_stage("decode", size * size, best(lambda: executor.decode(latent)))
    return predictor.to_profile()
