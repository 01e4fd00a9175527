"""Triton adapter for the cascade's quality gate: a batch of uint8 images (and, optional, one prompt
each) in, one score each out. The discriminator, its training and the CLIP gate live in
triffusion.orchestrator.gate."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion import heap
from triffusion.orchestrator.gate import load_gate


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        if params.get("device", "cpu") == "cpu" and int(params.get("threads", "0")) > 0:
            import torch

            torch.set_num_threads(int(params["threads"]))  # the served repository's CPU threads (orchestrator config)
        self.gate = load_gate(version_dir / params.get("artifact", "gate.pt"), device=params.get("device", "cpu"))
        heap.settle()  # start-up's objects out of later full collections (triffusion.heap)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
                prompt = pb_utils.get_input_tensor_by_name(request, "prompt")
                prompts = None if prompt is None else [p.decode("utf-8", errors="replace")
                                                       for p in prompt.as_numpy().reshape(-1)]
                scores = self.gate.score(images, prompts).astype(np.float32)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", scores)]))
            except Exception as exc:  # a bad image must fail this request, not the model
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"quality_gate: {exc}")))
        return responses
