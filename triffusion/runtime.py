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
