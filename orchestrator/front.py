"""The fronts (`text_to_image`, `text_to_image_stream`): what clients call. Plain Python; the Triton
adapter supplies the I/O and the connection to the orchestrator (triffusion.channel).

A front validates and tokenizes a request (off the orchestrator's process, so a huge prompt stalls no
one), submits it to the orchestrator and owns the client's request until its one final answer:
- the orchestrator's answer, relayed (progress and previews too, on the streaming front);
- CANCELLED when the client went away or its own deadline (the request's timeout) passed: the
  orchestrator is told to stop the work and answers, or the front answers after `cancel_grace_s`;
- UNAVAILABLE when the connection to the orchestrator that holds the request broke (its process died):
  Triton 2.51 would never answer such a request, and never restarts the stub (the supervisor reloads it).
A front holds at most `max_inflight` requests and refuses more at once (UNAVAILABLE)."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import numpy as np

from triffusion import contract

from .errors import Cancelled, ComponentUnavailable, InvalidRequest, ServingError
from .params import GenerationParams, Limits, parse_params

log = logging.getLogger(__name__)


class FrontSink(Protocol):
    def progress(self, progress) -> None: ...
    def preview(self, image) -> None: ...
    def finish(self, image, metadata: bytes) -> None: ...
    def fail(self, error: ServingError) -> None: ...
    def is_cancelled(self) -> bool: ...


@dataclass(eq=False)
class Inflight:
    """One client request the front is holding."""

    id: str
    sink: FrontSink
    stream: bool
    deadline: float | None  # monotonic time the client stops waiting (its request timeout)
    orchestrator: int | None  # the connection (its generation) to the orchestrator the request went to
    done: bool = False
    giving_up: ServingError | None = None  # the front asked the orchestrator to stop it, for this reason
    gave_up_at: float = 0.0
    last_cancel_check: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Front:
    def __init__(self, limits: Limits, tokenizer, *, unary: bool, max_inflight: int = 256,
                 find_orchestrator: Callable[[], int | None] = lambda: None,
                 alive: Callable[[int], bool] = lambda link: True, cancel: Callable[[str], None] = lambda rid: None,
                 clock=time.monotonic, cancel_check_s: float = 0.5, cancel_grace_s: float = 10.0):
        self.limits, self.tokenizer, self.unary = limits, tokenizer, unary
        self.max_inflight = max_inflight
        self.find_orchestrator, self.alive, self.cancel = find_orchestrator, alive, cancel
        self.clock, self.cancel_check_s, self.cancel_grace_s = clock, cancel_check_s, cancel_grace_s
        self._inflight: dict[str, Inflight] = {}
        self._lock = threading.Lock()
        self._orchestrator: int | None = None
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}-{uuid.uuid4().hex[:8]}"
        self.abandoned = 0  # requests answered while their orchestrator call was still blocked

    # ---- intake ------------------------------------------------------------------------------
    def prepare(self, raw: dict) -> tuple[GenerationParams, np.ndarray]:
        """Validated parameters and the (2, 77) token ids, or InvalidRequest naming the field."""
        if self.unary:
            for name in contract.STREAM_ONLY:
                if raw.get(name):
                    raise InvalidRequest(name, f"needs a stream; call {contract.TEXT_TO_IMAGE_STREAM} over gRPC "
                                               f"streaming, or leave it out")
        params = parse_params(raw, self.limits, self.tokenizer.count)
        ids = self.tokenizer.input_ids(params.prompt, params.negative_prompt, cfg=True)
        return params, ids

    def accept(self, sink: FrontSink, stream: bool, timeout_s: float | None) -> Inflight:
        """Register a request; raises ServingError at once when the front is full or no orchestrator runs."""
        pid = self._live_orchestrator()
        if pid is None:
            raise ComponentUnavailable("orchestrator", "is restarting; retry shortly")
        with self._lock:
            if len(self._inflight) >= self.max_inflight:
                raise ServingError(f"too many requests in flight ({self.max_inflight}); retry later",
                                   code=ComponentUnavailable.code, reason="front_full")
            inflight = Inflight(id=f"{self._prefix}-{next(self._ids)}", sink=sink, stream=stream,
                                deadline=None if not timeout_s else self.clock() + timeout_s, orchestrator=pid)
            self._inflight[inflight.id] = inflight
            return inflight

    @staticmethod
    def submission(inflight: Inflight, params: GenerationParams, input_ids, received: float) -> dict:
        """What the orchestrator gets: validated parameters, token ids, the id that answers and cancellations
        refer to, and the monotonic time the front received the request (the SLO counts from it)."""
        return {"op": "submit", "id": inflight.id, "received": received, "params": asdict(params),
                "input_ids": input_ids}

    def lookup(self, request_id: str) -> Inflight | None:
        with self._lock:
            return self._inflight.get(request_id)

    # ---- answers -----------------------------------------------------------------------------
    def relay(self, inflight: Inflight, kind: str, value) -> None:
        """A progress or preview response on its way to a streaming client. Under the request's lock: once
        the final answer went out, Triton frees the response sender, and touching it again crashes it."""
        if not inflight.stream:
            return
        with inflight.lock:
            if inflight.done:
                return
            try:
                (inflight.sink.progress if kind == "progress" else inflight.sink.preview)(value)
                return
            except Exception:  # noqa: BLE001 - the client is gone: stop the work
                log.debug("relay to %s failed", inflight.id, exc_info=True)
        self._give_up(inflight, Cancelled("cancelled by the client"))

    def finish(self, inflight: Inflight, image, metadata: bytes) -> None:
        if inflight.giving_up is not None:  # finished before the cancellation landed: the client left
            self.fail(inflight, inflight.giving_up)
            return
        self._final(inflight, lambda: inflight.sink.finish(image, metadata))

    def fail(self, inflight: Inflight, error: ServingError) -> None:
        error = inflight.giving_up or error  # the reason the front stopped it, not the orchestrator's echo
        self._final(inflight, lambda: inflight.sink.fail(error))

    def _final(self, inflight: Inflight, send) -> bool:
        """Exactly one final answer per request, whoever gets there first. Sent under the request's lock, so
        that no progress, preview or cancellation check touches its sender after it (Triton frees it)."""
        with inflight.lock:
            if inflight.done:
                return False
            inflight.done = True
            try:
                send()
            except Exception:  # noqa: BLE001
                log.warning("final answer of %s could not be sent", inflight.id, exc_info=True)
        with self._lock:
            self._inflight.pop(inflight.id, None)
        return True

    # ---- watchdog ----------------------------------------------------------------------------
    def sweep(self) -> None:
        """Called every ~100 ms: fail what the orchestrator can no longer answer, cancel what the client
        no longer wants. `is_cancelled()` is an IPC round trip: checked at most every cancel_check_s."""
        now = self.clock()
        with self._lock:
            inflight = list(self._inflight.values())
        dead = {pid for pid in {i.orchestrator for i in inflight} if pid is not None and not self.alive(pid)}
        if dead:
            with self._lock:
                if self._orchestrator in dead:
                    self._orchestrator = None
        for item in inflight:
            if item.orchestrator in dead:
                if self._final(item, lambda i=item: i.sink.fail(ComponentUnavailable(
                        "orchestrator", "stopped while serving the request; retry it"))):
                    self.abandoned += 1
                continue
            if item.giving_up is not None:
                if now - item.gave_up_at >= self.cancel_grace_s:  # the orchestrator did not answer in time
                    self._final(item, lambda i=item: i.sink.fail(i.giving_up))
                continue
            if item.deadline is not None and now >= item.deadline:
                self._give_up(item, Cancelled("the request's timeout passed before it finished"))
                continue
            if now - item.last_cancel_check >= self.cancel_check_s:
                item.last_cancel_check = now
                with item.lock:  # never ask a sender Triton already freed (after the final answer)
                    if item.done:
                        continue
                    try:
                        cancelled = item.sink.is_cancelled()
                    except Exception:  # noqa: BLE001
                        cancelled = True
                if cancelled:
                    self._give_up(item, Cancelled("cancelled by the client"))

    def _give_up(self, item: Inflight, error: ServingError) -> None:
        """Stop the work: the orchestrator frees the slot at its next step boundary and answers; the forward
        thread then sends the client this error. (Sending it from here, while the forward thread still
        relays for the request, crashes the bundled python backend's stub under load.) Should the
        orchestrator not answer within `cancel_grace_s`, the sweep answers instead."""
        if item.giving_up is not None:
            return
        item.giving_up, item.gave_up_at = error, self.clock()
        try:
            self.cancel(item.id)
        except Exception:  # noqa: BLE001
            log.warning("could not cancel %s in the orchestrator", item.id, exc_info=True)

    def _live_orchestrator(self) -> int | None:
        with self._lock:
            pid = self._orchestrator
        if pid is not None and self.alive(pid):
            return pid
        pid = self.find_orchestrator()
        with self._lock:
            self._orchestrator = pid
        return pid

    def fail_all(self, error: ServingError) -> None:
        with self._lock:
            inflight = list(self._inflight.values())
        for item in inflight:
            self._final(item, lambda i=item: i.sink.fail(error))

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)


def dispatch(front: Front, message: dict) -> None:
    """One message from the orchestrator, to the request it answers (if the front still holds it)."""
    inflight = front.lookup(str(message.get("id")))
    if inflight is None:
        return  # answered already (cancelled, timed out, the orchestrator restarted)
    kind = message.get("kind")
    if kind in ("progress", "preview"):
        front.relay(inflight, kind, message["value"])
    elif kind == "finish":
        front.finish(inflight, message["image"], message["metadata"])
    elif kind == "fail":
        front.fail(inflight, ServingError.from_dict(message.get("error") or {}))
