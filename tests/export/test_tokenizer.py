"""The serving tokenizer (export's CLIP BPE files + PromptTokenizer) gives CLIP's own ids; the
reference is SimpleTokenizer from the clip-anytorch wheel."""

import importlib.util
from pathlib import Path

import pytest
from triffusion.export.tokenizer import find_vocab
from triffusion.orchestrator.text import PromptTokenizer

TEXTS = [
    "a red bicycle",
    "A photo of an astronaut riding a horse on Mars, 4k, highly detailed!!!",
    "Café déjà vu — naïve façade, crème brûlée",
    "don't stop   believing   it's 1984; we're   here",
    "emoji 🚲🔥 and <html> &amp; entities",
    "UPPER lower MiXeD 3.14159 x=2*y",
    "日本の桜と富士山",
    "   leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def reference():
    path = Path(find_vocab()).parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # plain `import clip` would pull torchvision
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def ours(tiny_build):
    _, out, _ = tiny_build
    return PromptTokenizer(out / "orchestrator" / "1" / "tokenizer")


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_clip(reference, ours, text):
    expected = [49406] + reference.encode(text) + [49407]
    ids = ours.input_ids(text, "", cfg=False)[0].tolist()
    assert ids[:len(expected)] == expected and set(ids[len(expected):]) <= {49407}
    assert ours.count(text) == len(expected) - 2


def test_padding_to_context_length_uses_end_token(ours):
    ids = ours.input_ids("a cat", "ugly", cfg=True)
    assert ids.shape == (2, 77)
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407] and set(ids[1, 4:].tolist()) == {49407}


def test_missing_vocab_names_the_wheels(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_vocab(tmp_path / "nope.txt.gz")
