"""Model presets: architecture configs kept as data (configs/<preset>/*.json), built with seeded
random weights, or a real pipeline loaded from a local diffusers folder or a hub id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "configs"


@dataclass
class Pipeline:
    name: str
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    tokenizer_dir: Path | None  # a folder with the pipeline's own tokenizer, if it has one


class ExportError(ValueError):
    """An export that cannot go on, with a one-line reason naming the flag to change (the CLI prints it)."""


def presets() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if (p / "unet.json").exists())


def checkpoint_of(preset: str) -> str | None:
    """The hub id of the preset's real weights; None for presets that only exist with random weights."""
    data = json.loads((CONFIGS / "checkpoints.json").read_text())
    return data.get(preset)


def _check_preset(preset: str, flag: str = "preset") -> None:
    if preset not in presets():
        raise ExportError(f"unknown {flag} '{preset}'; choose one of: {', '.join(presets())}")


def resolve_pipeline(preset: str | None, model: str | None, random_weights: bool, seed: int = 0,
                     log=print) -> tuple["Pipeline", str, bool]:
    """The pipeline an export starts from, and (source, random weights?) for the manifest.

    --preset P --random-weights      P's architecture, seeded random weights (how speed is measured here)
    --preset P                       P's real weights from its hub checkpoint (tiny presets: random only)
    --preset P --model PATH|HUB_ID   real weights from PATH, checked against P's architecture
    --model PATH|HUB_ID              real weights, architecture as the checkpoint says
    --model PATH --random-weights    the checkpoint's architecture (configs only), seeded random weights"""
    if not preset and not model:
        raise ExportError("pass --preset NAME, --model PATH, or both")
    if preset:
        _check_preset(preset)
    if preset and (random_weights or (not model and checkpoint_of(preset) is None)):
        if model:
            raise ExportError("--random-weights with --preset takes no --model: the preset is the architecture")
        if not random_weights:
            log(f"preset {preset} has no released checkpoint: seeded random weights (seed {seed})")
        return build_preset(preset, seed), preset, True
    if random_weights:
        return build_from_configs(model, seed), model, True
    source = model or checkpoint_of(preset)
    try:
        pipeline = load_pipeline(source)
    except ExportError:
        if model:
            raise
        raise ExportError(f"--preset {preset}: its weights ({source}) are neither cached here nor reachable on the "
                         "hub; pass --model PATH for a local diffusers folder, or --random-weights for the "
                         "architecture with seeded random weights") from None
    if preset:
        check_architecture(pipeline, preset)
    return pipeline, source, False


def check_architecture(pipeline: "Pipeline", preset: str) -> None:
    """Real weights under a preset's name must have the preset's shapes (or the profiles would lie)."""
    expected = _config(preset, "unet")
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block", "in_channels",
                "down_block_types", "up_block_types"):
        have = pipeline.unet.config.get(key)
        want = expected.get(key)
        if want is not None and (list(have) if isinstance(have, (list, tuple)) else have) != want:
            raise ExportError(f"--preset {preset}: the checkpoint's unet {key} is {have}, the preset's is {want}; "
                             "pass the matching --preset, or only --model")


def _config(preset: str, name: str) -> dict:
    data = json.loads((CONFIGS / preset / f"{name}.json").read_text())
    # Keys starting with "_" are provenance notes, not constructor arguments.
    return {k: v for k, v in data.items() if not k.startswith("_")}


def build_preset(preset: str, seed: int = 0) -> Pipeline:
    """The preset's architecture with seeded random weights: same seed, same weights."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _check_preset(preset)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_config(preset, "text_encoder")))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**_config(preset, "unet"))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**_config(preset, "vae"))
    scheduler_class = json.loads((CONFIGS / preset / "scheduler.json").read_text())["_class_name"]
    scheduler = getattr(diffusers, scheduler_class).from_config(_config(preset, "scheduler"))  # drops unknown keys
    return Pipeline(preset, text_encoder.eval(), unet.eval(), vae.eval(), scheduler, None)


def build_unet_variant(preset: str, base: Pipeline, seed: int = 0, random_weights: bool = True) -> torch.nn.Module:
    """A second UNet served beside `base` (same text encoder and VAE), e.g. a block-removed light model:
    seeded random weights, or the preset's checkpoint's UNet when the base has real weights."""
    from diffusers import UNet2DConditionModel

    _check_preset(preset, "--unet-variant")
    config = _config(preset, "unet")
    for key in ("cross_attention_dim", "in_channels", "out_channels"):
        if config.get(key) != base.unet.config[key]:
            raise ExportError(f"--unet-variant {preset}: {key} {config.get(key)} does not match the base model's "
                             f"{base.unet.config[key]}; a variant must share the text encoder and VAE")
    checkpoint = checkpoint_of(preset)
    if not random_weights and checkpoint:
        try:
            return UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet").eval()
        except OSError as exc:
            raise ExportError(f"--unet-variant {preset}: its weights ({checkpoint}) could not be loaded "
                             f"({str(exc).splitlines()[0]}); pass --random-weights to measure the architecture") from None
    torch.manual_seed(seed + 1)
    return UNet2DConditionModel(**config).eval()


def build_from_configs(model: str, seed: int = 0) -> Pipeline:
    """A checkpoint's architecture (its config files only) with seeded random weights."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(model)
    if not (path / "model_index.json").exists():
        raise ExportError(f"--model {model} --random-weights: needs a local diffusers folder (with model_index.json) "
                         "to read the architecture from")
    read = lambda sub: {k: v for k, v in json.loads((path / sub / "config.json").read_text()).items()
                        if not k.startswith("_")}
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**read("text_encoder")))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**read("unet"))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**read("vae"))
    scheduler_data = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_data["_class_name"]).from_config(scheduler_data)
    tokenizer_dir = path / "tokenizer" if (path / "tokenizer").exists() else None
    return Pipeline(path.name, text_encoder.eval(), unet.eval(), vae.eval(), scheduler, tokenizer_dir)


def controlnet_presets() -> list[str]:
    """ControlNet architectures (configs/<preset>/controlnet.json), each matching one UNet preset (`_base`)."""
    return sorted(p.name for p in CONFIGS.iterdir() if (p / "controlnet.json").exists())


# The modules diffusers zero-initializes so that an untrained ControlNet adds nothing (its "zero convs").
_ZERO_CONVS = ("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid_block")


def build_controlnet(preset: str, base_unet: torch.nn.Module, seed: int = 0,
                     random_weights: bool = True) -> torch.nn.Module:
    """A ControlNet for `base_unet` from `preset`: a ControlNet preset (configs/<preset>/controlnet.json) with
    seeded random weights, or with its checkpoint's real weights (configs/checkpoints.json) when the
    pipeline has real weights; or a local ControlNetModel folder / hub id (real weights).
    Random weights re-draw the zero convs with PyTorch's default conv init: a trained ControlNet has moved
    away from zero, and zeros would make control a no-op that no test could tell from a bug."""
    from diffusers import ControlNetModel

    known = preset in controlnet_presets()
    if not known and not (Path(preset).is_dir() or preset.count("/") == 1):
        raise ExportError(f"unknown ControlNet preset '{preset}'; choose one of: {', '.join(controlnet_presets())}, "
                          "or a local ControlNetModel folder")
    checkpoint = preset if not known else (None if random_weights else checkpoint_of(preset))
    if checkpoint:
        try:
            controlnet = ControlNetModel.from_pretrained(checkpoint).eval()
        except OSError as exc:
            raise ExportError(f"ControlNet {preset}: its weights ({checkpoint}) could not be loaded "
                              f"({str(exc).splitlines()[0]}); pass --random-weights for the architecture") from None
    else:
        torch.manual_seed(seed + 3)
        controlnet = ControlNetModel(**_config(preset, "controlnet")).eval()
        for name, module in controlnet.named_modules():
            if name.startswith(_ZERO_CONVS) and isinstance(module, torch.nn.Conv2d):
                module.reset_parameters()
    check_controlnet(controlnet, base_unet, preset)
    return controlnet


def check_controlnet(controlnet: torch.nn.Module, unet: torch.nn.Module, preset: str) -> None:
    """A ControlNet's residuals must fit the UNet's blocks: same encoder layout and latent channels."""
    from triffusion.components import residual_layout

    for key in ("in_channels", "cross_attention_dim"):
        if controlnet.config[key] != unet.config[key]:
            raise ExportError(f"ControlNet {preset}: {key} {controlnet.config[key]} does not match the UNet's "
                              f"{unet.config[key]}")
    if residual_layout(controlnet.config) != residual_layout(unet.config):
        raise ExportError(f"ControlNet {preset}: its residuals {residual_layout(controlnet.config)} (channels, "
                          f"stride) do not match the UNet's down blocks {residual_layout(unet.config)}")


def variant_model_name(preset: str) -> str:
    return "unet_" + preset.replace("-", "_")


def load_pipeline(model: str) -> Pipeline:
    """A real checkpoint: a local diffusers folder, or a hub id on a machine that reaches the hub."""
    from diffusers import StableDiffusionPipeline

    path = Path(model)
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise ExportError(f"--model {model}: no such folder; pass a local diffusers folder (with model_index.json)")
    if path.exists() and not (path / "model_index.json").exists():
        raise ExportError(f"--model {model}: not a diffusers folder (no model_index.json); "
                         "pass the folder that save_pretrained wrote")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    except OSError as exc:
        raise ExportError(f"--model {model}: not a local folder and the hub could not provide it "
                         f"({str(exc).splitlines()[0]}); pass a local diffusers folder") from None
    tokenizer_dir = path / "tokenizer" if path.exists() and (path / "tokenizer").exists() else None
    name = path.name if path.exists() else model.replace("/", "--")
    return Pipeline(name, pipe.text_encoder.eval(), pipe.unet.eval(), pipe.vae.eval(), pipe.scheduler, tokenizer_dir)


def save_pipeline(pipeline: Pipeline, tokenizer_dir: Path, out: Path) -> Path:
    """Write a standard diffusers folder, so `--model PATH` and plain-diffusers baselines can load it."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(vae=pipeline.vae, text_encoder=pipeline.text_encoder,
                                   tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)), unet=pipeline.unet,
                                   scheduler=pipeline.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    return out
