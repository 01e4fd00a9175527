"""Triton adapter for one exported component (text encoder, UNet, VAE decoder): tensors in, the
runtime named in config.pbtxt, tensors out. The export copies this file into each component.

GPU tensors (with FORCE_CPU_ONLY_INPUT_TENSORS "no") go to the runtime through DLPack and its GPU
outputs come back the same way: nothing is copied through host memory."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion import heap
from triffusion.runtime import create_runtime


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack())


def _output(name, value):
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value)
    from torch.utils.dlpack import to_dlpack  # a torch tensor from a GPU runtime

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        device = params.get("device", "cpu")
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.runtime = create_runtime(params.get("runtime", "onnxruntime"),
                                      version_dir / params.get("artifact", "model.onnx"), device=device,
                                      threads=int(params.get("threads", "0")),
                                      spinning=params.get("spinning", "on") == "on",
                                      graph_shapes=params.get("graph_shapes", ""))
        self.output_names = [o["name"] for o in config["output"]]
        heap.settle()  # start-up's objects out of later full collections (triffusion.heap)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self.runtime.run({name: _input(request, name) for name in self.runtime.input_names})
                responses.append(pb_utils.InferenceResponse([_output(name, outputs[name]) for name in self.output_names]))
            except Exception as exc:  # a bad shape must fail this request, not the model
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.__class__.__module__}: {exc}")))
        return responses
