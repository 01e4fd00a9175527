"""Triton adapter for the orchestrator (internal: clients call the fronts). It hosts the engine; the
fronts submit generations and cancellations over a Unix socket (triffusion.channel) and get progress,
previews and one final answer back the same way. Through Triton it takes only control messages (health,
drain, the supervisor's counts, the learned latency model), answered in a typed `status` output. Policy
lives in triffusion.orchestrator."""

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion import heap, lora
from triffusion.bls import Deadlines, InProcessUNetExecutor, TritonExecutor, request_scalar, send
from triffusion.channel import ChannelClosed, Listener, socket_path
from triffusion.orchestrator.adapters import RegisteredAdapters
from triffusion.orchestrator.config import OrchestratorConfig, build_engines, device_names, unets_of
from triffusion.orchestrator.errors import InvalidRequest, ServingError
from triffusion.orchestrator.metrics import MetricsObserver
from triffusion.orchestrator.params import parse_params
from triffusion.orchestrator.request import RequestState
from triffusion.runtime import create_runtime

ADMIN_KEY = os.environ.get("TRIFFUSION_ADMIN_KEY")  # set by `triffusion serve`; control ops must carry it
DRAIN_GRACE_S = float(os.environ.get("TRIFFUSION_DRAIN_GRACE_S", "0"))
log = logging.getLogger("triffusion.orchestrator")


def _status(payload: dict):
    return pb_utils.Tensor("status", np.array([json.dumps(payload).encode()], dtype=np.object_))


class ChannelSink:
    """One request's progress, previews and final answer, back to the front that submitted it. A front that
    is gone makes every send raise (ChannelClosed): the engine then stops the request's work."""

    def __init__(self, channel, request_id: str):
        self.channel, self.id = channel, request_id

    def progress(self, step, steps):
        self.channel.send({"id": self.id, "kind": "progress", "value": np.array([step, steps], np.int32)})

    def preview(self, image):
        self.channel.send({"id": self.id, "kind": "preview", "value": np.ascontiguousarray(image)})

    def finish(self, image, metadata):
        self.channel.send({"id": self.id, "kind": "finish", "image": np.ascontiguousarray(image),
                           "metadata": json.dumps(metadata).encode()})

    def fail(self, error):
        self.channel.send({"id": self.id, "kind": "fail", "error": error.to_dict()})


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
        repository = Path(args["model_repository"]).parent
        # One engine per device (`devices`; one: the single-engine path), each request placed by load.
        executors = [self._executor(repository, pipeline, device) for device in device_names(self.config)]
        self.adapters = None  # LoRA: adapters in static slots of an in-process UNet (triffusion.lora)
        if pipeline.get("lora"):
            if len(executors) > 1:
                raise ValueError("orchestrator parameter devices: LoRA adapters are served on one device; set 1")
            executor, self.adapters = lora.serve(pipeline, repository, executors[0], observer=observer,
                                                 device=self.config.device)
            executors = [executor]
        self.engine, self.limits = build_engines(self.config, pipeline, executors, profile=profile, observer=observer)
        self._submit = self.engine.submit
        self.registered = None
        if self.adapters is not None:  # requests wait for their adapters before they reach the engine
            self.adapters.connect(self.engine.submit)
            self._submit = self.adapters.admit
            # add-lora on the served repository: new names are served at once, replaced files reloaded
            self.registered = RegisteredAdapters(version_dir / "pipeline.json", self.limits,
                                                 pipeline["lora"].get("adapters"), on_change=self.adapters.follow)
        # Start-up's objects (torch, onnxruntime, scipy: ~350,000) out of every later full collection, which
        # would otherwise hold the GIL ~130 ms each, admission and rejections included (triffusion.heap).
        heap.settle()
        self.gc_pauses = heap.GcPauses().install()
        self.engine.start()
        self.listener = Listener(socket_path(os.getppid()), self._serve_front)

    def _executor(self, repository, pipeline, device):
        """`unet_executor`: "bls" (UNet is its own Triton model) or "inprocess" (UNet runs here, on `device`)."""
        if self.config.unet_executor == "bls":
            return TritonExecutor(self.deadlines)
        graphs = pipeline.get("graphs", {})
        load = lambda name: create_runtime(self.config.runtime, repository / pipeline["artifacts"][name],
                                           device=device, graph_shapes=graphs.get(name, ""),
                                           threads=self.config.threads, spinning=self.config.spinning == "on")
        control = pipeline.get("control") or {}  # ControlNets and the controlled UNet run here too
        unets = {name: load(name) for name in [*self.unets.values(), *([control["unet"]] if control else [])]}
        controlnets = {name: load(name) for name in control.get("controlnets", {}).values()}
        return InProcessUNetExecutor(unets, self.deadlines, controlnets=controlnets)

    # ---- the fronts' channel ---------------------------------------------------------------------
    def _serve_front(self, channel):
        """One front's submissions and cancellations, until it disconnects."""
        while (message := channel.recv()) is not None:
            request_id = str(message.get("id"))
            try:
                if message.get("op") == "cancel":
                    if self.adapters is None or not self.adapters.cancel(request_id):
                        self.engine.cancel(request_id)
                else:
                    self._submit(self._state(message, ChannelSink(channel, request_id)))
            except ServingError as exc:
                self._refuse(channel, request_id, exc)
            except Exception:  # noqa: BLE001 - a malformed message must not reach the engine
                log.exception("orchestrator could not take a submission")
                self._refuse(channel, request_id, InvalidRequest("request", "could not be read"))

    @staticmethod
    def _refuse(channel, request_id, error):
        try:
            ChannelSink(channel, request_id).fail(error)
        except ChannelClosed:
            pass

    def _state(self, message: dict, sink) -> RequestState:
        limits = self.registered.limits() if self.registered is not None else self.limits
        params = parse_params(message["params"], limits)  # checked again, as every other input
        ids = np.asarray(message["input_ids"])
        if ids.shape != (2, 77) or ids.dtype != np.int64 or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidRequest("input_ids", f"must be (2, 77) token ids below {self.vocab_size}")
        # The SLO counts from when the front received the request (same monotonic clock, same host).
        received = min(float(message.get("received", time.monotonic())), time.monotonic())
        return RequestState(request_id=str(message["id"]), params=params, sink=sink,
                            input_ids=ids if params.uses_cfg else ids[1:], model=self.unets[params.unet],
                            cascade=params.unet == "cascade",
                            received=self.engine.clock() - (time.monotonic() - received))

    # ---- control through Triton ---------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                control = request_scalar(request, "control")
                if control is None:
                    raise InvalidRequest("control", "is required; clients call text_to_image or "
                                                    "text_to_image_stream")
                reply = {"code": "OK", **self._control(json.loads(control))}
            except ServingError as exc:
                reply = exc.to_dict()
            except Exception:  # noqa: BLE001
                log.exception("orchestrator could not read a control message")
                reply = InvalidRequest("control", "could not be read").to_dict()
            send(sender, pb_utils.InferenceResponse([_status(reply)]), final=True)
        return None

    def _control(self, message: dict) -> dict:
        op = message.get("op")
        if ADMIN_KEY is not None and message.get("key") != ADMIN_KEY:
            raise InvalidRequest("control", "is refused without the admin key")
        if op == "health":
            return self.engine.health()
        if op == "profile":  # what the latency predictor has learned (benchmarks seed the simulator with it)
            return self.engine.profile()
        if op == "heap":  # the garbage collector's pauses since start-up (triffusion.heap)
            return self.gc_pauses.report()
        if op == "events":  # the supervisor's counts of reloads and restarts, for /metrics
            self.observer.supervisor(message.get("events", []))
            return {}
        if op == "drain":
            if ADMIN_KEY is None:
                raise InvalidRequest("control", "drain needs an admin key (set by `triffusion serve`)")
            self.engine.drain()
            return self.engine.health()
        raise InvalidRequest("control", f"op '{op}' is unknown; allowed: health, drain, events, heap, profile")

    def finalize(self):
        self.gc_pauses.remove()
        self.listener.close()
        self.engine.stop(grace_s=DRAIN_GRACE_S)
        if self.adapters is not None:
            self.adapters.close()
        self.deadlines.close()
