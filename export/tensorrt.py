"""TensorRT engines for the served components: optimization profiles planned from the declared serving
config (resolution buckets x batch ranges; each component's class in triffusion.components states its
own), fp16, a timing cache, optional refit, and the `tensorrt_plan` config.pbtxt per engine. The
planning and configs are plain code; only `build_engine` needs TensorRT, and it says so where TensorRT
is absent."""

from __future__ import annotations

from pathlib import Path

from triffusion import components
from triffusion.components import OutsideProfiles, Profile, ServingConfig

from .repository import _tensors


class TensorRTUnavailable(RuntimeError):
    pass


def plan_profiles(component: str, serving: ServingConfig) -> list[Profile]:
    """The optimization profiles of a component kind for the serving config (see Component.profiles)."""
    kind = components.get(component)
    return kind.from_serving(serving).profiles(serving)


def check_shapes(component: str, profiles: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile covering every input shape; a clear error naming the served range otherwise."""
    for index, profile in enumerate(profiles):
        if all(profile.covers(name, shape) for name, shape in shapes.items()):
            return index
    served = "; ".join(", ".join(f"{n} {lo}..{hi}" for n, (lo, _, hi) in p.shapes.items()) for p in profiles)
    raise OutsideProfiles(f"{component}: shapes {shapes} are outside the engine profiles ({served}); "
                          "add the resolution or batch to the serving config and rebuild the engine")


def tensorrt_config(component: str, profiles: list[Profile], instances: int = 1, name: str | None = None) -> str:
    """config.pbtxt for Triton's TensorRT backend; dims dynamic (max_batch_size 0 for every component),
    the engine's profiles bound them."""
    kind = components.get(component)
    profile_names = ", ".join(f'"{i}"' for i in range(len(profiles)))
    return (f'name: "{name or component}"\nplatform: "tensorrt_plan"\nmax_batch_size: 0\n'
            + _tensors("input", kind.inputs) + _tensors("output", kind.outputs)
            + f"instance_group [ {{ count: {instances} kind: KIND_GPU profile: [ {profile_names} ] }} ]\n")


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed: build engines on a GPU host with the tensorrt "
                                  "package (e.g. inside nvcr.io/nvidia/tensorrt:<yy.mm>-py3)") from None
    return trt


def tensorrt_version() -> str:
    """The TensorRT that builds the engines: Triton's tensorrt backend loads only plans of its own version."""
    return _tensorrt().__version__


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[Profile], *, fp16: bool = True,
                 timing_cache: Path | None = None, refit: bool = False, workspace_gb: int = 8) -> Path:
    """Build a serialized engine from an ONNX file with the planned profiles (fp16 inside; the I/O keeps the
    ONNX file's types)."""
    trt = _tensorrt()
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


__all__ = ["OutsideProfiles", "Profile", "ServingConfig", "TensorRTUnavailable", "build_engine", "check_shapes",
           "plan_profiles", "tensorrt_config", "tensorrt_version"]
