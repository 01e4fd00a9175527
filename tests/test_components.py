"""triffusion.components: each component's dims, dynamic axes, sample inputs, served config, TensorRT
profiles and CUDA graph buckets agree with each other; the module stays light and free of import loops."""

import subprocess
import sys

import pytest

from triffusion import components, contract
from triffusion.components import QualityGate, ServingConfig, TextEncoder, UNet, VaeDecoder

TINY = {TextEncoder: TextEncoder(vocab=1000, hidden=32), UNet: UNet(channels=4, hidden=32), VaeDecoder: VaeDecoder(4)}
SERVING = ServingConfig(sizes=((64, 64), (128, 128), (64, 128)), max_unet_rows=8, opt_unet_rows=4, text_hidden=32)


@pytest.mark.parametrize("kind", list(TINY), ids=lambda k: k.name)
def test_input_shapes_fit_the_declared_dims_and_dynamic_axes(kind):
    spec = TINY[kind]
    a, b = spec.input_shapes(1, (8, 8)), spec.input_shapes(3, (16, 24))
    assert tuple(a) == tuple(b) == kind.input_names
    for tensor in kind.inputs:
        assert len(a[tensor.name]) == len(tensor.dims)
        for axis, (dim, x, y) in enumerate(zip(tensor.dims, a[tensor.name], b[tensor.name])):
            if dim != -1:  # a fixed dim never varies
                assert x == y == dim, (tensor.name, axis)
            if x != y:  # what varies between calls stays symbolic in the ONNX graph
                assert axis in kind.dynamic_axes[tensor.name], (tensor.name, axis)
    for name, axes in kind.dynamic_axes.items():  # every dynamic axis is dynamic in the spec too
        tensor = next(t for t in kind.inputs + kind.outputs if t.name == name)
        assert all(tensor.dims[axis] == -1 for axis in axes), name
        assert axes[0] == "batch"


@pytest.mark.parametrize("kind", list(TINY), ids=lambda k: k.name)
def test_sample_inputs_have_the_input_shapes_and_dtypes(kind):
    import torch

    spec = TINY[kind]
    sample = spec.sample(3, (16, 24))
    shapes = spec.input_shapes(3, (16, 24))
    dtypes = {"INT64": torch.int64, "FP32": torch.float32}
    assert [tuple(t.shape) for t in sample] == list(shapes.values())
    assert [t.dtype for t in sample] == [dtypes[s.dtype] for s in kind.inputs]
    again = spec.sample(3, (16, 24))  # seeded: parity checks compare the same inputs
    assert all(torch.equal(x, y) for x, y in zip(sample, again))


def test_components_wrap_the_real_models_and_produce_the_declared_outputs():
    import torch

    from triffusion.export.presets import build_preset

    pipeline = build_preset("tiny", seed=0)
    for kind, model in ((TextEncoder, pipeline.text_encoder), (UNet, pipeline.unet), (VaeDecoder, pipeline.vae)):
        spec = kind.from_model(model)
        with torch.no_grad():
            output = kind.wrap(model)(*spec.sample(2, (8, 8)))
        (declared,) = kind.outputs
        assert len(output.shape) == len(declared.dims) and output.shape[0] == 2
        assert all(d in (-1, s) for d, s in zip(declared.dims, output.shape)), (kind.name, tuple(output.shape))
    assert UNet.from_model(pipeline.unet) == UNet(channels=4, hidden=32)
    assert type(UNet.wrap(pipeline.unet)).__name__ == "_UNetOutput"  # names the ONNX nodes: keep it


def test_text_encoder_is_served_with_max_batch_size_and_fixed_dims():
    from triffusion.export.repository import component_config

    assert TextEncoder.max_batch == contract.TEXT_ENCODER_MAX_BATCH > 0
    inputs, outputs = TextEncoder.served_io()
    assert inputs[0].dims == (contract.TEXT_MAX_LENGTH,) and outputs[0].dims == (contract.TEXT_MAX_LENGTH, -1)
    assert all(d > 0 for spec in inputs for d in spec.dims)  # Triton refuses a malformed shape itself
    config = component_config(contract.TEXT_ENCODER, TextEncoder, {"runtime": "onnxruntime"})
    assert f"max_batch_size: {contract.TEXT_ENCODER_MAX_BATCH}\n" in config
    assert f'{{ name: "input_ids" data_type: TYPE_INT64 dims: [ {contract.TEXT_MAX_LENGTH} ] }}' in config
    unet = component_config(contract.UNET, UNet, {})  # the others: max_batch_size 0, batch in dims
    assert "max_batch_size: 0\n" in unet and 'name: "sample" data_type: TYPE_FP32 dims: [ -1, -1, -1, -1 ]' in unet
    gate = component_config(contract.QUALITY_GATE, QualityGate, {})
    assert 'name: "prompt" data_type: TYPE_STRING dims: [ -1 ] optional: true' in gate


@pytest.mark.parametrize("serving", [SERVING, ServingConfig(sizes=((512, 512), (768, 768)))], ids=["tiny", "sd"])
@pytest.mark.parametrize("kind", list(TINY), ids=lambda k: k.name)
def test_profiles_cover_every_graph_bucket(kind, serving):
    spec = kind.from_serving(serving)
    profiles = spec.profiles(serving)
    assert len(profiles) == (len(serving.sizes) if kind.per_size else 1)
    buckets = kind.graph_buckets(serving)
    assert buckets and max(b[0] for b in buckets) <= spec.profile_rows(serving)[2]
    for bucket in buckets:
        shapes = spec.graph_inputs(bucket)
        assert any(all(p.covers(name, shape) for name, shape in shapes.items()) for p in profiles), bucket


def test_graph_buckets_per_component():
    assert UNet.graph_buckets(SERVING)[:5] == [(1, 8, 8), (2, 8, 8), (4, 8, 8), (6, 8, 8), (8, 8, 8)]
    assert len(UNet.graph_buckets(SERVING)) == 5 * len(SERVING.sizes)
    assert TextEncoder.graph_buckets(SERVING) == [(1,), (2,), (4,), (8,)]
    assert VaeDecoder.graph_buckets(SERVING)[-3:] == [(1, 8, 16), (2, 8, 16), (4, 8, 16)]
    assert components.format_graph_shapes(TextEncoder.graph_buckets(SERVING)) == "1,2,4,8"


def test_served_names_and_unknown_kinds():
    served = components.served(["unet", "unet_tiny_lite"])
    assert list(served) == [contract.TEXT_ENCODER, contract.UNET, contract.VAE_DECODER, "unet_tiny_lite"]
    assert served["unet_tiny_lite"] is UNet
    assert QualityGate.name == contract.QUALITY_GATE and QualityGate.optional == {"prompt"}
    with pytest.raises(ValueError, match="unknown component 'quality_gate'"):
        components.get(contract.QUALITY_GATE)  # served, but not exported


def _fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_components_stays_light():
    loaded = _fresh("import sys, triffusion.components\n"
                    "heavy = ('triffusion', 'torch', 'numpy')\n"
                    "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))")
    assert loaded.split() == ["triffusion", "triffusion.components", "triffusion.contract"]


def test_runtime_never_imports_export_and_both_orders_import():
    loaded = _fresh("import sys, triffusion.runtime\n"
                    "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('triffusion', 'torch')))").split()
    assert "triffusion.components" in loaded and "triffusion.export" not in loaded and "torch" not in loaded
    _fresh("import triffusion.runtime, triffusion.export.build")
    _fresh("import triffusion.export.build, triffusion.runtime")
