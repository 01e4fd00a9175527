"""Triton adapter for the baselines (triffusion.orchestrator.baselines): parse with the orchestrator's
rules, run plain diffusers, answer with image and metadata. `mode` sequential: one request at a time;
batching: the requests Triton's dynamic batcher hands over run together."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion import contract, heap
from triffusion.bls import request_scalar as _scalar
from triffusion.orchestrator.baselines import DiffusersBaseline
from triffusion.orchestrator.params import InvalidRequest, Limits, parse_params
from triffusion.orchestrator.text import PromptTokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        repository = Path(args["model_repository"]).parent
        orchestrator = repository / contract.ORCHESTRATOR / "1"
        limits = json.loads((orchestrator / "pipeline.json").read_text())["limits"]
        self.limits = Limits.from_dict({**limits, "unets": ("default",)})
        self.tokenizer = PromptTokenizer(orchestrator / "tokenizer")
        self.input_names = [i["name"] for i in config["input"]]
        self.batched = config.get("max_batch_size", 0) > 0  # tensors carry a leading batch dim of 1
        self.name = config["name"]
        self.baseline = DiffusersBaseline(repository / params["pipeline"], device=params.get("device", "cpu"))
        heap.settle()  # start-up's objects out of later full collections, as every served model (triffusion.heap)

    def execute(self, requests):
        responses, parsed = [None] * len(requests), []
        for i, request in enumerate(requests):
            try:
                raw = {n: _scalar(request, n) for n in self.input_names}
                parsed.append((i, parse_params({k: v for k, v in raw.items() if v is not None}, self.limits,
                                               self.tokenizer.count)))
            except InvalidRequest as exc:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"INVALID_ARG: {exc}", pb_utils.TritonError.INVALID_ARG))
        if parsed:
            try:
                results = self.baseline.generate([p for _, p in parsed])
                for (i, _), (image, metadata) in zip(parsed, results):
                    metadata["model"] = self.name
                    meta = np.array([json.dumps(metadata).encode()], dtype=np.object_)
                    if self.batched:
                        image, meta = image[None], meta[None]
                    responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("image", np.ascontiguousarray(image)),
                                                               pb_utils.Tensor("metadata", meta)])
            except Exception as exc:  # a failing batch fails its requests; the model keeps serving
                for i, _ in parsed:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"INTERNAL: {exc}"))
        return responses
