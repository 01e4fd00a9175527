"""Prompt tokenization with the CLIP BPE tokenizer the export placed next to the orchestrator."""

from __future__ import annotations

import html
import re

import numpy as np

from triffusion.contract import TEXT_MAX_LENGTH


def clip_clean(text: str) -> str:
    """CLIP's own text cleaning before BPE (ftfy, HTML entities twice, whitespace), so ids equal CLIP's."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptTokenizer:
    def __init__(self, path):
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(path))

    def count(self, text: str) -> int:
        """Tokens in `text` without the start and end tokens."""
        return len(self.tokenizer(clip_clean(text), add_special_tokens=False)["input_ids"])

    def input_ids(self, prompt: str, negative_prompt: str, cfg: bool) -> np.ndarray:
        """(2, 77) with the negative (unconditional) row first under CFG, else (1, 77)."""
        texts = [clip_clean(t) for t in ([negative_prompt, prompt] if cfg else [prompt])]
        ids = self.tokenizer(texts, padding="max_length", max_length=TEXT_MAX_LENGTH,
                             truncation=True, return_tensors="np")["input_ids"]
        return ids.astype(np.int64)
