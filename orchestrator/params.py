"""Request parameters, their limits, and validation. Every error names the field and the allowed range."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from .errors import InvalidRequest


SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "unipc", "heun")
STEP_MODES = ("fixed", "auto")


@dataclass(frozen=True)
class Limits:
    """What the served pipeline accepts; written by the export into pipeline.json."""

    min_size: int = 64
    max_size: int = 512
    size_multiple: int = 16
    default_height: int = 64
    default_width: int = 64
    min_steps: int = 1
    max_steps: int = 100
    default_steps: int = 20
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    default_guidance: float = 7.5
    max_prompt_tokens: int = 75  # CLIP's 77 minus start and end tokens
    # Checked before tokenizing, so a huge prompt costs nothing: 75 CLIP tokens are rarely over 400 UTF-8
    # bytes; 16 per token leaves room for long words and non-Latin scripts.
    max_prompt_bytes: int = 1200
    default_scheduler: str = "euler"
    max_seed: int = 2**63 - 1
    max_slo_ms: int = 3_600_000
    max_priority: int = 9
    sizes: tuple | None = None  # (height, width) pairs the engines were built for; None = any in range
    unets: tuple = ("default",)  # UNet variants served: "default" and the presets exported beside it
    # Named service levels (registry slo_classes): {name: {"slo_ms", "priority"?, "min_quality"?}}
    slo_classes: dict | None = None
    controlnets: tuple = ()  # ControlNets served (registry controlnets): the names a request may give
    min_controlnet_scale: float = 0.0
    max_controlnet_scale: float = 2.0
    default_controlnet_scale: float = 1.0
    adapters: tuple = ()  # LoRA adapters registered (pipeline.json lora.adapters): the names `lora` may give
    max_lora: int = 0  # adapters a request may name (registry lora.max_per_request); 0: the server has none
    min_lora_scale: float = -2.0
    max_lora_scale: float = 2.0
    lora_with_controlnet: bool = False  # the controlled UNet has the adapter slots too (lora and control served)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Limits":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown limits keys: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        if data.get("sizes") is not None:
            data = {**data, "sizes": tuple(tuple(s) for s in data["sizes"])}
        for key in ("unets", "controlnets", "adapters"):
            if key in data:
                data = {**data, key: tuple(data[key])}
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    height: int = 64
    width: int = 64
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    scheduler: str = "euler"
    stream: bool = False
    slo_ms: int | None = None  # end-to-end latency objective; None = best effort
    priority: int = 0  # higher goes first under the priority-aware policies
    min_steps: int | None = None  # allows serving fewer steps (down to this) to meet slo_ms
    step_mode: str = "fixed"  # "auto": the server picks the step count (up to `steps`) that meets slo_ms
    preview_every: int = 0  # with stream: a low-resolution preview every this many steps (0 = none)
    unet: str = "default"  # UNet variant
    slo_class: str | None = None  # a served SLO class; it set slo_ms, priority and min_quality
    min_quality: float | None = None  # quality floor (0..1 on the served step-quality profile) from the class
    controlnet: str | None = None  # a served ControlNet's name; None: no control
    controlnet_scale: float | None = None  # its conditioning scale (multiplies its residuals); None without
    control_image: Any = None  # with controlnet: the processed control image, (height, width, 3) uint8
    lora: tuple = ()  # ((adapter name, scale), ...): registered LoRA adapters applied to the UNet

    @property
    def uses_cfg(self) -> bool:
        """Classifier-free guidance needs the unconditional branch only when the scale exceeds 1."""
        return self.guidance_scale > 1.0


def _in_range(name: str, value, low, high):
    if not low <= value <= high:
        raise InvalidRequest(name, f"{value} is out of range; allowed {low}..{high}")


FIELDS = tuple(f for f in GenerationParams.__dataclass_fields__)


def _text(name: str, value, limits: Limits) -> str:
    """A text field as str, its byte length checked before anything reads it further."""
    if isinstance(value, bytes):
        if len(value) > limits.max_prompt_bytes:
            raise InvalidRequest(name, f"is {len(value)} bytes long; allowed up to {limits.max_prompt_bytes} bytes "
                                       f"({limits.max_prompt_tokens} tokens)")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(name, "is not valid UTF-8") from None
    text = str(value)
    if len(text.encode("utf-8", errors="replace")) > limits.max_prompt_bytes:
        raise InvalidRequest(name, f"is longer than {limits.max_prompt_bytes} bytes; allowed up to "
                                   f"{limits.max_prompt_tokens} tokens")
    return text


def _int(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(name, f"{value!r} is not an integer") from None
    if isinstance(value, float) and number != value:
        raise InvalidRequest(name, f"{value!r} is not an integer")
    return number


def parse_params(raw: Mapping[str, Any], limits: Limits, count_tokens=None) -> GenerationParams:
    """Build validated parameters from decoded request inputs (python scalars, str or UTF-8 bytes).

    `count_tokens(text) -> int` counts prompt tokens without start/end tokens; None skips the count (the
    caller already tokenized and checked). Unknown fields are refused by name.
    """
    # 0. Nothing the server does not know.
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"is not a request field; allowed: {', '.join(FIELDS)}")

    # 1. Prompt: present, non-empty, within the text encoder's context (bytes first, then tokens).
    prompt = raw.get("prompt")
    if prompt is None:
        raise InvalidRequest("prompt", "is required")
    prompt = _text("prompt", prompt, limits)
    if not prompt.strip():
        raise InvalidRequest("prompt", f"is empty; allowed 1..{limits.max_prompt_tokens} tokens")
    negative = _text("negative_prompt", raw.get("negative_prompt") or "", limits)
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        tokens = count_tokens(text) if text and count_tokens is not None else 0
        if tokens > limits.max_prompt_tokens:
            raise InvalidRequest(name, f"is {tokens} tokens long; allowed 1..{limits.max_prompt_tokens} tokens")

    # 2. Resolution: within range and a multiple of what the UNet and VAE accept.
    size = {}
    for name, default in (("height", limits.default_height), ("width", limits.default_width)):
        value = _int(name, raw.get(name, default))
        if value % limits.size_multiple or not limits.min_size <= value <= limits.max_size:
            raise InvalidRequest(name, f"{value} is not allowed; allowed multiples of {limits.size_multiple} "
                                       f"in {limits.min_size}..{limits.max_size}")
        size[name] = value
    if limits.sizes is not None and (size["height"], size["width"]) not in limits.sizes:
        served = ", ".join(f"{h}x{w}" for h, w in limits.sizes)
        raise InvalidRequest("height", f"{size['height']}x{size['width']} (height x width) is not served; "
                                       f"allowed: {served}")

    # 3. Sampling controls.
    steps = _int("steps", raw.get("steps", limits.default_steps))
    _in_range("steps", steps, limits.min_steps, limits.max_steps)
    try:
        guidance = float(raw.get("guidance_scale", limits.default_guidance))
    except (TypeError, ValueError):
        raise InvalidRequest("guidance_scale", f"is not a number; allowed {limits.min_guidance}..{limits.max_guidance}") from None
    if guidance != guidance:  # NaN
        raise InvalidRequest("guidance_scale", f"is NaN; allowed {limits.min_guidance}..{limits.max_guidance}")
    _in_range("guidance_scale", guidance, limits.min_guidance, limits.max_guidance)
    scheduler = _text("scheduler", raw.get("scheduler") or limits.default_scheduler, limits)
    if scheduler not in SCHEDULERS:
        raise InvalidRequest("scheduler", f"'{scheduler}' is unknown; allowed: {', '.join(SCHEDULERS)}")
    seed = raw.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else _int("seed", seed)
    _in_range("seed", seed, 0, limits.max_seed)

    # 4. Service level: a class (its latency objective, priority and quality floor, unless the request sets
    #    them), priority, and how far steps may drop to meet it.
    slo_class = raw.get("slo_class") or None  # "" (perf_analyzer must send every input): no class
    level: dict = {}
    if slo_class is not None:
        slo_class = _text("slo_class", slo_class, limits)
        classes = limits.slo_classes or {}
        if slo_class not in classes:
            raise InvalidRequest("slo_class", f"'{slo_class}' is not served; allowed: "
                                              f"{', '.join(sorted(classes)) or 'none (the server has no SLO classes)'}")
        level = classes[slo_class]
    slo_ms = raw.get("slo_ms", level.get("slo_ms"))
    if slo_ms is not None:
        slo_ms = _int("slo_ms", slo_ms)
        _in_range("slo_ms", slo_ms, 1, limits.max_slo_ms)
    priority = _int("priority", raw.get("priority", level.get("priority", 0)))
    _in_range("priority", priority, 0, limits.max_priority)
    min_steps = raw.get("min_steps")
    if min_steps is not None:
        min_steps = _int("min_steps", min_steps)
        _in_range("min_steps", min_steps, limits.min_steps, steps)
    preview_every = _int("preview_every", raw.get("preview_every", 0))
    _in_range("preview_every", preview_every, 0, limits.max_steps)
    unet = _text("unet", raw.get("unet") or "default", limits)
    if unet not in limits.unets:
        raise InvalidRequest("unet", f"'{unet}' is not served; allowed: {', '.join(limits.unets)}")
    step_mode = _text("step_mode", raw.get("step_mode") or "fixed", limits)
    if step_mode not in STEP_MODES:
        raise InvalidRequest("step_mode", f"'{step_mode}' is unknown; allowed: {', '.join(STEP_MODES)}")
    min_quality = raw.get("min_quality", level.get("min_quality"))
    if min_quality is not None:
        try:
            min_quality = float(min_quality)
        except (TypeError, ValueError):
            raise InvalidRequest("min_quality", f"{min_quality!r} is not a number; allowed 0..1") from None
        if min_quality != min_quality:
            raise InvalidRequest("min_quality", "is NaN; allowed 0..1")
        _in_range("min_quality", min_quality, 0.0, 1.0)

    # 5. Control: a served ControlNet, its scale, and an already processed control image of the request's size.
    controlnet, controlnet_scale, control_image = _control(raw, limits, unet, size["height"], size["width"])

    # 6. LoRA adapters: registered names with scales, at most max_lora of them.
    lora = _lora(raw.get("lora"), limits, unet, controlnet)

    return GenerationParams(prompt=prompt, negative_prompt=negative, steps=steps,
                            guidance_scale=guidance, seed=seed, scheduler=scheduler,
                            stream=bool(raw.get("stream", False)), slo_ms=slo_ms, priority=priority,
                            min_steps=min_steps, step_mode=step_mode, preview_every=preview_every, unet=unet,
                            slo_class=slo_class, min_quality=min_quality, controlnet=controlnet,
                            controlnet_scale=controlnet_scale, control_image=control_image, lora=lora, **size)


def _control(raw: Mapping[str, Any], limits: Limits, unet: str, height: int, width: int):
    """(controlnet, controlnet_scale, control_image) of a request; control fields without a ControlNet are refused."""
    served = ", ".join(limits.controlnets) or "none (the server has no ControlNets)"
    controlnet = raw.get("controlnet") or None
    scale, image = raw.get("controlnet_scale"), raw.get("control_image")
    if controlnet is None:
        for name, value in (("control_image", image), ("controlnet_scale", scale)):
            if value is not None:
                raise InvalidRequest(name, f"needs controlnet (a served ControlNet: {served})")
        return None, None, None
    controlnet = _text("controlnet", controlnet, limits)
    if controlnet not in limits.controlnets:
        raise InvalidRequest("controlnet", f"'{controlnet}' is not served; allowed: {served}")
    if unet != "default":
        raise InvalidRequest("controlnet", f"runs with unet 'default' only; the request asks for unet '{unet}'")
    low, high = limits.min_controlnet_scale, limits.max_controlnet_scale
    if scale is None:
        scale = limits.default_controlnet_scale
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise InvalidRequest("controlnet_scale", f"{scale!r} is not a number; allowed {low}..{high}") from None
    if scale != scale:
        raise InvalidRequest("controlnet_scale", f"is NaN; allowed {low}..{high}")
    if not low <= scale <= high:  # FP32 on the wire: 0.1 arrives as 0.10000000149..., shown as sent
        raise InvalidRequest("controlnet_scale", f"{scale:.6g} is out of range; allowed {low}..{high}")
    want = f"allowed ({height}, {width}, 3) UINT8: height x width x RGB, the request's size"
    if image is None:
        raise InvalidRequest("control_image", f"is required with controlnet; {want}")
    if not isinstance(image, np.ndarray):
        raise InvalidRequest("control_image", f"is not an image array; {want}")
    if image.dtype != np.uint8:
        raise InvalidRequest("control_image", f"has type {image.dtype}; {want}")
    if image.shape != (height, width, 3):
        raise InvalidRequest("control_image", f"has shape {tuple(image.shape)}; {want}")
    return controlnet, scale, np.ascontiguousarray(image)


def _lora(value, limits: Limits, unet: str, controlnet: str | None = None) -> tuple:
    """`lora`: "name:scale,name2:scale" (a bare name means scale 1), or the parsed pairs the orchestrator gets
    from a front; registered names only, each once, at most max_lora, scales in range."""
    if value is None or value == "" or value == b"" or (isinstance(value, (list, tuple)) and not value):
        return ()
    low, high = limits.min_lora_scale, limits.max_lora_scale
    form = f"allowed: up to {limits.max_lora} of NAME:SCALE separated by commas, SCALE in {low}..{high}"
    if not limits.max_lora:
        raise InvalidRequest("lora", "is not served: the server has no LoRA adapters")
    if isinstance(value, (list, tuple)):
        pairs = [tuple(p) if isinstance(p, (list, tuple)) and len(p) == 2 else (None, None) for p in value]
    else:
        text = _text("lora", value, limits)
        pairs = []
        for item in text.split(","):
            name, sep, scale = item.strip().partition(":")
            pairs.append((name.strip(), scale.strip() if sep else "1.0"))
    if len(pairs) > limits.max_lora:
        raise InvalidRequest("lora", f"names {len(pairs)} adapters; {form}")
    if unet != "default":
        raise InvalidRequest("lora", f"applies to unet 'default' only; the request asks for unet '{unet}'")
    if controlnet is not None and not limits.lora_with_controlnet:
        raise InvalidRequest("lora", "is not served together with controlnet on this server; send one or the other")
    out, seen = [], set()
    for name, scale in pairs:
        if not isinstance(name, str) or not name:
            raise InvalidRequest("lora", f"is malformed; {form}")
        if name not in limits.adapters:
            served = ", ".join(limits.adapters) or "none"
            raise InvalidRequest("lora", f"'{name[:64]}' is not a registered adapter; allowed: {served}")
        if name in seen:
            raise InvalidRequest("lora", f"names '{name}' twice; {form}")
        seen.add(name)
        try:
            number = float(scale)
        except (TypeError, ValueError):
            raise InvalidRequest("lora", f"scale '{str(scale)[:32]}' of '{name}' is not a number; {form}") from None
        if number != number or not low <= number <= high:
            raise InvalidRequest("lora", f"scale {number} of '{name}' is out of range; allowed {low}..{high}")
        out.append((name, number))
    return tuple(out)
