"""Triton adapter for the two fronts clients call: `text_to_image` (unary: HTTP and gRPC infer, in
default mode with a response sender, so a request never holds an instance) and `text_to_image_stream`
(decoupled: gRPC streaming). Both validate, tokenize and submit to the orchestrator over a Unix socket
(triffusion.channel), and own the client's request until its one final answer. Policy lives in
triffusion.orchestrator.front."""

import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion import contract, heap
from triffusion.bls import is_cancelled, request_input, send, triton_error
from triffusion.channel import ChannelClosed, connect, socket_path
from triffusion.orchestrator.adapters import RegisteredAdapters
from triffusion.orchestrator.errors import ComponentUnavailable, InvalidRequest, ServingError, ShuttingDown
from triffusion.orchestrator.front import Front, dispatch
from triffusion.orchestrator.params import Limits
from triffusion.orchestrator.text import PromptTokenizer

log = logging.getLogger("triffusion.front")


class Sink:
    """One client request's response sender (every call through triffusion.bls's lock)."""

    def __init__(self, request):
        self.sender = request.get_response_sender()

    def progress(self, progress):
        send(self.sender, pb_utils.InferenceResponse([pb_utils.Tensor("progress", progress)]))

    def preview(self, image):
        send(self.sender, pb_utils.InferenceResponse([pb_utils.Tensor("preview", image)]))

    def finish(self, image, metadata: bytes):
        send(self.sender, pb_utils.InferenceResponse([
            pb_utils.Tensor("image", image),
            pb_utils.Tensor("metadata", np.array([metadata], dtype=np.object_))]), final=True)

    def fail(self, error):
        send(self.sender, pb_utils.InferenceResponse(error=triton_error(error)), final=True)

    def is_cancelled(self):
        return is_cancelled(self.sender)


class Link:
    """The connection to the orchestrator, made when a request needs it; its reader thread hands every
    answer to the front. A broken connection (the orchestrator died) fails what it carried at once."""

    def __init__(self, path: Path):
        self.path, self.front = path, None
        self.channel, self.generation = None, 0
        self._lock = threading.Lock()

    def current(self) -> int | None:
        """The live connection's generation, connecting if there is none; None if the orchestrator is down."""
        with self._lock:
            if self.channel is None or self.channel.closed:
                try:
                    self.channel = connect(self.path)
                except ChannelClosed:
                    return None
                self.generation += 1
                threading.Thread(target=self._read, args=(self.channel, self.generation),
                                 name="triffusion-front-link", daemon=True).start()
            return self.generation

    def alive(self, generation: int) -> bool:
        channel = self.channel
        return generation == self.generation and channel is not None and not channel.closed

    def send(self, message: dict) -> None:
        channel = self.channel
        if channel is None:
            raise ChannelClosed("not connected")
        channel.send(message)

    def _read(self, channel, generation):
        while (message := channel.recv()) is not None:
            try:
                dispatch(self.front, message)
            except Exception:  # noqa: BLE001 - one bad message must not stop the answers to the others
                log.exception("front could not relay an answer")
        self.front.sweep()  # the orchestrator is gone: its requests get UNAVAILABLE now, not at the next tick


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = config.get("model_transaction_policy", {}).get("decoupled", False)
        self.input_names = [i["name"] for i in config["input"]]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        orchestrator = Path(args["model_repository"]).parent / contract.ORCHESTRATOR / "1"
        pipeline = json.loads((orchestrator / "pipeline.json").read_text())
        self.link = Link(socket_path(os.getppid()))
        self.front = Front(Limits.from_dict(pipeline.get("limits", {})), PromptTokenizer(orchestrator / "tokenizer"),
                           unary=not self.decoupled, max_inflight=int(params.get("max_inflight", "256")),
                           find_orchestrator=self.link.current, alive=self.link.alive, cancel=self._cancel)
        self.link.front = self.front
        # add-lora on the served repository: the adapter names a request may give follow pipeline.json
        self.registered = (RegisteredAdapters(orchestrator / "pipeline.json", self.front.limits,
                                              pipeline["lora"].get("adapters")) if pipeline.get("lora") else None)
        self._stop = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="triffusion-front-watchdog", daemon=True)
        self.watchdog.start()
        heap.settle()  # start-up's objects out of later full collections (triffusion.heap)

    def execute(self, requests):
        for request in requests:
            received = time.monotonic()
            sink = Sink(request)
            try:
                raw = {n: v for n in self.input_names if (v := request_input(request, n)) is not None}
                if self.registered is not None:
                    self.front.limits = self.registered.limits()
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
            try:
                self.link.send(self.front.submission(inflight, params, ids, received))
            except ChannelClosed:
                self.front.fail(inflight, ComponentUnavailable("orchestrator", "is restarting; retry shortly"))
        return None

    def _cancel(self, request_id):
        self.link.send({"op": "cancel", "id": request_id})

    def _watch(self):
        while not self._stop.wait(0.1):
            try:
                self.front.sweep()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one failure
                log.exception("front watchdog failed")

    def finalize(self):
        self._stop.set()
        self.front.fail_all(ShuttingDown())
