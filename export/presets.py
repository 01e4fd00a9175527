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


def presets() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if (p / "unet.json").exists())


def _config(preset: str, name: str) -> dict:
    data = json.loads((CONFIGS / preset / f"{name}.json").read_text())
    # Keys starting with "_" are provenance notes, not constructor arguments.
    return {k: v for k, v in data.items() if not k.startswith("_")}


def build_preset(preset: str, seed: int = 0) -> Pipeline:
    """The preset's architecture with seeded random weights: same seed, same weights."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in presets():
        raise SystemExit(f"unknown preset '{preset}'; choose one of: {', '.join(presets())}")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_config(preset, "text_encoder")))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**_config(preset, "unet"))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**_config(preset, "vae"))
    scheduler_class = json.loads((CONFIGS / preset / "scheduler.json").read_text())["_class_name"]
    scheduler = getattr(diffusers, scheduler_class).from_config(_config(preset, "scheduler"))  # drops unknown keys
    return Pipeline(preset, text_encoder.eval(), unet.eval(), vae.eval(), scheduler, None)


def build_unet_variant(preset: str, base: Pipeline, seed: int = 0) -> torch.nn.Module:
    """A second UNet served beside `base` (same text encoder and VAE), e.g. a block-removed light model."""
    from diffusers import UNet2DConditionModel

    if preset not in presets():
        raise SystemExit(f"unknown --unet-variant '{preset}'; choose one of: {', '.join(presets())}")
    config = _config(preset, "unet")
    for key in ("cross_attention_dim", "in_channels", "out_channels"):
        if config.get(key) != base.unet.config[key]:
            raise SystemExit(f"--unet-variant {preset}: {key} {config.get(key)} does not match the base model's "
                             f"{base.unet.config[key]}; a variant must share the text encoder and VAE")
    torch.manual_seed(seed + 1)
    return UNet2DConditionModel(**config).eval()


def variant_model_name(preset: str) -> str:
    return "unet_" + preset.replace("-", "_")


def load_pipeline(model: str) -> Pipeline:
    """A real checkpoint: a local diffusers folder, or a hub id on a machine that reaches the hub."""
    from diffusers import StableDiffusionPipeline

    path = Path(model)
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise SystemExit(f"--model {model}: no such folder; pass a local diffusers folder (with model_index.json)")
    if path.exists() and not (path / "model_index.json").exists():
        raise SystemExit(f"--model {model}: not a diffusers folder (no model_index.json); "
                         "pass the folder that save_pretrained wrote")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    except OSError as exc:
        raise SystemExit(f"--model {model}: not a local folder and the hub could not provide it "
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
