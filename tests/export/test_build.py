"""Export: ONNX parity with torch, determinism, idempotence, the --model path, and clear errors."""

import json
import os
import subprocess
import sys

import pytest

from triffusion.export.build import ARTIFACTS, build
from triffusion.export.onnx_export import (ExportParityError, TextEncoderComponent, UNetComponent, VaeDecoderComponent,
                                           check_parity)
from triffusion.export.presets import build_preset


@pytest.fixture(scope="module")
def tiny_pipeline():
    return build_preset("tiny", seed=0)


@pytest.mark.parametrize("make, part", [(TextEncoderComponent, "text_encoder"), (UNetComponent, "unet"),
                                        (VaeDecoderComponent, "vae")])
def test_onnx_matches_torch_at_other_batches_and_resolutions(tiny_build, tiny_pipeline, make, part):
    _, out, _ = tiny_build
    component = make(getattr(tiny_pipeline, part))
    error = check_parity(component, out / ARTIFACTS[component.name], [(1, (8, 8)), (4, (32, 32)), (3, (16, 24))])
    assert error < 1e-3


def test_parity_check_fails_loudly_on_a_wrong_graph(tiny_build, tiny_pipeline):
    _, out, _ = tiny_build
    wrong = UNetComponent(build_preset("tiny", seed=1).unet)  # other weights than the exported graph
    with pytest.raises(ExportParityError, match=r"unet: max \|onnx - torch\|"):
        check_parity(wrong, out / ARTIFACTS["unet"], [(2, (8, 8))])


def test_same_seed_gives_byte_identical_onnx(tiny_build, tmp_path):
    _, out, _ = tiny_build
    again = tmp_path / "again"
    build("tiny", None, again, seed=0, profile=False, log=lambda *_: None)
    for rel in ARTIFACTS.values():
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel
    other = tmp_path / "other"
    build("tiny", None, other, seed=1, profile=False, log=lambda *_: None)
    assert (other / ARTIFACTS["unet"]).read_bytes() != (out / ARTIFACTS["unet"]).read_bytes()


def test_rerun_is_up_to_date_and_force_rebuilds(tiny_build):
    _, out, info = tiny_build
    messages = []
    assert build("tiny", None, out, seed=0, log=messages.append) == info
    assert "up to date" in messages[0]
    assert json.loads((out / "export_manifest.json").read_text())["pipeline"]["sha256"] == info["sha256"]


def test_model_folder_round_trip_gives_the_same_graphs(tiny_build, tmp_path):
    root, out, _ = tiny_build
    folder = root / "models" / "tiny-seed0"
    assert (folder / "model_index.json").exists()
    from_folder = tmp_path / "from_folder"
    info = build(None, str(folder), from_folder, profile=False, log=lambda *_: None)
    assert info["model"] == "tiny-seed0" and info["source"] == str(folder)
    for rel in ARTIFACTS.values():
        assert (from_folder / rel).read_bytes() == (out / rel).read_bytes(), rel
    from triffusion.orchestrator.text import PromptTokenizer

    ids = lambda repo: PromptTokenizer(repo / "orchestrator/1/tokenizer").input_ids("a cat, 4k", "blurry", True)
    assert (ids(from_folder) == ids(out)).all()


def test_repository_has_every_model_and_a_profile(tiny_build):
    _, out, info = tiny_build
    for name in ("text_encoder", "unet", "vae_decoder", "orchestrator", "text_to_image"):
        assert (out / name / "config.pbtxt").exists() and (out / name / "1" / "model.py").exists()
    pipeline = json.loads((out / "orchestrator/1/pipeline.json").read_text())
    assert pipeline["limits"]["size_multiple"] == 16 and pipeline["vae_scale_factor"] == 8
    profile = json.loads((out / "orchestrator/1/profile.json").read_text())
    assert {row[3] for row in profile["unet"]} == {1, 2, 4, 8} and all(row[4] > 0 for row in profile["unet"])


@pytest.mark.parametrize("args, message", [
    (["--preset", "tyni"], "unknown preset 'tyni'; choose one of: sd-turbo, sd15, sd15-lite, sd15-small, sd21-base, tiny"),
    (["--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
    (["--model", "."], "not a diffusers folder (no model_index.json)"),
])
def test_bad_source_is_one_clear_line(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "triffusion.export", "build", *args, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


def test_registry_family_exports_its_variants(tmp_path):
    from pathlib import Path

    registry = Path(__file__).resolve().parents[2] / "registry.example.yaml"
    out = tmp_path / "repo"
    done = subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--registry", str(registry),
                           "--family", "tiny", "--out", str(out), "--no-profile"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pipeline = json.loads((out / "orchestrator/1/pipeline.json").read_text())
    assert pipeline["unets"] == {"default": "unet", "tiny-lite": "unet_tiny_lite"}
    assert pipeline["registry"]["cascade"] == {"light": "light", "heavy": "heavy", "threshold": 0.5}
    assert (out / "unet_tiny_lite/config.pbtxt").exists()
    bad = subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--registry", str(registry),
                          "--family", "nope", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode != 0 and "--family nope: not in" in bad.stderr and "Traceback" not in bad.stderr


def test_preset_without_reachable_weights_says_what_to_pass(tmp_path):
    done = subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--preset", "sd15", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--preset sd15: its weights (stable-diffusion-v1-5/stable-diffusion-v1-5)" in done.stderr
    assert "--random-weights" in done.stderr and "--model PATH" in done.stderr


def test_preset_with_a_checkpoint_of_another_architecture_is_refused(tiny_build, tmp_path):
    root, _, _ = tiny_build
    with pytest.raises(ValueError, match="unet block_out_channels is \\[32, 64\\], the preset's is \\[320"):
        build("sd15", str(root / "models" / "tiny-seed0"), tmp_path / "o", profile=False, log=lambda *_: None)


def test_preset_and_matching_checkpoint_use_the_checkpoint_weights(tiny_build, tmp_path):
    root, out, _ = tiny_build
    info = build("tiny", str(root / "models" / "tiny-seed0"), tmp_path / "o", profile=False, log=lambda *_: None)
    assert info["random_weights"] is False and info["source"].endswith("tiny-seed0")
    assert (tmp_path / "o" / ARTIFACTS["unet"]).read_bytes() == (out / ARTIFACTS["unet"]).read_bytes()


def test_model_folder_with_random_weights_keeps_the_architecture_not_the_weights(tiny_build, tmp_path):
    root, out, _ = tiny_build
    info = build(None, str(root / "models" / "tiny-seed0"), tmp_path / "o", seed=5, random_weights=True,
                 profile=False, log=lambda *_: None)
    assert info["random_weights"] is True and info["seed"] == 5
    import onnx

    graph = lambda repo: onnx.load(str(repo / ARTIFACTS["unet"]))
    ours, theirs = graph(tmp_path / "o"), graph(out)
    shapes = lambda g: sorted((i.name, tuple(i.dims)) for i in g.graph.initializer)
    assert shapes(ours) == shapes(theirs)  # same architecture
    assert (tmp_path / "o" / ARTIFACTS["unet"]).read_bytes() != (out / ARTIFACTS["unet"]).read_bytes()
