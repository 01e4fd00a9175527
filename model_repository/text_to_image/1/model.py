"""Triton adapter for the two fronts clients call: `text_to_image` (unary: HTTP and gRPC infer, in
default mode with a response sender, so a request never holds an instance) and `text_to_image_stream`
(decoupled: gRPC streaming). Both validate, tokenize and forward to the orchestrator over BLS, and own
the client's request until its one final answer. Policy lives in triffusion.orchestrator.front."""

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion import contract, procs
from triffusion.bls import request_scalar, triton_error
from triffusion.orchestrator.errors import ComponentUnavailable, InvalidRequest, ServingError, ShuttingDown
from triffusion.orchestrator.front import Front, decode_status
from triffusion.orchestrator.params import Limits
from triffusion.orchestrator.text import PromptTokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ADMIN_KEY = os.environ.get("TRIFFUSION_ADMIN_KEY")
OUTPUTS = ["image", "metadata", "progress", "preview", "status"]
log = logging.getLogger("triffusion.front")


class Sink:
    """One client request's response sender."""

    def __init__(self, request):
        self.request, self.sender = request, request.get_response_sender()

    def progress(self, progress):
        self.sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("progress", progress)]))

    def preview(self, image):
        self.sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("preview", image)]))

    def finish(self, image, metadata):
        self.sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("image", image),
                                                     pb_utils.Tensor("metadata", metadata)]), flags=FINAL)

    def fail(self, error):
        self.sender.send(pb_utils.InferenceResponse(error=triton_error(error)), flags=FINAL)

    def is_cancelled(self):
        return self.sender.is_cancelled()


def _orchestrator_pid():
    pids = procs.stubs_of(os.getppid(), contract.ORCHESTRATOR)
    return min(pids.values()) if pids else None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = config.get("model_transaction_policy", {}).get("decoupled", False)
        self.input_names = [i["name"] for i in config["input"]]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        orchestrator = Path(args["model_repository"]).parent / contract.ORCHESTRATOR / "1"
        pipeline = json.loads((orchestrator / "pipeline.json").read_text())
        max_inflight = int(params.get("max_inflight", "256"))
        self.front = Front(Limits.from_dict(pipeline.get("limits", {})), PromptTokenizer(orchestrator / "tokenizer"),
                           unary=not self.decoupled, max_inflight=max_inflight, find_orchestrator=_orchestrator_pid,
                           alive=procs.alive, cancel=self._cancel)
        # One thread per request in flight: each blocks on its orchestrator call (Triton 2.51's BLS can be
        # neither cancelled nor waited on with a timeout; the watchdog answers the client instead).
        self.pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="triffusion-front")
        self._stop = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="triffusion-front-watchdog", daemon=True)
        self.watchdog.start()

    def execute(self, requests):
        for request in requests:
            received = time.monotonic()
            sink = Sink(request)
            try:
                raw = {n: v for n in self.input_names if (v := request_scalar(request, n)) is not None}
                params, ids = self.front.prepare(raw)
                timeout_us = request.timeout()
                inflight = self.front.accept(sink, stream=self.decoupled and params.stream,
                                             timeout_s=timeout_us / 1e6 if timeout_us else None)
            except ServingError as exc:
                sink.fail(exc)
                continue
            except Exception:  # noqa: BLE001 - nothing internal reaches the client
                log.exception("front could not read a request")
                sink.fail(InvalidRequest("request", "could not be read; see the request table in the README"))
                continue
            body = self.front.payload(inflight, params, received)
            self.pool.submit(self._forward, inflight, body, ids)
        return None

    def _forward(self, inflight, body, ids):
        """Relay the orchestrator's responses; the first final answer wins (the watchdog may answer first)."""
        front = self.front
        try:
            call = pb_utils.InferenceRequest(
                model_name=contract.ORCHESTRATOR, requested_output_names=OUTPUTS,
                inputs=[pb_utils.Tensor("request", np.array([body], dtype=np.object_)),
                        pb_utils.Tensor("input_ids", ids)])
            for response in call.exec(decoupled=True):
                if inflight.done:
                    continue  # answered already (cancelled, timed out): drain what the orchestrator still sends
                if response.has_error():
                    log.warning("orchestrator answered with an error: %s", response.error().message())
                    front.fail(inflight, ComponentUnavailable("orchestrator", "is restarting; retry shortly"))
                    continue
                out = {name: pb_utils.get_output_tensor_by_name(response, name) for name in OUTPUTS}
                if out["status"] is not None:
                    front.fail(inflight, decode_status(out["status"].as_numpy().reshape(-1)[0]))
                elif out["image"] is not None:
                    front.finish(inflight, out["image"].as_numpy(), out["metadata"].as_numpy())
                elif out["progress"] is not None:
                    front.relay(inflight, "progress", out["progress"].as_numpy())
                elif out["preview"] is not None:
                    front.relay(inflight, "preview", out["preview"].as_numpy())
        except Exception:  # noqa: BLE001
            log.exception("forwarding %s failed", inflight.id)
            front.fail(inflight, ComponentUnavailable("orchestrator", "did not answer; retry shortly"))
        front.fail(inflight, ServingError("the orchestrator ended the request without an answer"))

    def _cancel(self, request_id):
        message = {"op": "cancel", "id": request_id, "key": ADMIN_KEY}
        call = pb_utils.InferenceRequest(model_name=contract.ORCHESTRATOR, requested_output_names=["status"],
                                         inputs=[pb_utils.Tensor("control", np.array([json.dumps(message).encode()],
                                                                                     dtype=np.object_))])
        for _ in call.exec(decoupled=True):
            pass

    def _watch(self):
        while not self._stop.wait(0.1):
            try:
                self.front.sweep()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one failure
                log.exception("front watchdog failed")

    def finalize(self):
        self._stop.set()
        self.front.fail_all(ShuttingDown())
        self.pool.shutdown(wait=False, cancel_futures=True)
