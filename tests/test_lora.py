"""Batched LoRA (triffusion.lora): per-row deltas over static slots equal, row by row, the UNet with that
row's adapters merged into its weights; kohya and diffusers files of the same adapter load the same."""

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from triffusion import lora

CONFIG = Path(__file__).resolve().parents[1] / "export" / "configs" / "tiny" / "unet.json"


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(json.loads(CONFIG.read_text())).eval()


def adapter(unet, seed, fmt="diffusers", rank=4, tmp=None):
    sd = lora.random_state_dict(unet, rank=rank, seed=seed, fmt=fmt, std=0.2, alpha=2.0)
    return lora.normalize(f"a{seed}", sd, unet)


def inputs(rows):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.linspace(900, 100, rows),
            torch.randn(rows, 77, 32, generator=g))


def test_rows_with_different_adapters_equal_their_merged_unets(unet):
    adapters = [adapter(unet, s, rank=r) for s, r in ((1, 4), (2, 2), (3, 8))]
    served = copy.deepcopy(unet)
    runtime, bank = lora.lora_runtime_from_module(served, slots=4, max_rank=8, per_request=2)
    for slot, a in enumerate(adapters, start=1):
        bank.install(slot, a)
    # rows: adapter 1 at 0.8; none; adapter 2 at 1.0 with adapter 3 at -0.5; adapter 3 at 1.5
    slots = torch.tensor([[1, 0], [0, 0], [2, 3], [3, 0]])
    scales = torch.tensor([[0.8, 0.0], [0.0, 0.0], [1.0, -0.5], [1.5, 0.0]])
    sample, t, ehs = inputs(4)
    out = runtime.run({"sample": sample, "timestep": t, "encoder_hidden_states": ehs,
                       "adapter_slots": slots, "adapter_scales": scales})["noise_pred"]
    plain = unet(sample, t, ehs).sample
    for row, mix in enumerate([[(0, 0.8)], [], [(1, 1.0), (2, -0.5)], [(2, 1.5)]]):
        merged = copy.deepcopy(unet)
        for index, scale in mix:
            lora.merge(merged, adapters[index], scale)
        with torch.no_grad():
            expected = merged(sample[row:row + 1], t[row:row + 1], ehs[row:row + 1]).sample[0]
        assert torch.allclose(out[row], expected, atol=2e-5), row
        if mix:  # the adapter changes the output by far more than the tolerance
            assert (out[row] - plain[row]).abs().max() > 1e-2


def test_kohya_and_diffusers_files_of_one_adapter_load_the_same(unet, tmp_path):
    for fmt in ("kohya", "diffusers"):
        save_file(lora.random_state_dict(unet, rank=4, seed=5, fmt=fmt, alpha=2.0), tmp_path / f"{fmt}.safetensors")
    kohya = lora.load_adapter("k", tmp_path / "kohya.safetensors", unet)
    diffusers = lora.load_adapter("d", tmp_path / "diffusers.safetensors", unet)
    assert kohya.source_format == "kohya" and diffusers.source_format == "diffusers"
    assert set(kohya.layers) == set(diffusers.layers) == set(lora.lora_targets(unet))
    for module in kohya.layers:
        for x, y in zip(kohya.layers[module], diffusers.layers[module]):
            assert torch.equal(x, y)
    # the loader thread has the slots' dims and the UNet's config, not the UNet (perf.addons, lora.serve)
    dims = lora.target_dims(unet)
    by_dims = lora.load_adapter("k", tmp_path / "kohya.safetensors", dims=dims, unet_config=unet.config)
    assert all(torch.equal(x, y) for m in kohya.layers for x, y in zip(kohya.layers[m], by_dims.layers[m]))
    with pytest.raises(ValueError, match="a kohya adapter needs the UNet or its config"):
        lora.load_adapter("k", tmp_path / "kohya.safetensors", dims=dims)


def test_bad_files_are_refused_by_name(unet, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(lora.AdapterError, match="only .safetensors"):
        lora.load_adapter("x", tmp_path / "a.bin", unet)
    sd = lora.random_state_dict(unet, rank=2, seed=1)
    sd["unet.conv_in.lora_A.weight"] = torch.zeros(2, 4, 3, 3)
    sd["unet.conv_in.lora_B.weight"] = torch.zeros(32, 2, 1, 1)
    save_file(sd, tmp_path / "locon.safetensors")
    with pytest.raises(lora.AdapterError, match="layer 'conv_in' is not served"):
        lora.load_adapter("x", tmp_path / "locon.safetensors", unet)
    sd = lora.random_state_dict(unet, rank=2, seed=1)
    key = next(k for k in sd if k.endswith("lora_A.weight"))
    sd[key] = torch.zeros(2, 3)
    save_file(sd, tmp_path / "shape.safetensors")
    with pytest.raises(lora.AdapterError, match="do not fit"):
        lora.load_adapter("x", tmp_path / "shape.safetensors", unet)


def test_locon_convolutions_per_row_equal_their_merged_unets(unet, tmp_path):
    """With convs (LoCon), the resnets' 3x3 and strided convolutions and time projections carry adapters too:
    kohya files convert through diffusers, and each row still equals its merged UNet."""
    save_file(lora.random_state_dict(unet, rank=4, seed=7, fmt="kohya", std=0.1, alpha=4.0, convs=True),
              tmp_path / "locon.safetensors")
    locon = lora.load_adapter("locon", tmp_path / "locon.safetensors", unet, convs=True)
    targets = lora.lora_targets(unet, convs=True)
    assert set(locon.layers) == set(targets)
    assert any(m.kernel_size == (3, 3) and m.stride == (2, 2) for m in targets.values()
               if isinstance(m, torch.nn.Conv2d))  # a downsampler is among them
    plain_adapter = adapter(unet, 1)
    served = copy.deepcopy(unet)
    runtime, bank = lora.lora_runtime_from_module(served, slots=2, max_rank=4, per_request=1, convs=True)
    bank.install(1, locon)
    bank.install(2, plain_adapter)
    sample, t, ehs = inputs(3)
    out = runtime.run({"sample": sample, "timestep": t, "encoder_hidden_states": ehs,
                       "adapter_slots": torch.tensor([[1], [0], [2]]),
                       "adapter_scales": torch.tensor([[0.7], [0.0], [1.0]])})["noise_pred"]
    for row, mix in enumerate([(locon, 0.7), None, (plain_adapter, 1.0)]):
        merged = copy.deepcopy(unet)
        if mix:
            lora.merge(merged, *mix)
        with torch.no_grad():
            expected = merged(sample[row:row + 1], t[row:row + 1], ehs[row:row + 1]).sample[0]
        assert torch.allclose(out[row], expected, atol=5e-5), row
    with pytest.raises(lora.AdapterError, match="is not served"):  # without convs the same file is refused
        lora.load_adapter("locon", tmp_path / "locon.safetensors", unet)
