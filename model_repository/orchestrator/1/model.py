"""Triton adapter for the orchestrator (decoupled): requests in, the engine in between, streamed
progress and the final image out. Policy lives in triffusion.orchestrator."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion.bls import InProcessUNetExecutor, TritonExecutor, request_scalar as _scalar
from triffusion.runtime import create_runtime
from triffusion.orchestrator.config import build_engine, check_parameters, unets_of
from triffusion.orchestrator.metrics import MetricsObserver
from triffusion.orchestrator.params import InvalidRequest, parse_params
from triffusion.orchestrator.request import RequestState, Status
from triffusion.orchestrator.scheduler import QueueFull, Rejected
from triffusion.orchestrator.text import PromptTokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


CODES = {Status.CANCELLED: "CANCELLED", Status.REJECTED: "UNAVAILABLE", Status.FAILED: "INTERNAL"}


def _error(code: str, message: str):
    # The code leads the message too: BLS callers (the text_to_image proxy) only receive INTERNAL.
    # TritonError exists only once the stub runs (not during config auto-complete): look it up late.
    return pb_utils.TritonError(f"{code}: {message}", getattr(pb_utils.TritonError, code))


class ResponseSink:
    """Sends one request's progress, image or error through its response sender."""

    def __init__(self, request):
        self.request, self.sender = request, request.get_response_sender()

    def progress(self, step, steps):
        self.sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("progress", np.array([step, steps], np.int32))]))

    def preview(self, image):
        self.sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("preview", np.ascontiguousarray(image))]))

    def finish(self, image, metadata):
        self.sender.send(pb_utils.InferenceResponse([
            pb_utils.Tensor("image", np.ascontiguousarray(image)),
            pb_utils.Tensor("metadata", np.array([json.dumps(metadata).encode()], dtype=np.object_))]), flags=FINAL)

    def fail(self, status, message):
        self.send_error(CODES[status], message)

    def send_error(self, code, message):
        self.sender.send(pb_utils.InferenceResponse(error=_error(code, message)), flags=FINAL)

    def is_cancelled(self):
        return self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_names = [i["name"] for i in config["input"]]
        params = check_parameters({k: v["string_value"] for k, v in config.get("parameters", {}).items()})
        version_dir = Path(args["model_repository"]) / args["model_version"]
        pipeline = json.loads((version_dir / "pipeline.json").read_text())
        profile_path = version_dir / "profile.json"
        profile = json.loads(profile_path.read_text()) if profile_path.exists() else None
        self.tokenizer = PromptTokenizer(version_dir / "tokenizer")
        self.unets = unets_of(pipeline)
        kinds = pb_utils.MetricFamily
        observer = MetricsObserver(kinds, kinds.COUNTER, kinds.GAUGE, kinds.HISTOGRAM)
        executor = self._executor(params, Path(args["model_repository"]).parent, pipeline)
        self.engine, self.limits = build_engine(params, pipeline, executor, profile=profile, observer=observer)
        self.engine.start()
        self.counter = 0

    def _executor(self, params, repository, pipeline):
        """`unet_executor`: "bls" (UNet is its own Triton model) or "inprocess" (UNet runs here)."""
        if params["unet_executor"] == "bls":
            return TritonExecutor()
        if params["unet_executor"] != "inprocess":
            raise ValueError(f"unet_executor '{params['unet_executor']}' is unknown; choose bls or inprocess")
        graphs = pipeline.get("graphs", {})
        return InProcessUNetExecutor({name: create_runtime(params["runtime"], repository / pipeline["artifacts"][name],
                                                           device=params["device"], graph_shapes=graphs.get(name, ""))
                                      for name in self.unets.values()})

    def execute(self, requests):
        for request in requests:
            sink = ResponseSink(request)
            try:
                raw = {name: _scalar(request, name) for name in self.input_names}
                params = parse_params({k: v for k, v in raw.items() if v is not None}, self.limits, self.tokenizer.count)
                self.counter += 1
                state = RequestState(request_id=request.request_id() or f"req-{self.counter}", params=params, sink=sink,
                                     input_ids=self.tokenizer.input_ids(params.prompt, params.negative_prompt,
                                                                        params.uses_cfg),
                                     model=self.unets[params.unet], cascade=params.unet == "cascade")
                self.engine.submit(state)
            except InvalidRequest as exc:
                sink.send_error("INVALID_ARG", str(exc))
            except (QueueFull, Rejected) as exc:
                sink.fail(Status.REJECTED, str(exc))
        return None

    def finalize(self):
        self.engine.stop()
