"""Self-healing around the bundled tritonserver, which never restarts a python stub that died and keeps
its model READY (Triton 2.51; python_backend marks such a model not ready from r25.12/r26.01, #423).

The supervisor watches from outside the server:
- every stub the server started (from the process table): one that is gone makes its model reload
  (unload, so readiness is false meanwhile, then load) through Triton's model control API, on
  localhost, with the admin key;
- the orchestrator's engine (its `health` control): a loop that gave up makes the orchestrator reload;
- the tritonserver process: if it exits unexpectedly it is restarted, with bounded retries and backoff.
Every action is logged and counted; the counts reach /metrics through the orchestrator.

The policy (what to do, when to give up) is plain Python; `Supervisor` applies it to a TritonServer."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

from triffusion import contract, procs

log = logging.getLogger("triffusion.supervisor")

ADMIN_HEADER = "triffusion-admin-key"  # the restricted-API header (gRPC: triton-grpc-protocol-<this>)


@dataclass
class RestartPolicy:
    """Restart a server that died, at most `limit` times within `window_s`, waiting longer each time."""

    limit: int = 5
    window_s: float = 600.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    restarts: list[float] = field(default_factory=list)

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next restart, or None to give up."""
        self.restarts = [t for t in self.restarts if now - t < self.window_s]
        if len(self.restarts) >= self.limit:
            return None
        delay = min(self.first_backoff_s * 2 ** len(self.restarts), self.max_backoff_s)
        self.restarts.append(now)
        return delay


def missing_stubs(expected: dict[str, set[str]], running: dict[str, int]) -> list[str]:
    """Models with an instance that was running when the model was loaded and is not running now."""
    return sorted(model for model, instances in expected.items() if not instances <= set(running))


def group_by_model(running: dict[str, int]) -> dict[str, set[str]]:
    models: dict[str, set[str]] = {}
    for instance in running:
        models.setdefault(procs.model_of(instance), set()).add(instance)
    return models


class AdminClient:
    """Model control (restricted API) over localhost HTTP, and the orchestrator's control messages over
    gRPC streaming (it is decoupled)."""

    def __init__(self, http_url: str, grpc_url: str, key: str):
        self.http_url, self.grpc_url, self.key = http_url, grpc_url, key

    def _post(self, path: str, timeout_s: float) -> None:
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=b"{}", method="POST",
                                         headers={ADMIN_HEADER: self.key, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()

    def unload(self, model: str, timeout_s: float = 60.0) -> None:
        self._post(f"/v2/repository/models/{model}/unload", timeout_s)

    def load(self, model: str, timeout_s: float = 300.0) -> None:
        self._post(f"/v2/repository/models/{model}/load", timeout_s)

    def ready(self, model: str | None = None) -> bool:
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def control(self, message: dict, timeout_s: float = 5.0, attempts: int = 3) -> dict:
        """One control message to the orchestrator; its reply (the `status` JSON). Control messages are
        idempotent (health, profile, drain), so a stream that fails before the reply (the gRPC connection
        reset under load) is retried on a new connection, up to `attempts` times."""
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                return self._control_once(message, timeout_s)
            except _StreamBroken as exc:
                last = exc
                time.sleep(0.2 * (attempt + 1))  # back off before a new connection
        raise RuntimeError(f"control {message.get('op')}: {last}")

    def _control_once(self, message: dict, timeout_s: float) -> dict:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        replies: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            client.start_stream(callback=lambda result, error: replies.put((result, error)))
            tensor = grpcclient.InferInput("control", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([json.dumps({**message, "key": self.key}).encode()], dtype=object))
            try:
                client.async_stream_infer(contract.ORCHESTRATOR, [tensor],
                                          outputs=[grpcclient.InferRequestedOutput("status")])
            except InferenceServerException as exc:  # the stream failed already; its callback got why
                try:
                    _, error = replies.get_nowait()
                except queue.Empty:
                    error = exc
                raise _StreamBroken(str(error)) from None
            result, error = replies.get(timeout=timeout_s)
            if error is not None:
                if _stream_failure(error):
                    raise _StreamBroken(str(error))
                raise RuntimeError(str(error))
            return json.loads(result.as_numpy("status")[0])
        finally:
            try:
                client.stop_stream(cancel_requests=True)
            finally:
                client.close()


class _StreamBroken(Exception):
    """The control stream failed before the orchestrator answered (worth a retry on a new connection)."""


def _stream_failure(error) -> bool:
    status = str(getattr(error, "status", lambda: "")() or "")
    return status in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")


class Supervisor:
    """Watches one TritonServer (triffusion.server) from a thread; `counts` says what it did.

    Seeing and healing are apart: the watch loop reads the process table every interval_s and never waits on
    the server; a model whose stub died is healed (unloaded, then loaded) on a thread of its own. A load takes
    seconds (3-7 s for the tiny preset on 2 cores), and a stub that dies meanwhile is unloaded at once, so
    readiness turns false within about interval_s of any death, whatever else is healing."""

    def __init__(self, server, admin: AdminClient, *, interval_s: float = 0.2, health_every_s: float = 2.0,
                 policy: RestartPolicy | None = None):
        self.server, self.admin = server, admin
        self.interval_s, self.health_every_s = interval_s, health_every_s
        self.policy = policy or RestartPolicy()
        self.counts: Counter = Counter()  # ("reload", model) / ("restart", "tritonserver") -> times
        self.expected: dict[str, set[str]] = {}
        self.gave_up: str | None = None
        self._stop = threading.Event()
        self._health_failures = 0  # consecutive health checks the orchestrator did not answer
        self._healed_at = 0.0  # when the last reload or restart ended: a health check older than it says nothing
        self._healing: dict[str, threading.Thread] = {}  # model -> the thread reloading it
        self._generation = 0  # one more at each server restart: a reload of the process before says nothing
        self._threads: list[threading.Thread] = []
        self.lock = threading.Lock()  # guards the state above; held across no call to the server but a restart

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.expected = group_by_model(procs.stubs(self.server.process.pid))
        # Two loops: the process table every interval_s, and the orchestrator's health every health_every_s
        # on a thread of its own, so that a health call that waits (up to its timeout, on a stub that is
        # dying) never delays seeing a dead stub or server.
        self._threads = [threading.Thread(target=self._run, name="triffusion-supervisor", daemon=True),
                         threading.Thread(target=self._run_health, name="triffusion-supervisor-health", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        healing = list(self._healing.copy().values())  # not under the lock: a restart may hold it for minutes
        for thread in self._threads + healing:
            if thread is not threading.current_thread():
                thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.lock:
                    if self._stop.is_set():
                        return
                    self.tick()
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one failure
                log.exception("supervisor check failed")
            if self.gave_up:
                return

    def _run_health(self) -> None:
        while not self._stop.wait(self.health_every_s):
            try:
                if contract.ORCHESTRATOR in self.expected:
                    self._check_engine()
            except Exception:  # noqa: BLE001
                log.exception("supervisor health check failed")
            if self.gave_up:
                return

    # ---- one check (under the lock) ----------------------------------------------------------
    def tick(self) -> None:
        process = self.server.process
        if process.poll() is not None:
            self._restart(process.returncode)
            return
        for model in missing_stubs(self.expected, procs.stubs(process.pid)):
            self._start_reload(model, "its stub process died")

    def _check_engine(self, max_failures: int = 3) -> None:
        """One health call (outside the lock: it may wait up to its timeout); what it found acted on under the
        lock, unless a reload or restart ended meanwhile, one is under way, or a stub is dead (the process
        table's loop heals that)."""
        started = time.monotonic()
        try:
            health, failure = self.admin.control({"op": "health"}), None
        except Exception as exc:  # noqa: BLE001 - a stub death shows up in the process table instead
            health, failure = None, exc
        with self.lock:
            if self._stop.is_set():
                return
            if self._healed_at >= started or self._healing or self.server.process.poll() is not None or \
                    missing_stubs(self.expected, procs.stubs(self.server.process.pid)):
                self._health_failures = 0  # the check raced a death or a reload: it says nothing of the engine
                return
            if failure is not None:
                self._health_failures += 1
                log.warning("orchestrator health check failed (%d in a row): %s", self._health_failures, failure)
                if self._health_failures >= max_failures:
                    self._health_failures = 0
                    self._kill_and_reload(contract.ORCHESTRATOR,
                                          f"it did not answer {max_failures} health checks in a row")
                return
            self._health_failures = 0
            if health.get("broken"):
                self._kill_and_reload(contract.ORCHESTRATOR, f"its engine stopped ({health['broken']})")

    def _kill_and_reload(self, model: str, why: str) -> None:
        """A stub that is alive but cannot serve: kill it first (its unload could wait on a wedged thread);
        the fronts answer its requests, then it is reloaded like any dead stub."""
        import os
        import signal

        for pid in procs.stubs_of(self.server.process.pid, model).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._start_reload(model, why)

    def _start_reload(self, model: str, why: str) -> None:
        """Reload `model` on a thread of its own, unless one is reloading it already."""
        if model in self._healing:
            return
        log.error("reloading %s: %s", model, why)
        thread = threading.Thread(target=self.reload, args=(model, self._generation), daemon=True,
                                  name=f"triffusion-supervisor-reload-{model}")
        self._healing[model] = thread
        thread.start()

    # ---- healing (off the lock) --------------------------------------------------------------
    def reload(self, model: str, generation: int) -> None:
        """Unload (readiness turns false) and load again; Triton 2.51's load of a loaded model is a no-op
        and would leave a dead stub in place. Runs on its own thread: other models' deaths are seen and their
        unloads sent meanwhile (a model that is loading keeps the server not ready until its load ends)."""
        start = time.monotonic()
        try:
            self.admin.unload(model)
            self.admin.load(model)
            failure = None
        except (urllib.error.URLError, OSError) as exc:
            failure = exc
        with self.lock:
            del self._healing[model]
            if generation != self._generation:
                return  # the server was restarted meanwhile: the restart loaded every model afresh
            if failure is not None:
                log.error("reloading %s failed: %s", model, failure)
                return  # the model stays missing from the process table: the watch loop tries again
            self.counts[("reload", model)] += 1
            self.server.remember_shm()
            stubs = set(procs.stubs_of(self.server.process.pid, model))
            if stubs:  # none if the new stub died already: keep the names, so the watch loop sees it missing
                self.expected[model] = stubs
            self._healed_at = time.monotonic()
        log.warning("%s reloaded in %.1f s", model, time.monotonic() - start)
        self.report()

    def _restart(self, returncode: int) -> None:
        delay = self.policy.next_delay(time.monotonic())
        if delay is None:
            self.gave_up = (f"tritonserver exited with code {returncode}; {self.policy.limit} restarts within "
                            f"{self.policy.window_s:.0f} s, giving up")
            log.error(self.gave_up)
            return
        log.error("tritonserver exited with code %s; restarting in %.1f s", returncode, delay)
        if self._stop.wait(delay):
            return
        start = time.monotonic()
        self._generation += 1  # reloads under way were of the dead process
        self.server.restart()
        self.counts[("restart", "tritonserver")] += 1
        self.expected = group_by_model(procs.stubs(self.server.process.pid))
        self._healed_at = time.monotonic()
        log.warning("tritonserver restarted in %.1f s", time.monotonic() - start)
        self.report()

    def report(self) -> None:
        """Hand the counts to the orchestrator, which exports them on /metrics."""
        events = [{"action": action, "model": model, "count": n} for (action, model), n in sorted(self.counts.items())]
        try:
            self.admin.control({"op": "events", "events": events})
        except Exception as exc:  # noqa: BLE001
            log.warning("could not report supervisor counts to the orchestrator: %s", exc)

    def drain(self, grace_s: float) -> dict | None:
        """Stop admitting and wait (up to grace_s) for the requests in flight; the last health seen."""
        try:
            health = self.admin.control({"op": "drain"})
        except Exception as exc:  # noqa: BLE001
            log.warning("could not drain the orchestrator: %s", exc)
            return None
        deadline = time.monotonic() + grace_s
        while health.get("waiting", 0) + health.get("running", 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the orchestrator's health: it has no push channel to this process
            try:
                health = self.admin.control({"op": "health"})
            except Exception:  # noqa: BLE001
                return None
        return health
