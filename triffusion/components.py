"""What each served component is, in one place: one class per kind (text encoder, UNet, VAE decoder,
quality gate) with its Triton model name, its tensors (names, dtypes, dims) and how Triton serves them
(the max-batch rule), the ONNX dynamic axes, sample inputs for export and parity checks, the TensorRT
optimization profiles and the CUDA graph buckets for the served sizes and batch limits.

Export (ONNX, TensorRT, config.pbtxt) and the runtimes import from here; this module imports only
triffusion.contract at import time (torch, diffusers and transformers only inside the methods that need
them), so importing it never pulls in export, the orchestrator or torch.

A component class states what holds for every model of its kind; an instance adds the dims that depend
on the model (channels, text hidden size, vocabulary): `UNet.from_model(unet)` for a torch model,
`UNet.from_serving(serving)` for a serving config. Every shape comes from one method,
`input_shapes(rows, latent_hw)`, so sample inputs, profiles and graph inputs cannot disagree."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar

from triffusion.contract import (CONTROLNET, QUALITY_GATE, TEXT_ENCODER, TEXT_ENCODER_MAX_BATCH, TEXT_MAX_LENGTH,
                                 UNET, UNET_CONTROL, VAE_DECODER, TensorSpec)


class OutsideProfiles(ValueError):
    """A shape no optimization profile covers."""


@dataclass(frozen=True)
class ServingConfig:
    """What the engines and graphs must serve: image sizes (square or (h, w)), UNet rows per call, images
    per decode; and the model dims the profiles need (VAE factor, text hidden size, latent channels)."""

    sizes: tuple[tuple[int, int], ...]
    max_unet_rows: int = 16
    opt_unet_rows: int = 8
    max_images: int = 4
    vae_scale: int = 8
    text_hidden: int = 768
    latent_channels: int = 4
    # ControlNets: the residuals' (channels, stride) in order, down blocks then mid (see residual_layout)
    control_layout: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> "ServingConfig":
        sizes = tuple((s, s) if isinstance(s, int) else tuple(s) for s in data["sizes"])
        layout = tuple(tuple(x) for x in data.get("control_layout", ()))
        return cls(sizes=sizes, control_layout=layout,
                   **{k: v for k, v in data.items() if k not in ("sizes", "control_layout")})

    def check_sizes(self) -> None:
        for height, width in self.sizes:
            if height % self.vae_scale or width % self.vae_scale:
                raise OutsideProfiles(f"size {height}x{width} is not a multiple of the VAE factor {self.vae_scale}")

    def latent_sizes(self) -> list[tuple[int, int]]:
        return [(height // self.vae_scale, width // self.vae_scale) for height, width in self.sizes]


@dataclass
class Profile:
    """min/opt/max shape per input name (one TensorRT optimization profile)."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def covers(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.shapes[name]
        return all(lo <= s <= hi for lo, s, hi in zip(low, shape, high))


def format_graph_shapes(shapes) -> str:
    """[(2, 64, 64), (4, 64, 64)] -> "2x64x64,4x64x64": graph buckets as a config.pbtxt parameter (a string)."""
    return ",".join("x".join(str(d) for d in shape) for shape in shapes)


def parse_graph_shapes(spec: str) -> list[tuple[int, ...]]:
    """"2x64x64,4x64x64" -> [(2, 64, 64), (4, 64, 64)]: the (rows, latent h, latent w) buckets to capture
    (just rows for the text encoder). Kept as plain text because config.pbtxt parameters are strings."""
    shapes = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        try:
            shapes.append(tuple(int(d) for d in item.split("x")))
        except ValueError:
            raise ValueError(f"graph_shapes: '{item}' is not ROWSxHxW (e.g. 2x64x64)") from None
    return shapes


@dataclass(frozen=True)
class Component:
    """One served model kind. Class attributes: what every model of the kind shares; instance fields
    (in subclasses): the dims that depend on the model."""

    name: ClassVar[str]  # the Triton model name (UNet variants are served under further names, same I/O)
    inputs: ClassVar[tuple[TensorSpec, ...]]  # batch first; -1 = dynamic
    outputs: ClassVar[tuple[TensorSpec, ...]]
    input_names: ClassVar[tuple[str, ...]]  # derived from inputs/outputs
    output_names: ClassVar[tuple[str, ...]]
    # Triton's max_batch_size for the python-backend config: > 0 makes the leading dim Triton's batch dim
    # (Triton bounds it) and every other input dim must then be fixed, so Triton itself refuses a
    # malformed shape before it reaches the model. 0: dims as declared, the component checks them.
    max_batch: ClassVar[int] = 0
    optional: ClassVar[frozenset[str]] = frozenset()  # inputs a request may leave out
    # floating inputs kept in FP32 when the model runs in fp16 (the UNet's timestep: fp16 has a spacing of
    # 0.5 between 512 and 1024, so fractional timesteps would be rounded)
    full_precision: ClassVar[frozenset[str]] = frozenset()
    dynamic_axes: ClassVar[dict[str, dict[int, str]]] = {}  # ONNX export: which dims stay symbolic
    per_size: ClassVar[bool] = True  # one TensorRT profile and graph bucket set per served resolution

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.input_names = tuple(spec.name for spec in cls.inputs)
        cls.output_names = tuple(spec.name for spec in cls.outputs)
        if cls.max_batch:
            dynamic = [spec for spec in cls.inputs if any(d < 0 for d in spec.dims[1:])]
            if dynamic:
                raise TypeError(f"{cls.name}: max_batch needs fixed input dims past the batch: {dynamic}")

    # ---- Triton -------------------------------------------------------------------------------
    @classmethod
    def served_io(cls) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """(inputs, outputs) as a python-backend config.pbtxt declares them: with max_batch the leading
        (batch) dim is Triton's and is left out of dims."""
        if not cls.max_batch:
            return cls.inputs, cls.outputs
        strip = lambda specs: tuple(TensorSpec(s.name, s.dtype, s.dims[1:]) for s in specs)
        return strip(cls.inputs), strip(cls.outputs)

    @classmethod
    def integer_inputs(cls) -> frozenset[str]:
        return frozenset(s.name for s in cls.inputs if s.dtype.startswith(("INT", "UINT")))

    # ---- shapes -------------------------------------------------------------------------------
    def input_shapes(self, rows: int, latent_hw: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
        """The input shapes for `rows` samples at a latent size (ignored by components without one)."""
        raise NotImplementedError

    def sample(self, batch: int, latent_hw: tuple[int, int] | None = None) -> tuple:
        """Seeded torch inputs of input_shapes(batch, latent_hw), in input order (export, parity checks)."""
        raise NotImplementedError

    # ---- TensorRT -----------------------------------------------------------------------------
    def profile_rows(self, serving: ServingConfig) -> tuple[int, int, int]:
        """(min, opt, max) rows of the TensorRT profiles."""
        raise NotImplementedError

    def profiles(self, serving: ServingConfig) -> list[Profile]:
        """One profile per resolution bucket where the component has spatial dims (static spatial dims give
        TensorRT its best kernels), batch ranges from the serving limits; else one batch-range profile."""
        rows = self.profile_rows(serving)
        if self.per_size:
            serving.check_sizes()
        profiles = []
        for latent_hw in serving.latent_sizes() if self.per_size else [None]:
            low, opt, high = (self.input_shapes(r, latent_hw) for r in rows)
            profiles.append(Profile({name: (low[name], opt[name], high[name]) for name in self.input_names}))
        return profiles

    # ---- CUDA graphs (torch runtime) ----------------------------------------------------------
    @classmethod
    def graph_rows(cls, serving: ServingConfig) -> list[int]:
        raise NotImplementedError

    @classmethod
    def graph_buckets(cls, serving: ServingConfig) -> list[tuple[int, ...]]:
        """The (rows, latent h, latent w) buckets (just (rows,) without spatial dims) captured at load;
        a smaller batch pads into the smallest bucket with room for it."""
        if not cls.per_size:
            return [(r,) for r in cls.graph_rows(serving)]
        return [(r, h, w) for h, w in serving.latent_sizes() for r in cls.graph_rows(serving)]

    def graph_inputs(self, bucket: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Input shapes of one graph bucket."""
        return self.input_shapes(bucket[0], tuple(bucket[1:3]) or None)

    # ---- torch (methods import torch, diffusers, transformers) --------------------------------
    @classmethod
    def from_model(cls, model) -> "Component":
        """The component with the dims of a torch model (diffusers/transformers config)."""
        raise NotImplementedError

    @classmethod
    def from_serving(cls, serving: ServingConfig) -> "Component":
        """The component with the dims a serving config states (TensorRT planning, no model at hand)."""
        raise NotImplementedError

    @classmethod
    def wrap(cls, model):
        """The model as a torch module taking input_names positionally and returning the first output:
        what ONNX export traces and the torch runtime serves."""
        return _modules()[cls.name](model)

    @classmethod
    def load_pretrained(cls, folder):
        """The model from its save_pretrained folder, set up for serving (SDPA attention)."""
        raise NotImplementedError


@functools.cache
def _modules() -> dict[str, type]:
    """The torch wrappers, defined on first use so that importing this module does not import torch.
    Their attribute names (encoder, unet, vae) name the ONNX graph's nodes and initializers."""
    import torch

    class _TextEncoder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids):
            return self.encoder(input_ids, return_dict=False)[0]

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

    class _ControlNet(torch.nn.Module):
        """diffusers' ControlNetModel at scale 1, its residuals flattened into one (rows, R) tensor and
        scaled per row (diffusers multiplies each residual by one float; a row's scale here is the same
        product, so rows of different requests and scales share a call)."""

        def __init__(self, controlnet):
            super().__init__()
            self.controlnet = controlnet

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                        conditioning_scale=1.0, return_dict=False)
            flat = torch.cat([r.flatten(1) for r in (*down, mid)], dim=1)
            return flat * conditioning_scale.reshape(-1, 1).to(flat.dtype)

    class _ControlledUNet(torch.nn.Module):
        """The UNet taking a ControlNet's flattened residuals (zeros for rows without control: adding
        zeros changes nothing), unpacked by the residual layout at the sample's latent size."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.layout = residual_layout(unet.config)

        def forward(self, sample, timestep, encoder_hidden_states, residuals):
            return self.unet(sample, timestep, encoder_hidden_states, **unpack_residuals(self.layout, residuals, sample),
                             return_dict=False)[0]

    return {TEXT_ENCODER: _TextEncoder, UNET: _UNetOutput, VAE_DECODER: _VaeDecode, CONTROLNET: _ControlNet,
            UNET_CONTROL: _ControlledUNet}


def residual_layout(config) -> tuple[tuple[int, int], ...]:
    """(channels, stride) of each ControlNet residual a UNet (or ControlNet) of this diffusers config
    adds: conv_in's output, every resnet of every down block, every downsampler but the last block's, then
    the mid block. Strides are in latent pixels; served latents are multiples of the largest one."""
    blocks = list(config["block_out_channels"])  # a diffusers FrozenDict or a plain dict
    layers = config["layers_per_block"]
    layers = [layers] * len(blocks) if isinstance(layers, int) else list(layers)
    layout = [(blocks[0], 1)]
    for i, channels in enumerate(blocks):
        layout += [(channels, 2 ** i)] * layers[i]
        if i < len(blocks) - 1:
            layout.append((channels, 2 ** (i + 1)))
    layout.append((blocks[-1], 2 ** (len(blocks) - 1)))
    return tuple(layout)


def unpack_residuals(layout, residuals, sample) -> dict:
    """A ControlNet's flattened (rows, R) residuals as diffusers' UNet takes them, at the sample's latent
    size: {down_block_additional_residuals: [...], mid_block_additional_residual: ...}."""
    height, width = sample.shape[2], sample.shape[3]
    parts, offset = [], 0
    for channels, stride in layout:
        h, w = height // stride, width // stride
        size = channels * h * w
        parts.append(residuals[:, offset:offset + size].reshape(-1, channels, h, w).to(sample.dtype))
        offset = offset + size
    return {"down_block_additional_residuals": parts[:-1], "mid_block_additional_residual": parts[-1]}


def residual_width(layout, latent_hw: tuple[int, int]) -> int:
    """R: the flattened residuals' width per row at a latent size."""
    h, w = latent_hw
    return sum(c * (h // s) * (w // s) for c, s in layout)


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class TextEncoder(Component):
    """CLIP text encoder: token ids -> per-token embeddings. Served with Triton's max_batch_size (rows
    per call, two per request with CFG) and fixed dims past the batch."""

    vocab: int = 49408
    hidden: int = 768

    name = TEXT_ENCODER
    inputs = (TensorSpec("input_ids", "INT64", (-1, TEXT_MAX_LENGTH)),)
    outputs = (TensorSpec("text_embeddings", "FP32", (-1, TEXT_MAX_LENGTH, -1)),)
    max_batch = TEXT_ENCODER_MAX_BATCH
    dynamic_axes = {"input_ids": {0: "batch"}, "text_embeddings": {0: "batch"}}
    per_size = False
    GRAPH_ROWS = (1, 2, 4, 8, 16)

    def input_shapes(self, rows, latent_hw=None):
        return {"input_ids": (rows, TEXT_MAX_LENGTH)}

    def sample(self, batch, latent_hw=None):
        import torch

        shape = self.input_shapes(batch)["input_ids"]
        return (torch.randint(0, self.vocab, shape, generator=_generator(batch)),)

    def profile_rows(self, serving):
        return 1, 2, serving.max_unet_rows

    @classmethod
    def graph_rows(cls, serving):
        return [r for r in cls.GRAPH_ROWS if r <= max(serving.max_unet_rows, 2)]

    @classmethod
    def from_model(cls, model):
        return cls(vocab=model.config.vocab_size, hidden=model.config.hidden_size)

    @classmethod
    def from_serving(cls, serving):
        return cls(hidden=serving.text_hidden)

    @classmethod
    def load_pretrained(cls, folder):
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(str(folder), attn_implementation="sdpa")


@dataclass(frozen=True)
class UNet(Component):
    """Noise prediction. One timestep per sample, so that requests at different steps share one call
    (step-level batching)."""

    channels: int = 4
    hidden: int = 768

    name = UNET
    inputs = (
        TensorSpec("sample", "FP32", (-1, -1, -1, -1)),
        TensorSpec("timestep", "FP32", (-1,)),
        TensorSpec("encoder_hidden_states", "FP32", (-1, TEXT_MAX_LENGTH, -1)),
    )
    outputs = (TensorSpec("noise_pred", "FP32", (-1, -1, -1, -1)),)
    full_precision = frozenset({"timestep"})  # diffusers embeds it in FP32 and casts the embedding itself
    dynamic_axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                    "encoder_hidden_states": {0: "batch"}, "noise_pred": {0: "batch", 2: "height", 3: "width"}}

    def input_shapes(self, rows, latent_hw=None):
        h, w = latent_hw
        return {"sample": (rows, self.channels, h, w), "timestep": (rows,),
                "encoder_hidden_states": (rows, TEXT_MAX_LENGTH, self.hidden)}

    def sample(self, batch, latent_hw=None):
        import torch

        shapes, generator = self.input_shapes(batch, latent_hw), _generator(batch)
        return (torch.randn(*shapes["sample"], generator=generator),
                torch.linspace(999, 1, batch),
                torch.randn(*shapes["encoder_hidden_states"], generator=generator))

    def profile_rows(self, serving):
        return 1, min(serving.opt_unet_rows, serving.max_unet_rows), serving.max_unet_rows

    @classmethod
    def graph_rows(cls, serving):
        # one row, and every even count: classifier-free guidance makes two rows a request
        return [1] + list(range(2, serving.max_unet_rows + 1, 2))

    @classmethod
    def from_model(cls, model):
        return cls(channels=model.config.in_channels, hidden=model.config.cross_attention_dim)

    @classmethod
    def from_serving(cls, serving):
        return cls(channels=serving.latent_channels, hidden=serving.text_hidden)

    @classmethod
    def load_pretrained(cls, folder):
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet = UNet2DConditionModel.from_pretrained(str(folder))
        unet.set_attn_processor(AttnProcessor2_0())
        return unet


@dataclass(frozen=True)
class VaeDecoder(Component):
    """VAE decoder: latent (already divided by the VAE scaling factor) -> image in [-1, 1]."""

    channels: int = 4

    name = VAE_DECODER
    inputs = (TensorSpec("latent", "FP32", (-1, -1, -1, -1)),)
    outputs = (TensorSpec("image", "FP32", (-1, 3, -1, -1)),)
    dynamic_axes = {"latent": {0: "batch", 2: "height", 3: "width"}, "image": {0: "batch", 2: "height", 3: "width"}}
    GRAPH_ROWS = (1, 2, 4)  # smaller batches pad into these

    def input_shapes(self, rows, latent_hw=None):
        return {"latent": (rows, self.channels, *latent_hw)}

    def sample(self, batch, latent_hw=None):
        import torch

        return (torch.randn(*self.input_shapes(batch, latent_hw)["latent"], generator=_generator(batch)),)

    def profile_rows(self, serving):
        return 1, 1, serving.max_images

    @classmethod
    def graph_rows(cls, serving):
        return [r for r in cls.GRAPH_ROWS if r <= serving.max_images]

    @classmethod
    def from_model(cls, model):
        return cls(channels=model.config.latent_channels)

    @classmethod
    def from_serving(cls, serving):
        return cls(channels=serving.latent_channels)

    @classmethod
    def load_pretrained(cls, folder):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(str(folder))


@dataclass(frozen=True)
class ControlledUNet(UNet):
    """The UNet with a ControlNet's residuals as one more input, `residuals` (rows, R): served as model
    `unet_control` beside `unet` (same weights) when the pipeline has ControlNets. A UNet batch in which any
    request has control runs here, with zero residuals for the rows without; a batch without runs on `unet`."""

    layout: tuple[tuple[int, int], ...] = ()

    name = UNET_CONTROL
    inputs = UNet.inputs + (TensorSpec("residuals", "FP32", (-1, -1)),)
    dynamic_axes = {**UNet.dynamic_axes, "residuals": {0: "batch", 1: "residual_width"}}

    def input_shapes(self, rows, latent_hw=None):
        return {**super().input_shapes(rows, latent_hw), "residuals": (rows, residual_width(self.layout, latent_hw))}

    def sample(self, batch, latent_hw=None):
        import torch

        width = self.input_shapes(batch, latent_hw)["residuals"][1]
        return super().sample(batch, latent_hw) + (0.1 * torch.randn(batch, width, generator=_generator(batch + 7)),)

    @classmethod
    def from_model(cls, model):
        return cls(channels=model.config.in_channels, hidden=model.config.cross_attention_dim,
                   layout=residual_layout(model.config))

    @classmethod
    def from_serving(cls, serving):
        return cls(channels=serving.latent_channels, hidden=serving.text_hidden, layout=serving.control_layout)

    @classmethod
    def load_pretrained(cls, folder):
        return UNet.load_pretrained(folder)


@dataclass(frozen=True)
class ControlNet(Component):
    """A ControlNet (diffusers ControlNetModel): the UNet's inputs plus the control image (rows, 3, H, W) in
    [0, 1] and a conditioning scale per row -> the residuals for ControlledUNet, flattened and scaled.
    Served as model `controlnet_<name>` per registered ControlNet; CFG rows included, as diffusers runs it."""

    channels: int = 4
    hidden: int = 768
    vae_scale: int = 8  # the conditioning embedding's downsampling: control image pixels per latent pixel
    layout: tuple[tuple[int, int], ...] = ()

    name = CONTROLNET
    inputs = (
        TensorSpec("sample", "FP32", (-1, -1, -1, -1)),
        TensorSpec("timestep", "FP32", (-1,)),
        TensorSpec("encoder_hidden_states", "FP32", (-1, TEXT_MAX_LENGTH, -1)),
        TensorSpec("controlnet_cond", "FP32", (-1, 3, -1, -1)),
        TensorSpec("conditioning_scale", "FP32", (-1,)),
    )
    outputs = (TensorSpec("residuals", "FP32", (-1, -1)),)
    full_precision = frozenset({"timestep", "conditioning_scale"})
    dynamic_axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                    "encoder_hidden_states": {0: "batch"},
                    "controlnet_cond": {0: "batch", 2: "image_height", 3: "image_width"},
                    "conditioning_scale": {0: "batch"}, "residuals": {0: "batch", 1: "residual_width"}}

    def input_shapes(self, rows, latent_hw=None):
        h, w = latent_hw
        return {"sample": (rows, self.channels, h, w), "timestep": (rows,),
                "encoder_hidden_states": (rows, TEXT_MAX_LENGTH, self.hidden),
                "controlnet_cond": (rows, 3, h * self.vae_scale, w * self.vae_scale), "conditioning_scale": (rows,)}

    def sample(self, batch, latent_hw=None):
        import torch

        shapes, generator = self.input_shapes(batch, latent_hw), _generator(batch)
        return (torch.randn(*shapes["sample"], generator=generator),
                torch.linspace(999, 1, batch),
                torch.randn(*shapes["encoder_hidden_states"], generator=generator),
                torch.rand(*shapes["controlnet_cond"], generator=generator),
                torch.linspace(0.5, 1.5, batch))

    def profile_rows(self, serving):
        return 1, min(serving.opt_unet_rows, serving.max_unet_rows), serving.max_unet_rows

    @classmethod
    def graph_rows(cls, serving):
        return UNet.graph_rows(serving)

    @classmethod
    def from_model(cls, model):
        config = model.config
        return cls(channels=config.in_channels, hidden=config.cross_attention_dim,
                   vae_scale=2 ** (len(config.conditioning_embedding_out_channels) - 1),
                   layout=residual_layout(config))

    @classmethod
    def from_serving(cls, serving):
        return cls(channels=serving.latent_channels, hidden=serving.text_hidden, vae_scale=serving.vae_scale,
                   layout=serving.control_layout)

    @classmethod
    def load_pretrained(cls, folder):
        from diffusers import ControlNetModel
        from diffusers.models.attention_processor import AttnProcessor2_0

        controlnet = ControlNetModel.from_pretrained(str(folder))
        controlnet.set_attn_processor(AttnProcessor2_0())
        return controlnet


@dataclass(frozen=True)
class QualityGate(Component):
    """Cascades: scores a batch of same-size generated images (and, optional, the prompt of each: the CLIP
    gate scores an image against it), one score in [0, 1] per image. Served by its own python model
    (orchestrator/gate.py), not exported: no dynamic axes, profiles or graphs."""

    name = QUALITY_GATE
    inputs = (TensorSpec("image", "UINT8", (-1, -1, -1, 3)), TensorSpec("prompt", "BYTES", (-1,)))
    outputs = (TensorSpec("score", "FP32", (-1,)),)
    optional = frozenset({"prompt"})


# The exported components: one artifact each (UNet variants add more under their own names).
COMPONENTS: dict[str, type[Component]] = {c.name: c for c in (TextEncoder, UNet, VaeDecoder)}
# Exported only when the pipeline has ControlNets (a registry family's `controlnets`).
CONTROL_COMPONENTS: dict[str, type[Component]] = {c.name: c for c in (ControlledUNet, ControlNet)}


def get(kind: str) -> type[Component]:
    """The component class of a kind (a name in COMPONENTS)."""
    try:
        return COMPONENTS[kind] if kind in COMPONENTS else CONTROL_COMPONENTS[kind]
    except KeyError:
        raise ValueError(f"unknown component '{kind}'") from None


def served(unets=(), controlnets=()) -> dict[str, type[Component]]:
    """Triton model name -> component class: the exported components under their own names, and every
    served UNet (the default `unet` and variants such as unet_tiny_lite) as a UNet; with ControlNets (model
    names such as controlnet_canny), those and the controlled UNet `unet_control`."""
    models = dict(COMPONENTS)
    models.update({name: UNet for name in unets})
    if controlnets:
        models[UNET_CONTROL] = ControlledUNet
        models.update({name: ControlNet for name in controlnets})
    return models


__all__ = ["COMPONENTS", "CONTROL_COMPONENTS", "Component", "ControlNet", "ControlledUNet", "OutsideProfiles", "Profile", "QualityGate", "ServingConfig", "TextEncoder",
           "UNet", "VaeDecoder", "format_graph_shapes", "get", "parse_graph_shapes", "residual_layout",
           "residual_width", "served"]
