"""One small interface for running an exported component: ONNX Runtime, or torch with CUDA graphs per
served bucket. A runtime maps named numpy arrays to named numpy arrays. What each component takes, and
its graph buckets, come from triffusion.components (this module never imports export)."""

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


def create_runtime(kind: str, artifact: str | os.PathLike, device: str = "cpu", threads: int = 0,
                   graph_shapes: str = "") -> Runtime:
    """Build the runtime named in a model's config (parameters: runtime, artifact, device, graph_shapes)."""
    if kind not in RUNTIMES:
        raise ValueError(f"unknown runtime '{kind}'; choose one of: {', '.join(sorted(RUNTIMES))}")
    if not Path(artifact).exists():
        raise FileNotFoundError(f"artifact {artifact} does not exist; run `python -m triffusion.export build` first")
    if kind == "torch":
        return load_torch_runtime(artifact, device=device, graph_shapes=parse_graph_shapes(graph_shapes))
    return OnnxRuntime(artifact, device=device, threads=threads)


_INTEGER_INPUTS = frozenset().union(*(c.integer_inputs() for c in components.COMPONENTS.values()))


class TorchRuntime:
    """A torch module as a runtime: fp16, channels-last and SDPA attention on CUDA, with CUDA graphs
    captured per served bucket at load (warm-up belongs in load, not in the first request). A batch
    with no graph of its own runs in the smallest captured graph with room for it (rows are independent
    in every component, so padding rows change nothing), else eagerly.
    Numpy in gives numpy out; torch tensors in stay on the device (the DLPack path), and CUDA work is
    finished when run() returns, so callers' timings are true GPU times."""

    def __init__(self, module, input_names, output_names, device: str = "cpu", fp16: bool | None = None,
                 graph_shapes=(), integer_inputs: Iterable[str] | None = None):
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
        self.graphs: dict[tuple, tuple] = {}
        for shapes in graph_shapes:
            self.capture(shapes)

    def _prepare(self, name, value):
        torch = self.torch
        tensor = torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def capture(self, shapes: dict[str, tuple]) -> None:
        """Record a CUDA graph for one set of input shapes (all other shapes pad into one or run eagerly)."""
        torch = self.torch
        if self.device.type != "cuda":
            return
        static = [torch.zeros(shapes[n], device=self.device,
                              dtype=torch.int64 if n in self.integer_inputs else self.dtype) for n in self.input_names]
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

    def run(self, inputs):
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
                output = output[:rows].clone()
            else:
                output = self.module(*tensors)
            output = output.float()
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return {self.output_names[0]: output.cpu().numpy() if as_numpy else output}


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
    if kind not in components.COMPONENTS:
        raise ValueError(f"{meta}: unknown component kind '{kind}'")
    component = components.get(kind)
    model = component.load_pretrained(folder)
    spec = component.from_model(model)
    return TorchRuntime(component.wrap(model), spec.input_names, spec.output_names, device=device,
                        graph_shapes=[spec.graph_inputs(bucket) for bucket in graph_shapes],
                        integer_inputs=component.integer_inputs())


RUNTIMES = {"onnxruntime": OnnxRuntime, "torch": TorchRuntime}
