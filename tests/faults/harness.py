"""Clients that count answers: every request the fault suite sends records how many final answers it got
(exactly one expected), its outcome, and when; a readiness monitor records what the server claimed."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from triffusion import contract, procs
from triffusion.client.api import error_message, infer_inputs

PATHS = ("grpc_stream", "grpc_unary", "http")
HANG_S = 90.0  # an answer later than this is a hang
CONNECTION_LOST = ("Socket closed", "Stream removed", "Connection reset by peer")


@dataclass
class Outcome:
    path: str
    finals: int = 0
    ok: bool = False
    error: str | None = None
    elapsed_s: float | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def code(self) -> str | None:
        return None if self.error is None else self.error.partition(":")[0].strip()

    @property
    def connection_lost(self) -> bool:
        """The process holding the request died: gRPC reports the dropped connection in one of these words,
        depending on whether the socket was closed or reset when the client read it."""
        return self.error is not None and any(m in self.error for m in CONNECTION_LOST)


def send(server, path: str, **fields) -> Outcome:
    """One request; blocks until its final answer (or HANG_S), counting every final answer."""
    outcome, start = Outcome(path), time.monotonic()
    fields = {"prompt": "a lighthouse", **fields}
    if path == "grpc_stream":
        answers: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(server.grpc)
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(contract.TEXT_TO_IMAGE_STREAM, infer_inputs(grpcclient, {**fields, "stream": True}),
                                  request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        deadline = start + HANG_S
        try:
            while time.monotonic() < deadline:
                try:
                    result, error = answers.get(timeout=max(deadline - time.monotonic(), 0.01))
                except queue.Empty:
                    break
                if error is not None:
                    outcome.finals += 1
                    outcome.error = error_message(error)
                    break
                final = result.get_response().parameters.get("triton_final_response")
                if result.as_numpy("image") is not None:
                    outcome.ok = True
                    outcome.metadata = json.loads(result.as_numpy("metadata")[0])
                if final is not None and final.bool_param:
                    outcome.finals += 1
                    break
            # Anything else arriving for this request now would be a second final answer.
            try:
                result, error = answers.get(timeout=0.2)
                outcome.finals += 1
            except queue.Empty:
                pass
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
    else:
        module = grpcclient if path == "grpc_unary" else httpclient
        client = (grpcclient.InferenceServerClient(server.grpc) if path == "grpc_unary" else
                  httpclient.InferenceServerClient(server.http, network_timeout=HANG_S, connection_timeout=HANG_S))
        try:
            kwargs = {"client_timeout": HANG_S} if path == "grpc_unary" else {}
            result = client.infer(contract.TEXT_TO_IMAGE, infer_inputs(module, fields), **kwargs)
            outcome.ok, outcome.finals = True, 1
            outcome.metadata = json.loads(result.as_numpy("metadata")[0])
        except Exception as exc:  # noqa: BLE001 - an error answer is an answer; the test reads it
            outcome.finals, outcome.error = 1, error_message(exc)
            if "Deadline" in outcome.error or "timed out" in outcome.error.lower():
                outcome.finals = 0  # the client gave up: no answer came
        finally:
            client.close()
    outcome.elapsed_s = time.monotonic() - start
    return outcome


class Burst:
    """Requests over every path, in flight together, each on its own thread."""

    def __init__(self, server, requests: list[tuple[str, dict]]):
        self.outcomes: list[Outcome | None] = [None] * len(requests)
        self.threads = [threading.Thread(target=self._run, args=(i, server, path, fields), daemon=True)
                        for i, (path, fields) in enumerate(requests)]
        for thread in self.threads:
            thread.start()

    def _run(self, i, server, path, fields):
        self.outcomes[i] = send(server, path, **fields)

    def wait_first(self, timeout_s: float = HANG_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(self.outcomes) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the client threads' results

    def wait(self) -> list[Outcome]:
        for thread in self.threads:
            thread.join(HANG_S + 30)
        assert all(o is not None for o in self.outcomes), "a client thread never returned"
        return self.outcomes


def each_path(n: int = 2, **fields) -> list[tuple[str, dict]]:
    return [(path, {**fields, "seed": i}) for i in range(n) for path in PATHS]


def wait_recovered(server, timeout_s: float = 30.0) -> float:
    """Seconds until a normal request succeeds again; fails the test after timeout_s."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout_s:
        last = send(server, "grpc_unary", steps=2)
        if last.ok:
            return time.monotonic() - start
        time.sleep(0.2)  # the server is restarting a model; there is nothing to wait on but time
    raise AssertionError(f"no normal request succeeded within {timeout_s} s; last: {last}")


def models_running(server) -> set[str]:
    """The models that have a stub process running now."""
    return {procs.model_of(name) for name in procs.stubs(server.pid)}


def ready(server) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.http}/v2/health/ready", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def wait_whole(server, models: set[str], timeout_s: float = 60.0) -> None:
    """Until the server claims ready and every one of `models` runs a stub: a reload the last test started
    (a dead gate fails no request, so a normal request succeeds before its reload ends) is over."""
    deadline = time.monotonic() + timeout_s
    while not (ready(server) and models <= models_running(server)):
        assert time.monotonic() < deadline, f"not whole within {timeout_s} s: running {models_running(server)}"
        time.sleep(0.1)  # the supervisor reloads on threads of its own; readiness is polled from outside


class ReadinessMonitor:
    """Samples /v2/health/ready and whether every stub that ran at the start still runs."""

    def __init__(self, server, period_s: float = 0.05):
        self.server, self.period_s = server, period_s
        self.expected = models_running(server)
        self.samples: list[tuple[float, bool, bool]] = []  # (time, ready, all models' stubs running)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.period_s):
            # Readiness first: a claim of ready followed by a missing stub is a claim it made while dead.
            claimed, now = ready(self.server), time.monotonic()
            self.samples.append((now, claimed, self.expected <= models_running(self.server)))

    def stop(self):
        self._stop.set()
        self._thread.join(5)

    def untruthful_after(self, since: float, grace_s: float = 1.0) -> list[float]:
        """Times it claimed ready while a model had no running stub, later than grace_s after `since`."""
        return [t for t, ready, whole in self.samples if ready and not whole and t > since + grace_s]


def assert_answered_once(outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        assert outcome.finals == 1, f"{outcome.path}: {outcome.finals} final answers ({outcome})"
        assert outcome.elapsed_s < HANG_S, f"{outcome.path} hung"
        if outcome.error:  # no traceback, path or module name reaches a client
            assert not re.search(r"Traceback|(/[\w.-]+){2,}|\.py\b|triffusion\.", outcome.error), outcome.error
