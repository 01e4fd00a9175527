"""A real CLIP BPE tokenizer, offline: CLIP's `bpe_simple_vocab_16e6.txt.gz` (shipped inside the
clip-anytorch and open-clip-torch wheels) turned into Hugging Face CLIPTokenizer files, built exactly
the way CLIP's SimpleTokenizer builds its vocabulary, so the ids equal CLIP's."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
PACKAGES = {"clip": "clip-anytorch", "open_clip": "open-clip-torch"}


def find_vocab(override: str | Path | None = None) -> Path:
    """The BPE vocabulary file, located without importing the packages (they pull in torchvision)."""
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"--vocab {path} does not exist")
        return path
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / VOCAB_FILE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{VOCAB_FILE} not found: `pip install --no-deps clip-anytorch==2.6.0` "
                            "(or open-clip-torch) provides it, or pass --vocab PATH")


def bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer(out_dir: Path, vocab: str | Path | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config into `out_dir`."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids, merges = vocab_and_merges(find_vocab(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
