"""ONNX export of the served components, each checked against torch. What a component exports (names,
dynamic axes, sample inputs, the torch wrapper) is stated by its class in triffusion.components; a
Component here binds that to one torch model.

The legacy TorchScript exporter at opset 17 is used on purpose: the dynamo exporter needs opset >= 18,
and at 17 it gives graphs onnxruntime rejects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from triffusion import components
from triffusion.runtime import OnnxRuntime

OPSET = 17
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB cap, with room for the graph itself


class ExportParityError(RuntimeError):
    pass


class Component:
    """A served component bound to its torch model: `spec` (dims from the model) and `module` (the
    model wrapped to take the component's inputs positionally)."""

    kind: type[components.Component]  # set by the subclasses below, or passed

    def __init__(self, model, kind: type[components.Component] | None = None):
        kind = kind or self.kind
        self.spec = kind.from_model(model)
        self.module = kind.wrap(model)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dynamic_axes(self) -> dict:
        return {name: dict(axes) for name, axes in self.spec.dynamic_axes.items()}  # a copy for the exporter

    @property
    def input_names(self) -> list[str]:
        return list(self.spec.input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self.spec.output_names)

    def sample(self, batch: int, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        return self.spec.sample(batch, latent_hw)


class TextEncoderComponent(Component):
    kind = components.TextEncoder


class UNetComponent(Component):
    kind = components.UNet


class VaeDecoderComponent(Component):
    kind = components.VaeDecoder


def export_component(component: Component, path: Path, latent_hw: tuple[int, int], fp16: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = component.module.half() if fp16 else component.module.float()
    args = component.sample(2, latent_hw)
    if fp16:  # full-precision inputs (the UNet's timestep) stay FP32 inputs of the fp16 graph
        keep = component.spec.full_precision
        args = tuple(a.half() if a.is_floating_point() and name not in keep else a
                     for name, a in zip(component.input_names, args))
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
