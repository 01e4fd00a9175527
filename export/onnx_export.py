"""ONNX export of the three served components. One class per component states its export contract
(names from triffusion.contract, dynamic axes, sample inputs); every export is checked against torch.

The legacy TorchScript exporter at opset 17 is used on purpose: the dynamo exporter needs opset >= 18,
and at 17 it gives graphs onnxruntime rejects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from triffusion import contract

OPSET = 17
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB cap, with room for the graph itself


class ExportParityError(RuntimeError):
    pass


class _UNetOutput(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class _TextEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids, return_dict=False)[0]


@dataclass
class Component:
    """Export contract of one served model."""

    name: str
    module: torch.nn.Module
    dynamic_axes: dict

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in contract.COMPONENT_IO[self.name][0]]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in contract.COMPONENT_IO[self.name][1]]

    def sample(self, batch: int, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class TextEncoderComponent(Component):
    def __init__(self, encoder):
        super().__init__(contract.TEXT_ENCODER, _TextEncoder(encoder),
                         {"input_ids": {0: "batch"}, "text_embeddings": {0: "batch"}})
        self.vocab = encoder.config.vocab_size

    def sample(self, batch, latent_hw):
        generator = torch.Generator().manual_seed(batch)
        return (torch.randint(0, self.vocab, (batch, contract.TEXT_MAX_LENGTH), generator=generator),)


class UNetComponent(Component):
    def __init__(self, unet):
        super().__init__(contract.UNET, _UNetOutput(unet),
                         {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                          "encoder_hidden_states": {0: "batch"}, "noise_pred": {0: "batch", 2: "height", 3: "width"}})
        self.channels = unet.config.in_channels
        self.hidden = unet.config.cross_attention_dim

    def sample(self, batch, latent_hw):
        generator = torch.Generator().manual_seed(batch)
        return (torch.randn(batch, self.channels, *latent_hw, generator=generator),
                torch.linspace(999, 1, batch),
                torch.randn(batch, contract.TEXT_MAX_LENGTH, self.hidden, generator=generator))


class VaeDecoderComponent(Component):
    def __init__(self, vae):
        super().__init__(contract.VAE_DECODER, _VaeDecode(vae),
                         {"latent": {0: "batch", 2: "height", 3: "width"}, "image": {0: "batch", 2: "height", 3: "width"}})
        self.channels = vae.config.latent_channels

    def sample(self, batch, latent_hw):
        return (torch.randn(batch, self.channels, *latent_hw, generator=torch.Generator().manual_seed(batch)),)


def export_component(component: Component, path: Path, latent_hw: tuple[int, int], fp16: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = component.module.half() if fp16 else component.module.float()
    args = component.sample(2, latent_hw)
    if fp16:
        args = tuple(a.half() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=component.input_names,
                          output_names=component.output_names, dynamic_axes=component.dynamic_axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    if fp16:
        component.module.float()
    if path.stat().st_size > EXTERNAL_DATA_BYTES:
        import onnx

        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    return path


def check_parity(component: Component, path: Path, shapes: list[tuple[int, tuple[int, int]]],
                 rtol: float = 1e-3) -> float:
    """Run onnxruntime and torch on each (batch, latent size); raise past tolerance. Returns max error."""
    from triffusion.runtime import OnnxRuntime

    runtime = OnnxRuntime(path)
    worst = 0.0
    for batch, latent_hw in shapes:
        args = component.sample(batch, latent_hw)
        with torch.no_grad():
            expected = component.module.float()(*args).numpy()
        got = runtime.run({name: a.numpy() for name, a in zip(component.input_names, args)})[component.output_names[0]]
        if got.shape != expected.shape:
            raise ExportParityError(f"{component.name}: ONNX output shape {got.shape} != torch {expected.shape} "
                                    f"for batch {batch}, latent {latent_hw}")
        error = float(np.abs(got - expected).max())
        tolerance = rtol * max(1.0, float(np.abs(expected).max()))
        if error > tolerance:
            raise ExportParityError(f"{component.name}: max |onnx - torch| = {error:.3g} > {tolerance:.3g} "
                                    f"for batch {batch}, latent {latent_hw}")
        worst = max(worst, error)
    return worst


def file_sha256(path: Path) -> str:
    """Digest of a file, or of a folder's files (names and contents, in name order)."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


__all__ = ["Component", "ExportParityError", "TextEncoderComponent", "UNetComponent", "VaeDecoderComponent",
           "check_parity", "export_component", "file_sha256"]
