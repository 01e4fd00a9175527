"""One small interface for running an exported component: ONNX Runtime, torch with CUDA graphs per
served bucket, or a TensorRT engine (the export times the engines it built with it). A runtime maps
named numpy arrays to named numpy arrays. What each component takes, and its graph buckets, come from
triffusion.components (this module never imports export)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Protocol

import numpy as np

from triffusion import components
from triffusion.components import format_graph_shapes, parse_graph_shapes  # noqa: F401 (re-exported)


class Runtime(Protocol):
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def cpu_threads() -> int:
    """The cores this process may run on (its CPU mask: `taskset`, a cgroup cpuset), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class OnnxRuntime:
    """onnxruntime session; CUDA provider first where onnxruntime-gpu is installed and asked for.

    The intra-op thread count is always set: left at 0, onnxruntime (1.31.1, measured on a 2-core host)
    sizes its pool by the machine's cores and pins each worker to a core of its own choosing, outside the
    process's CPU mask: a process under `taskset -c 0` then ran its worker on core 1, and two processes
    pinned to cores 0 and 1 ran at 75 and 36 steps/s where each ran at 121 with the count set to its mask.
    `spinning` off stops idle workers from busy-waiting, which costs the other sessions on a shared CPU:
    two unpinned processes of two threads each ran at 57 steps/s spinning, 87 not, and 114 with one thread
    each."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0, spinning: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads if threads > 0 else cpu_threads()
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("device 'cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name in self.input_names:
            array = np.asarray(inputs[name])
            # fp16 graphs take fp16; callers always speak fp32.
            if self._input_types[name] == "tensor(float16)" and array.dtype == np.float32:
                array = array.astype(np.float16)
            feed[name] = array
        outputs = self.session.run(list(self.output_names), feed)
        return {name: np.asarray(out, dtype=np.float32) if out.dtype == np.float16 else out
                for name, out in zip(self.output_names, outputs)}


def create_runtime(kind: str, artifact: str | os.PathLike, device: str = "cpu", threads: int = 0,
                   graph_shapes: str = "", spinning: bool = True) -> Runtime:
    """Build the runtime named in a model's config (parameters: runtime, artifact, device, graph_shapes)."""
    if kind not in RUNTIMES:
        raise ValueError(f"unknown runtime '{kind}'; choose one of: {', '.join(sorted(RUNTIMES))}")
    if not Path(artifact).exists():
        raise FileNotFoundError(f"artifact {artifact} does not exist; run `python -m triffusion.export build` first")
    if kind == "torch":
        return load_torch_runtime(artifact, device=device, graph_shapes=parse_graph_shapes(graph_shapes))
    if kind == "tensorrt":
        return TensorRTRuntime(artifact, device=device)
    if kind == InOrchestrator.KIND:
        return InOrchestrator()
    return OnnxRuntime(artifact, device=device, threads=threads, spinning=spinning)


_INTEGER_INPUTS = frozenset().union(*(c.integer_inputs() for c in components.COMPONENTS.values()))
_FP32_INPUTS = frozenset().union(*(c.full_precision for c in components.COMPONENTS.values()))


class TorchRuntime:
    """A torch module as a runtime: fp16, channels-last and SDPA attention on CUDA, with CUDA graphs
    captured per served bucket at load (warm-up belongs in load, not in the first request). A batch
    with no graph of its own runs in the smallest captured graph with room for it (rows are independent
    in every component, so padding rows change nothing), else eagerly. The UNet's timestep stays FP32
    (Component.full_precision) when the module runs in fp16.
    Numpy in gives numpy out (the copy to the host waits for the GPU; no other sync). Torch tensors in stay
    on the device (the DLPack path); with `sync` (the default) run() returns once the GPU is done, because
    its callers need that: the component adapter hands the output to Triton through DLPack, read by another
    process with no stream order, and the runner times each UNet call for the latency predictor. A caller
    that orders later work on the same stream and times with CUDA events passes sync=False."""

    def __init__(self, module, input_names, output_names, device: str = "cpu", fp16: bool | None = None,
                 graph_shapes=(), integer_inputs: Iterable[str] | None = None,
                 fp32_inputs: Iterable[str] | None = None):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.dtype = torch.float16 if (fp16 if fp16 is not None else self.device.type == "cuda") else torch.float32
        self.module = module.to(self.device, self.dtype).eval()
        if self.device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)
            self._pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: one memory pool
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)
        # inputs captured as int64 (token ids); default: the integer inputs of every served component
        self.integer_inputs = frozenset(integer_inputs if integer_inputs is not None else _INTEGER_INPUTS)
        # floating inputs kept in FP32 whatever the module's dtype (the UNet's timestep)
        self.fp32_inputs = frozenset(fp32_inputs if fp32_inputs is not None else _FP32_INPUTS)
        self.graphs: dict[tuple, tuple] = {}
        for shapes in graph_shapes:
            self.capture(shapes)

    def _dtype(self, name):
        torch = self.torch
        if name in self.integer_inputs:
            return torch.int64
        return torch.float32 if name in self.fp32_inputs else self.dtype

    def _prepare(self, name, value):
        torch = self.torch
        tensor = torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.to(self._dtype(name)) if tensor.is_floating_point() else tensor

    def capture(self, shapes: dict[str, tuple]) -> None:
        """Record a CUDA graph for one set of input shapes (all other shapes pad into one or run eagerly)."""
        torch = self.torch
        if self.device.type != "cuda":
            return
        static = [torch.zeros(shapes[n], device=self.device, dtype=self._dtype(n)) for n in self.input_names]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self.module(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            output = self.module(*static)
        self.graphs[tuple(tuple(s.shape) for s in static)] = (graph, static, output)

    def graph_for(self, key: tuple) -> tuple | None:
        """The exact graph, or the smallest one whose shapes match but for more rows."""
        if key in self.graphs:
            return self.graphs[key]
        rows = key[0][0]
        fits = [k for k in self.graphs if k[0][0] >= rows and all(a[1:] == b[1:] for a, b in zip(k, key))]
        return self.graphs[min(fits, key=lambda k: k[0][0])] if fits else None

    def run(self, inputs, sync: bool = True):
        torch = self.torch
        as_numpy = not isinstance(next(iter(inputs.values())), torch.Tensor)
        tensors = [self._prepare(n, inputs[n]) for n in self.input_names]
        rows = tensors[0].shape[0]
        with torch.inference_mode():
            found = self.graph_for(tuple(tuple(t.shape) for t in tensors)) if self.graphs else None
            if found is not None:
                graph, static, output = found
                for dst, src in zip(static, tensors):
                    dst[:rows].copy_(src)
                graph.replay()
                output = output[:rows]
                # a copy either way: the next replay overwrites the graph's own output
                output = output.float() if output.dtype != torch.float32 else output.clone()
            else:
                output = self.module(*tensors).float()
        if as_numpy:
            return {self.output_names[0]: output.cpu().numpy()}  # the copy waits for the GPU
        if sync and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return {self.output_names[0]: output}


COMPONENT_FILE = "component.json"


def save_torch_artifact(kind: str, module, folder: str | os.PathLike) -> Path:
    """Write a component as a torch artifact: the diffusers/transformers model's own save_pretrained
    folder (safetensors) plus component.json naming which component it is."""
    import json

    folder = Path(folder)
    module.save_pretrained(str(folder))
    (folder / COMPONENT_FILE).write_text(json.dumps({"kind": kind}) + "\n")
    return folder


def load_torch_runtime(folder: str | os.PathLike, device: str = "cpu", graph_shapes=()) -> TorchRuntime:
    """A torch artifact -> TorchRuntime, with CUDA graphs for the given (rows, h, w) buckets."""
    import json

    folder = Path(folder)
    meta = folder / COMPONENT_FILE
    if not meta.exists():
        raise FileNotFoundError(f"{folder}: not a torch artifact (no {COMPONENT_FILE}); export with --runtime torch")
    kind = json.loads(meta.read_text())["kind"]
    if kind not in components.COMPONENTS and kind not in components.CONTROL_COMPONENTS:
        raise ValueError(f"{meta}: unknown component kind '{kind}'")
    component = components.get(kind)
    model = component.load_pretrained(folder)
    spec = component.from_model(model)
    return TorchRuntime(component.wrap(model), spec.input_names, spec.output_names, device=device,
                        graph_shapes=[spec.graph_inputs(bucket) for bucket in graph_shapes],
                        integer_inputs=component.integer_inputs(), fp32_inputs=component.full_precision)


class InOrchestrator:
    """The runtime of a UNet model whose UNet runs inside the orchestrator (unet_executor inprocess): it
    loads no weights and captures no graphs, so the GPU holds one copy of each, the orchestrator's. The
    Triton model stays (its name is in the repository and the stats) and answers any call with an error
    that says where the UNet runs."""

    KIND = "in_orchestrator"
    input_names = components.UNet.input_names
    output_names = components.UNet.output_names

    def run(self, inputs, sync: bool = True):
        raise RuntimeError("this UNet runs inside the orchestrator (unet_executor inprocess) and is not served "
                           "as a model of its own; call text_to_image or text_to_image_stream")


class TensorRTRuntime:
    """A serialized TensorRT engine (model.plan) run with torch tensors as its buffers, on CUDA: the export
    times the engines it built with it, so the latency profile is the engines' own. A call picks the first
    optimization profile that covers its shapes (one per resolution bucket, see Component.profiles)."""

    def __init__(self, path: str | os.PathLike, device: str = "cuda"):
        import tensorrt as trt
        import torch

        self.torch, self.trt = torch, trt
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RuntimeError(f"TensorRT engines run on CUDA devices, not '{device}'")
        with torch.cuda.device(self.device):
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"{path}: TensorRT could not load the engine (built by another TensorRT version?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = lambda n: self.engine.get_tensor_mode(n)
        self.input_names = tuple(n for n in names if mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if mode(n) == trt.TensorIOMode.OUTPUT)
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.profiles = [{n: tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(n, i))
                          for n in self.input_names} for i in range(self.engine.num_optimization_profiles)]
        self.active_profile: int | None = None

    def profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Index of the first optimization profile whose (min, max) range covers every input shape."""
        for index, ranges in enumerate(self.profiles):
            if all(all(lo <= s <= hi for lo, s, hi in zip(ranges[n][0], shape, ranges[n][2]))
                   for n, shape in shapes.items()):
                return index
        raise components.OutsideProfiles(f"shapes {shapes} are outside every profile of the engine")

    def run(self, inputs, sync: bool = True):
        torch = self.torch
        as_numpy = not isinstance(next(iter(inputs.values())), torch.Tensor)
        tensors = {n: torch.as_tensor(inputs[n]).to(self.device, self.dtypes[n]).contiguous() for n in self.input_names}
        stream = torch.cuda.current_stream(self.device)
        index = self.profile_for({n: tuple(t.shape) for n, t in tensors.items()})
        if index != self.active_profile:
            self.context.set_optimization_profile_async(index, stream.cuda_stream)
            self.active_profile = index
        for name, tensor in tensors.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                        device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
        outputs = {n: t.float() for n, t in outputs.items()}
        if as_numpy:
            return {n: t.cpu().numpy() for n, t in outputs.items()}
        if sync:
            stream.synchronize()
        return outputs


RUNTIMES = {"onnxruntime": OnnxRuntime, "torch": TorchRuntime, "tensorrt": TensorRTRuntime,
            InOrchestrator.KIND: InOrchestrator}
