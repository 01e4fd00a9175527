"""Triton adapter for the orchestrator (decoupled, internal: only the fronts call it). Generation
requests in, the engine in between, progress and the final image out; failures and control replies
travel as a typed `status` output. Policy lives in triffusion.orchestrator."""

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion.bls import Deadlines, InProcessUNetExecutor, TritonExecutor, request_scalar
from triffusion.orchestrator.config import OrchestratorConfig, build_engine, unets_of
from triffusion.orchestrator.errors import InvalidRequest, ServingError
from triffusion.orchestrator.metrics import MetricsObserver
from triffusion.orchestrator.params import parse_params
from triffusion.orchestrator.request import RequestState
from triffusion.runtime import create_runtime

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ADMIN_KEY = os.environ.get("TRIFFUSION_ADMIN_KEY")  # set by `triffusion serve`; control ops must carry it
DRAIN_GRACE_S = float(os.environ.get("TRIFFUSION_DRAIN_GRACE_S", "0"))
log = logging.getLogger("triffusion.orchestrator")


def _status(payload: dict):
    return pb_utils.Tensor("status", np.array([json.dumps(payload).encode()], dtype=np.object_))


class ResponseSink:
    """Sends one request's progress, previews and its final answer through its response sender."""

    def __init__(self, sender):
        self.sender = sender

    def progress(self, step, steps):
        self.sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("progress", np.array([step, steps], np.int32))]))

    def preview(self, image):
        self.sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("preview", np.ascontiguousarray(image))]))

    def finish(self, image, metadata):
        self.sender.send(pb_utils.InferenceResponse([
            pb_utils.Tensor("image", np.ascontiguousarray(image)),
            pb_utils.Tensor("metadata", np.array([json.dumps(metadata).encode()], dtype=np.object_))]), flags=FINAL)

    def fail(self, error):
        self.sender.send(pb_utils.InferenceResponse([_status(error.to_dict())]), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        self.config = OrchestratorConfig.from_parameters(
            {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()})
        version_dir = Path(args["model_repository"]) / args["model_version"]
        pipeline = json.loads((version_dir / "pipeline.json").read_text())
        profile_path = version_dir / "profile.json"
        profile = json.loads(profile_path.read_text()) if profile_path.exists() else None
        self.unets = unets_of(pipeline)
        self.vocab_size = int(pipeline.get("vocab_size", 49408))
        kinds = pb_utils.MetricFamily
        self.observer = observer = MetricsObserver(kinds, kinds.COUNTER, kinds.GAUGE, kinds.HISTOGRAM)
        self.deadlines = Deadlines(self.config.component_timeout_s)
        executor = self._executor(Path(args["model_repository"]).parent, pipeline)
        self.engine, self.limits = build_engine(self.config, pipeline, executor, profile=profile, observer=observer)
        self.engine.start()

    def _executor(self, repository, pipeline):
        """`unet_executor`: "bls" (UNet is its own Triton model) or "inprocess" (UNet runs here)."""
        if self.config.unet_executor == "bls":
            return TritonExecutor(self.deadlines)
        graphs = pipeline.get("graphs", {})
        unets = {name: create_runtime(self.config.runtime, repository / pipeline["artifacts"][name],
                                      device=self.config.device, graph_shapes=graphs.get(name, ""))
                 for name in self.unets.values()}
        return InProcessUNetExecutor(unets, self.deadlines)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                control = request_scalar(request, "control")
                if control is not None:
                    reply = self._control(json.loads(control))
                    sender.send(pb_utils.InferenceResponse([_status({"code": "OK", **reply})]), flags=FINAL)
                    continue
                self.engine.submit(self._state(request, ResponseSink(sender)))
            except ServingError as exc:
                ResponseSink(sender).fail(exc)
            except Exception:  # noqa: BLE001 - a malformed internal message must not reach the engine
                log.exception("orchestrator could not take a request")
                ResponseSink(sender).fail(InvalidRequest("request", "is not a request the orchestrator reads; "
                                                                    "call text_to_image or text_to_image_stream"))
        return None

    def _state(self, request, sink) -> RequestState:
        body = request_scalar(request, "request")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if body is None or ids is None:
            raise InvalidRequest("request", "is required; clients call text_to_image or text_to_image_stream")
        message = json.loads(body)
        params = parse_params(message["params"], self.limits)  # checked again: this model is reachable too
        ids = ids.as_numpy()
        if ids.shape != (2, 77) or ids.dtype != np.int64 or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidRequest("input_ids", f"must be (2, 77) token ids below {self.vocab_size}")
        # The SLO counts from when the front received the request (same monotonic clock, same host).
        received = min(float(message.get("received", time.monotonic())), time.monotonic())
        return RequestState(request_id=str(message["id"]), params=params, sink=sink,
                            input_ids=ids if params.uses_cfg else ids[1:], model=self.unets[params.unet],
                            cascade=params.unet == "cascade",
                            received=self.engine.clock() - (time.monotonic() - received))

    def _control(self, message: dict) -> dict:
        op = message.get("op")
        if ADMIN_KEY is not None and message.get("key") != ADMIN_KEY:
            raise InvalidRequest("control", "is refused without the admin key")
        if op == "cancel":
            return {"found": self.engine.cancel(str(message.get("id")))}
        if op == "health":
            return self.engine.health()
        if op == "profile":  # what the latency predictor has learned (benchmarks seed the simulator with it)
            return self.engine.profile()
        if op == "events":  # the supervisor's counts of reloads and restarts, for /metrics
            self.observer.supervisor(message.get("events", []))
            return {}
        if op == "drain":
            if ADMIN_KEY is None:
                raise InvalidRequest("control", "drain needs an admin key (set by `triffusion serve`)")
            self.engine.drain()
            return self.engine.health()
        raise InvalidRequest("control", f"op '{op}' is unknown; allowed: cancel, health, drain, events, profile")

    def finalize(self):
        self.engine.stop(grace_s=DRAIN_GRACE_S)
        self.deadlines.close()
