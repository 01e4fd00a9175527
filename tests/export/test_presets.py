"""Presets are real architectures kept as data; the torch runtime matches the exported graphs."""

import json

import numpy as np
import pytest
import torch

from triffusion.export.build import ARTIFACTS
from triffusion.export.onnx_export import UNetComponent
from triffusion.export.presets import CONFIGS, _config, presets
from triffusion.runtime import OnnxRuntime, TorchRuntime


@pytest.mark.parametrize("preset, unet_params, text_params", [
    ("sd15", 859_520_964, 123_060_480),  # SD1.5: UNet and CLIP ViT-L/14 text
    ("sd15-lite", 579_384_964, 123_060_480),  # one block pair per stage (BK-SDM-Base size)
    ("sd15-small", 482_346_884, 123_060_480),  # ... and no mid block (BK-SDM-Small size)
    ("sd21-base", 865_910_724, 340_387_840),  # SD2.1: UNet and OpenCLIP ViT-H/14 text
    ("sd-turbo", 865_910_724, 340_387_840),  # SD2.1 architecture, distilled
])
def test_presets_have_the_real_parameter_counts(preset, unet_params, text_params):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # shapes only: no GBs of weights on a CI machine
        unet = UNet2DConditionModel(**_config(preset, "unet"))
        text = CLIPTextModel(CLIPTextConfig(**_config(preset, "text_encoder")))
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    assert sum(p.numel() for p in text.parameters()) == text_params
    assert preset in presets()


def test_turbo_uses_its_own_scheduler():
    scheduler = json.loads((CONFIGS / "sd-turbo" / "scheduler.json").read_text())
    assert scheduler["_class_name"] == "EulerAncestralDiscreteScheduler" and scheduler["timestep_spacing"] == "trailing"


def test_preset_files_name_their_source():
    assert json.loads((CONFIGS / "sd15" / "unet.json").read_text())["_source"].startswith("Stable Diffusion 1.5")


def test_torch_runtime_matches_onnx_runtime(tiny_build):
    from triffusion.export.presets import build_preset

    _, out, _ = tiny_build
    component = UNetComponent(build_preset("tiny", seed=0).unet)
    torch_rt = TorchRuntime(component.module, component.input_names, component.output_names, device="cpu")
    onnx_rt = OnnxRuntime(out / ARTIFACTS["unet"])
    inputs = {n: t.numpy() for n, t in zip(component.input_names, component.sample(3, (16, 8)))}
    a, b = torch_rt.run(inputs)["noise_pred"], onnx_rt.run(inputs)["noise_pred"]
    assert a.shape == (3, 4, 16, 8) and np.abs(a - b).max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (torch.cuda unavailable)")
def test_cuda_graph_replay_matches_eager():
    from triffusion.export.presets import build_preset

    component = UNetComponent(build_preset("tiny", seed=0).unet)
    shapes = {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    rt = TorchRuntime(component.module, component.input_names, component.output_names, device="cuda",
                      graph_shapes=[shapes])
    inputs = {n: t.numpy() for n, t in zip(component.input_names, component.sample(2, (8, 8)))}
    graphed = rt.run(inputs)["noise_pred"]
    rt.graphs.clear()
    assert np.abs(graphed - rt.run(inputs)["noise_pred"]).max() < 1e-2
