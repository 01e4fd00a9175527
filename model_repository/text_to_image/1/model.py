"""Unary front of the orchestrator for HTTP and plain gRPC infer (HTTP cannot call decoupled models):
forwards the request over BLS and returns the final response, or its error with the same code."""

import triton_python_backend_utils as pb_utils

from triffusion import contract


CODES = ("INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL")


def _restore_code(message: str):
    """BLS turns every error into INTERNAL; the orchestrator leads its messages with the real code."""
    code = message.partition(": ")[0]
    return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code if code in CODES else "INTERNAL"))


class TritonPythonModel:
    def initialize(self, args):
        import json

        self.input_names = [i["name"] for i in json.loads(args["model_config"])["input"] if i["name"] not in ("stream", "preview_every")]

    def execute(self, requests):
        return [self._forward(request) for request in requests]

    def _forward(self, request):
        inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in self.input_names) if t is not None]
        bls = pb_utils.InferenceRequest(model_name=contract.ORCHESTRATOR, inputs=inputs,
                                        requested_output_names=["image", "metadata"])
        final = None
        for response in bls.exec(decoupled=True):
            if response.has_error():
                return pb_utils.InferenceResponse(error=_restore_code(response.error().message()))
            if pb_utils.get_output_tensor_by_name(response, "image") is not None:
                final = response
        if final is None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{contract.ORCHESTRATOR}: no image in response"))
        return pb_utils.InferenceResponse([pb_utils.get_output_tensor_by_name(final, n) for n in ("image", "metadata")])
