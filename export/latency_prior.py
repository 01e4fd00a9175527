"""A latency profile for engines that could not be timed at export (--plan-only, or no TensorRT or GPU
where the export ran): measured H100 figures for the SD1.5 architecture, scaled to the exported model by
parameter count and to each served size and batch by pixels. It is written to profile.json marked
`"source": "prior"`, so that nobody reads it as a measurement; the predictor refines it from the first
calls on (EWMA per shape).

Without any profile the predictor falls back to ~1 s per 512x512 UNet step, which rejects every SLO under
about a minute until traffic teaches it; the figures below are what an SD1.5 UNet does on one H100 with
fp16 and CUDA graphs (TensorRT engines are usually a little faster: a conservative start)."""

from __future__ import annotations

from triffusion import contract

# ../shared/anchors/h100-sd15.md: SD1.5-architecture components, random weights (the real shapes), fp16,
# one H100 80GB, torch 2.11+cu130, diffusers 0.42.1 (SDPA), CUDA events, measured 2026-11-22.
ANCHOR = {
    "source": "anchors/h100-sd15.md (H100 80GB, fp16, CUDA graphs, measured 2026-11-22)",
    "unet_params": 859.5e6,
    # UNet seconds per call by latent pixels (64x64 = 512x512 images, 96x96 = 768x768) and rows
    "unet_s": {64 * 64: {1: 7.55e-3, 2: 10.7e-3, 8: 29.7e-3, 16: 56.2e-3, 32: 111.1e-3},
               96 * 96: {1: 14.6e-3, 2: 23.3e-3, 8: 74.5e-3, 16: 145e-3}},
    "text_params": 123e6,  # CLIP ViT-L/14 text encoder
    "encode_s": {2: 5.7e-3},  # rows -> seconds
    "vae_params": 83.65e6,  # SD1.5's AutoencoderKL (the anchor times its decoder; its count is the whole VAE's)
    "decode_s": {1: 22e-3, 4: 67e-3, 8: 122e-3},  # 512x512 images -> seconds
}


def _seconds(value: float) -> float:
    return float(f"{value:.4g}")  # four significant figures: a prior claims no more


def _interpolate(table: dict[int, float], x: float) -> float:
    """Piecewise linear through the table's points, extended along its last segment; in proportion (through
    the origin) below its first point or when it has one point."""
    points = sorted(table.items())
    if len(points) == 1 or x <= points[0][0]:
        x0, y0 = points[0]
        return y0 * x / x0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2:]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


def unet_seconds(params: float, latent_pixels: int, rows: int) -> float:
    """One UNet call: the anchor table measured nearest in size, scaled by pixels and parameters."""
    measured = min(ANCHOR["unet_s"], key=lambda p: abs(p - latent_pixels))
    return _interpolate(ANCHOR["unet_s"][measured], rows) * latent_pixels / measured * params / ANCHOR["unet_params"]


def latency_prior(parameters: dict[str, int], unets: list[str], sizes: list[int], rows: list[int], *,
                  vae_scale: int = 8, max_encode_rows: int = 2, max_images: int = 1) -> dict:
    """A profile in the predictor's format ({"unet": [[model, h, w, rows, s]], "stages": [[stage, size, s]]})
    for every served UNet, size and row count, plus text encoding and decoding, marked as a prior."""
    unet_rows = sorted(set(rows))
    data = {"source": "prior", "prior": {"from": ANCHOR["source"],
                                         "scaled_by": "parameter count (UNet, text encoder, VAE) and pixels",
                                         "parameters": dict(parameters)},
            "unet": [], "stages": []}
    for name in unets:
        for size in sizes:
            latent = (size // vae_scale) ** 2
            data["unet"] += [[name, size, size, r, _seconds(unet_seconds(parameters[name], latent, r))] for r in unet_rows]
    text = parameters[contract.TEXT_ENCODER] / ANCHOR["text_params"]
    for r in sorted({1, 2, max_encode_rows}):
        data["stages"].append(["encode", r, _seconds(_interpolate(ANCHOR["encode_s"], r) * text)])
    vae = parameters[contract.VAE_DECODER] / ANCHOR["vae_params"]
    for size in sizes:
        for n in sorted({1, max_images}):
            images_512 = n * size * size / 512 ** 2
            data["stages"].append(["decode", n * size * size, _seconds(_interpolate(ANCHOR["decode_s"], images_512) * vae)])
    return data


__all__ = ["ANCHOR", "latency_prior", "unet_seconds"]
