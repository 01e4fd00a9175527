"""One small interface for running an exported component: ONNX Runtime today, TensorRT or a CUDA
graph runtime later. A runtime maps named numpy arrays to named numpy arrays."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np


class Runtime(Protocol):
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntime:
    """onnxruntime session; CUDA provider first where onnxruntime-gpu is installed and asked for."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
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


RUNTIMES = {"onnxruntime": OnnxRuntime}


def create_runtime(kind: str, artifact: str | os.PathLike, device: str = "cpu", threads: int = 0) -> Runtime:
    """Build the runtime named in a model's config (parameters: runtime, artifact, device)."""
    if kind not in RUNTIMES:
        raise ValueError(f"unknown runtime '{kind}'; choose one of: {', '.join(sorted(RUNTIMES))}")
    if not Path(artifact).exists():
        raise FileNotFoundError(f"artifact {artifact} does not exist; run `python -m triffusion.export build` first")
    return RUNTIMES[kind](artifact, device=device, threads=threads)


class TorchRuntime:
    """A torch module as a runtime: fp16, channels-last and SDPA attention on CUDA, with CUDA graphs
    captured per declared input shape at load (warm-up belongs in load, not in the first request).
    Numpy in gives numpy out; torch tensors in stay on the device (DLPack path)."""

    def __init__(self, module, input_names, output_names, device: str = "cpu", fp16: bool | None = None,
                 graph_shapes=()):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.dtype = torch.float16 if (fp16 if fp16 is not None else self.device.type == "cuda") else torch.float32
        self.module = module.to(self.device, self.dtype).eval()
        if self.device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)
        self.graphs: dict[tuple, tuple] = {}
        for shapes in graph_shapes:
            self.capture(shapes)

    def _prepare(self, name, value):
        torch = self.torch
        tensor = torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def capture(self, shapes: dict[str, tuple]) -> None:
        """Record a CUDA graph for one set of input shapes (all other shapes run eagerly)."""
        torch = self.torch
        if self.device.type != "cuda":
            return
        static = [torch.zeros(shapes[n], device=self.device,
                              dtype=torch.int64 if n == "input_ids" else self.dtype) for n in self.input_names]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self.module(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            output = self.module(*static)
        self.graphs[tuple(tuple(s.shape) for s in static)] = (graph, static, output)

    def run(self, inputs):
        torch = self.torch
        as_numpy = not isinstance(next(iter(inputs.values())), torch.Tensor)
        tensors = [self._prepare(n, inputs[n]) for n in self.input_names]
        key = tuple(tuple(t.shape) for t in tensors)
        with torch.inference_mode():
            if key in self.graphs:
                graph, static, output = self.graphs[key]
                for dst, src in zip(static, tensors):
                    dst.copy_(src)
                graph.replay()
                output = output.clone()
            else:
                output = self.module(*tensors)
        output = output.float()
        return {self.output_names[0]: output.cpu().numpy() if as_numpy else output}
