"""CLIP score of (image, prompt) pairs on a transformers CLIPModel: the quality harness's metric
(perf/quality.py) and the cascade's CLIP quality gate (orchestrator/gate.py) use this one scorer.

CLIP score is torchmetrics' definition, 100 * cos(image embedding, prompt embedding), clamped at 0 per
pair as in Hessel et al. Weights come from a hub id (on a host that reaches the hub) or a local folder
saved with `save_pretrained`; `ClipScorer.random` builds a tiny seeded one for tests of the plumbing."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default, the usual one in papers
CLIP_CONTEXT = 77


class ClipError(RuntimeError):
    """CLIP weights cannot be loaded; the message says what to supply."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class ClipScorer:
    """CLIP score of (image, prompt) pairs with a transformers CLIPModel and its processor."""

    def __init__(self, model, processor, name: str, device: str = "cpu", batch_size: int = 32):
        self.model = model.eval().to(device)
        self.processor, self.name, self.device, self.batch_size = processor, name, device, batch_size

    @classmethod
    def pretrained(cls, source: str = DEFAULT_CLIP, device: str = "cpu") -> "ClipScorer":
        """A hub id (on a host that reaches the hub) or a local folder saved with `save_pretrained`."""
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

        how = ("give a local folder holding a transformers CLIPModel and its processor (both saved with "
               "save_pretrained on a host that reaches the hub)")
        location = str(Path(source).expanduser())
        if source.startswith(("/", ".", "~")) and not Path(location).is_dir():
            raise ClipError(f"CLIP folder {source} does not exist; {how}")
        try:
            model = CLIPModel.from_pretrained(location)
            # The PIL processor is CLIP's reference preprocessing and needs no torchvision.
            processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(location),
                                      tokenizer=CLIPTokenizer.from_pretrained(location))
        except (OSError, ValueError) as exc:
            raise ClipError(f"CLIP weights '{source}' cannot be loaded ({_one_line(exc)}); {how}") from None
        return cls(model, processor, name=source, device=device)

    @classmethod
    def random(cls, seed: int = 0, width: int = 32, layers: int = 2, image_size: int = 32, patch_size: int = 8,
               projection_dim: int = 16) -> "ClipScorer":
        """A tiny CLIP with seeded random weights and CLIP's real tokenizer, for tests of the plumbing."""
        from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

        tokenizer = _clip_tokenizer()
        tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2)
        config = CLIPConfig(text_config={**tower, "vocab_size": tokenizer.vocab_size,
                                         "max_position_embeddings": CLIP_CONTEXT},
                            vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
                            projection_dim=projection_dim)
        torch.manual_seed(seed)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                crop_size={"height": image_size, "width": image_size})
        return cls(CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer),
                   name=f"random-clip-seed{seed}")

    def cosine(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """cos(image embedding, prompt embedding) in [-1, 1] per (HxWx3 uint8 image, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; expected one prompt per image")
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = slice(start, start + self.batch_size)
            inputs = self.processor(text=list(prompts[batch]), images=list(images[batch]), return_tensors="pt",
                                    padding=True, truncation=True, max_length=CLIP_CONTEXT).to(self.device)
            with torch.inference_mode():
                embeds = self.model(**inputs)  # image_embeds and text_embeds come L2-normalized
            out.append((embeds.image_embeds * embeds.text_embeds).sum(dim=-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """CLIP score, 100 * max(cosine, 0), in [0, 100] per (image, prompt) pair."""
        return 100.0 * np.clip(self.cosine(images, prompts), 0.0, None)


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    """CLIP's BPE tokenizer built offline from the vocabulary a wheel ships (building it takes seconds)."""
    from transformers import CLIPTokenizer

    from triffusion.export.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(write_tokenizer(Path(tmp))))
