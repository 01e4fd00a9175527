"""add-lora refuses what it cannot serve, naming why, before touching the repository."""

import json

import pytest

from triffusion.export.lora import add_lora


def repository(tmp_path, lora=None):
    folder = tmp_path / "repo" / "orchestrator" / "1"
    folder.mkdir(parents=True)
    (folder / "pipeline.json").write_text(json.dumps({"model": "tiny", **({"lora": lora} if lora else {})}))
    return tmp_path / "repo"


def test_a_repository_without_adapter_support_is_refused(tmp_path):
    with pytest.raises(ValueError, match="serves no LoRA adapters: rebuild it from a registry family with a `lora`"):
        add_lora(repository(tmp_path), "x", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a built repository"):
        add_lora(tmp_path / "nowhere", "x", tmp_path / "x.safetensors")


@pytest.mark.parametrize("name", ["a:b", "a,b", "../up", ""])
def test_adapter_names_cannot_carry_the_request_syntax_or_a_path(tmp_path, name):
    repo = repository(tmp_path, {"artifact": "unet/1/lora_base", "adapters": {}, "max_rank": 8})
    with pytest.raises(ValueError, match="--name"):
        add_lora(repo, name, tmp_path / "x.safetensors")
    assert not (repo / "orchestrator" / "1" / "adapters").exists()
