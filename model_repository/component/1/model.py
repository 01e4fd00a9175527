"""Triton adapter for one exported component (text encoder, UNet, VAE decoder): tensors in, the
runtime named in config.pbtxt, tensors out. The export copies this file into each component."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from triffusion.runtime import create_runtime


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.runtime = create_runtime(params.get("runtime", "onnxruntime"),
                                      version_dir / params.get("artifact", "model.onnx"),
                                      device=params.get("device", "cpu"),
                                      threads=int(params.get("threads", "0")))
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                inputs = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                          for name in self.runtime.input_names}
                outputs = self.runtime.run(inputs)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, outputs[name]) for name in self.output_names]))
            except Exception as exc:  # a bad shape must fail this request, not the model
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.__class__.__module__}: {exc}")))
        return responses
