"""Prompt tokenization with the CLIP BPE tokenizer the export placed next to the orchestrator."""

from __future__ import annotations

import numpy as np

from triffusion.contract import TEXT_MAX_LENGTH


class PromptTokenizer:
    def __init__(self, path):
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(path))

    def count(self, text: str) -> int:
        """Tokens in `text` without the start and end tokens."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def input_ids(self, prompt: str, negative_prompt: str, cfg: bool) -> np.ndarray:
        """(2, 77) with the negative (unconditional) row first under CFG, else (1, 77)."""
        texts = [negative_prompt, prompt] if cfg else [prompt]
        ids = self.tokenizer(texts, padding="max_length", max_length=TEXT_MAX_LENGTH,
                             truncation=True, return_tensors="np")["input_ids"]
        return ids.astype(np.int64)
