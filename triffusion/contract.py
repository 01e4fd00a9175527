"""Names shared by export, model repository, orchestrator and client: one name per concept.

Model names, and the request/response tensors the fronts, the orchestrator and the client exchange.
What each component model (text encoder, UNet, VAE decoder, quality gate) takes and returns, and how it
is exported and served, lives in triffusion.components. Change a name here and everywhere follows.
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT_MAX_LENGTH = 77  # CLIP context length

# Component model names in the Triton repository (per-variant UNets add a suffix, e.g. unet_sd15).
TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
# ControlNets: each registered one is served as controlnet_<name>; the UNet that takes their residuals is
# served as unet_control beside unet (same weights), and only when the pipeline has ControlNets.
CONTROLNET = "controlnet"
UNET_CONTROL = "unet_control"
# What clients call: two fronts over the same orchestrator. A front validates and tokenizes, forwards
# over BLS, and owns the client's request: it answers it even when the orchestrator dies.
TEXT_TO_IMAGE = "text_to_image"  # unary: HTTP and plain gRPC infer
TEXT_TO_IMAGE_STREAM = "text_to_image_stream"  # decoupled: gRPC streaming, progress, previews, cancellation
FRONTS = (TEXT_TO_IMAGE, TEXT_TO_IMAGE_STREAM)
ORCHESTRATOR = "orchestrator"  # internal (decoupled): the engine loop; only the fronts call it
QUALITY_GATE = "quality_gate"  # cascades: scores a light model's image; low scores are redone on the heavy one
BASELINE_SEQUENTIAL = "baseline_sequential"  # plain diffusers loop, one request at a time (benchmarks)
BASELINE_BATCHING = "baseline_batching"  # whole-request dynamic batching, fixed steps (benchmarks)
CASCADE = "cascade"  # the `unet` input value that asks for the cascade (light first, gated escalation)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton datatype: FP32, INT64, ...
    dims: tuple[int, ...]  # -1 = dynamic; batch included (max_batch_size 0)


# The text encoder's Triton max_batch_size: rows per text encoder call (two per request with CFG). Shared
# with the orchestrator, which never sends more rows in one call. Each component's tensors, dims and
# serving rules live in triffusion.components.
TEXT_ENCODER_MAX_BATCH = 64

# Orchestrator request inputs: every one has shape [1]; only prompt is required.
REQUEST_INPUTS = (
    TensorSpec("prompt", "BYTES", (1,)),
    TensorSpec("negative_prompt", "BYTES", (1,)),
    TensorSpec("height", "INT32", (1,)),
    TensorSpec("width", "INT32", (1,)),
    TensorSpec("steps", "INT32", (1,)),
    TensorSpec("guidance_scale", "FP32", (1,)),
    TensorSpec("seed", "INT64", (1,)),
    TensorSpec("scheduler", "BYTES", (1,)),
    TensorSpec("stream", "BOOL", (1,)),  # send one progress response per denoising step
    TensorSpec("slo_ms", "INT32", (1,)),  # end-to-end latency objective; infeasible -> UNAVAILABLE at once
    TensorSpec("slo_class", "BYTES", (1,)),  # a served SLO class: its slo_ms, priority and quality floor
    TensorSpec("priority", "INT32", (1,)),  # 0..9, higher first under the edf and priority policies
    TensorSpec("min_steps", "INT32", (1,)),  # may serve fewer steps, down to this, to meet slo_ms
    TensorSpec("step_mode", "BYTES", (1,)),  # "fixed" (default) or "auto"
    TensorSpec("preview_every", "INT32", (1,)),  # with stream: a low-resolution preview every N steps
    TensorSpec("unet", "BYTES", (1,)),  # which served UNet variant: "default", a preset named at export, or "cascade"
)
# Final response: image (H, W, 3) uint8 and metadata JSON. Progress responses carry only
# progress = [step, steps] (1-based step).
RESPONSE_OUTPUTS = (
    TensorSpec("image", "UINT8", (-1, -1, 3)),
    TensorSpec("metadata", "BYTES", (1,)),
    TensorSpec("progress", "INT32", (2,)),
    TensorSpec("preview", "UINT8", (-1, -1, 3)),  # latent-resolution RGB approximation, streamed
)
# ControlNet request inputs, declared by the fronts only when the pipeline serves ControlNets: an already
# processed control image (edges, depth, pose) of the request's height x width, a registered ControlNet's
# name and its conditioning scale.
CONTROL_INPUTS = (
    TensorSpec("control_image", "UINT8", (-1, -1, 3)),
    TensorSpec("controlnet", "BYTES", (1,)),
    TensorSpec("controlnet_scale", "FP32", (1,)),
)
# LoRA request input, declared by the fronts only when the pipeline has adapters: "name:scale,name2:scale"
# (registered adapter names, never a path).
LORA_INPUTS = (TensorSpec("lora", "BYTES", (1,)),)
ARRAY_INPUTS = ("control_image",)  # request inputs that are arrays, not [1]-shaped fields
STREAM_ONLY = ("stream", "preview_every")  # request fields the unary front refuses (nothing to stream to)

# The orchestrator through Triton (internal): control messages only (JSON: {"op": "health" | "drain" |
# "events" | "profile", "key": the admin key}), answered in `status` (JSON: {"code", ...}). The fronts
# submit generations over a Unix socket instead (triffusion.channel).
ORCHESTRATOR_INPUTS = (TensorSpec("control", "BYTES", (1,)),)
ORCHESTRATOR_OUTPUTS = (TensorSpec("status", "BYTES", (1,)),)
