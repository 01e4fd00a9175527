"""TensorRT engines for the served components: optimization profiles planned from the declared serving
config (resolution buckets x batch ranges), fp16, a timing cache, optional refit, and the
`tensorrt_plan` config.pbtxt per engine. The planning and configs are plain code; only
`build_engine` needs TensorRT, and it says so where TensorRT is absent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from triffusion import contract

from .repository import TRITON_TYPES


class TensorRTUnavailable(RuntimeError):
    pass


class OutsideProfiles(ValueError):
    """A shape no optimization profile covers."""


@dataclass(frozen=True)
class ServingConfig:
    """What the engines must serve: image sizes (square or (h, w)), UNet rows per call, images per decode."""

    sizes: tuple[tuple[int, int], ...]
    max_unet_rows: int = 16
    opt_unet_rows: int = 8
    max_images: int = 4
    vae_scale: int = 8
    text_hidden: int = 768
    latent_channels: int = 4

    @classmethod
    def from_dict(cls, data: dict) -> "ServingConfig":
        sizes = tuple((s, s) if isinstance(s, int) else tuple(s) for s in data["sizes"])
        return cls(sizes=sizes, **{k: v for k, v in data.items() if k != "sizes"})


@dataclass
class Profile:
    """min/opt/max shape per input name."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def covers(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.shapes[name]
        return all(lo <= s <= hi for lo, s, hi in zip(low, shape, high))


def plan_profiles(component: str, serving: ServingConfig) -> list[Profile]:
    """One profile per resolution bucket for the UNet and VAE (static spatial dims give TensorRT its best
    kernels), batch ranges from the serving limits; one batch-range profile for the text encoder."""
    t, hidden, c = contract.TEXT_MAX_LENGTH, serving.text_hidden, serving.latent_channels
    rows, opt = serving.max_unet_rows, min(serving.opt_unet_rows, serving.max_unet_rows)
    if component == contract.TEXT_ENCODER:
        return [Profile({"input_ids": ((1, t), (2, t), (rows, t))})]
    profiles = []
    for height, width in serving.sizes:
        if height % serving.vae_scale or width % serving.vae_scale:
            raise OutsideProfiles(f"size {height}x{width} is not a multiple of the VAE factor {serving.vae_scale}")
        h, w = height // serving.vae_scale, width // serving.vae_scale
        if component == contract.UNET:
            profiles.append(Profile({
                "sample": ((1, c, h, w), (opt, c, h, w), (rows, c, h, w)),
                "timestep": ((1,), (opt,), (rows,)),
                "encoder_hidden_states": ((1, t, hidden), (opt, t, hidden), (rows, t, hidden)),
            }))
        elif component == contract.VAE_DECODER:
            images = serving.max_images
            profiles.append(Profile({"latent": ((1, c, h, w), (1, c, h, w), (images, c, h, w))}))
        else:
            raise ValueError(f"unknown component '{component}'")
    return profiles


def check_shapes(component: str, profiles: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile covering every input shape; a clear error naming the served range otherwise."""
    for index, profile in enumerate(profiles):
        if all(profile.covers(name, shape) for name, shape in shapes.items()):
            return index
    served = "; ".join(", ".join(f"{n} {lo}..{hi}" for n, (lo, _, hi) in p.shapes.items()) for p in profiles)
    raise OutsideProfiles(f"{component}: shapes {shapes} are outside the engine profiles ({served}); "
                          "add the resolution or batch to the serving config and rebuild the engine")


def tensorrt_config(component: str, profiles: list[Profile], instances: int = 1, name: str | None = None) -> str:
    """config.pbtxt for Triton's TensorRT backend; dims dynamic, the engine's profiles bound them."""
    inputs, outputs = contract.COMPONENT_IO[component]

    def block(kind, specs):
        rows = [f'  {{ name: "{s.name}" data_type: {TRITON_TYPES[s.dtype]} dims: [ {", ".join(str(d) for d in s.dims)} ] }}'
                for s in specs]
        return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"

    profile_names = ", ".join(f'"{i}"' for i in range(len(profiles)))
    return (f'name: "{name or component}"\nplatform: "tensorrt_plan"\nmax_batch_size: 0\n'
            + block("input", inputs) + block("output", outputs)
            + f"instance_group [ {{ count: {instances} kind: KIND_GPU profile: [ {profile_names} ] }} ]\n")


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[Profile], *, fp16: bool = True,
                 timing_cache: Path | None = None, refit: bool = False, workspace_gb: int = 8) -> Path:
    """Build a serialized engine from an ONNX file with the planned profiles."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed: build engines on a GPU host with the tensorrt "
                                  "package (e.g. inside nvcr.io/nvidia/tensorrt:<yy.mm>-py3)") from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if refit:  # LoRA weights can be swapped in later without a rebuild
        config.set_flag(trt.BuilderFlag.REFIT)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimization.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if timing_cache:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path
