"""`triffusion serve` as users run it (a subprocess): tritonserver SIGKILLed under it is restarted and
serves again within 30 s, in-flight requests get an answer; SIGTERM drains (new requests UNAVAILABLE,
those in flight finish) and leaves no process or shared memory behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triffusion import procs
from triffusion.server import free_port

from .harness import Burst, assert_answered_once, each_path, send, wait_recovered

pytestmark = pytest.mark.server


class Serve:
    """A `triffusion serve` subprocess and the URLs the harness needs."""

    def __init__(self, repo: Path, log: Path):
        ports = {name: free_port() for name in ("http", "grpc", "metrics")}
        self.http, self.grpc = f"localhost:{ports['http']}", f"localhost:{ports['grpc']}"
        self.metrics = f"http://localhost:{ports['metrics']}/metrics"
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "triffusion.cli", "serve", "--repo", str(repo), "--http-port", str(ports["http"]),
             "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]), "--grace", "30"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("ready in"), f"serve did not start: {line!r}"

    def tritonserver(self) -> int:
        return int(subprocess.run(["pgrep", "-P", str(self.process.pid), "-f", "tritonserver"],
                                  capture_output=True, text=True).stdout.split()[0])

    @property
    def pid(self) -> int:
        return self.tritonserver()

    def close(self):
        if self.process.poll() is None:  # a clean stop (drain, then tritonserver and its stubs go)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def metric(server, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(server.metrics, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture
def serve(tiny_repository, tmp_path):
    from .conftest import lean_repository

    server = Serve(lean_repository(tiny_repository, tmp_path / "repo"), tmp_path / "serve.log")
    yield server
    server.close()


def test_sigkilled_tritonserver_is_restarted_and_serves_again(serve):
    first = serve.tritonserver()
    burst = Burst(serve, each_path(2, steps=60, height=128, width=128))
    time.sleep(0.5)  # the requests are in flight
    os.kill(first, signal.SIGKILL)
    killed_at = time.monotonic()
    outcomes = burst.wait()
    assert_answered_once(outcomes)
    # A process that dies cannot answer for itself: gRPC clients see their connection drop, HTTP clients
    # get UNAVAILABLE from the edge, which outlives tritonserver.
    assert all(o.ok or o.code == "UNAVAILABLE" or o.connection_lost for o in outcomes), \
        [o.error for o in outcomes]
    recovered_s = wait_recovered(serve, timeout_s=30.0)
    assert serve.tritonserver() != first
    assert time.monotonic() - killed_at < 30 + 5
    # The supervisor hands its counts to the new orchestrator right after the restart returns, which may be
    # after the first request already succeeded: the count must arrive, within a bound.
    name = 'triffusion_supervisor_actions{action="restart",model="tritonserver"}'
    deadline = time.monotonic() + 10
    while metric(serve, name) != 1.0 and time.monotonic() < deadline:
        time.sleep(0.1)  # the count arrives over the admin channel; /metrics is all a client can read
    assert metric(serve, name) == 1.0
    assert recovered_s < 30


def test_sigterm_drains_then_exits_cleanly(serve):
    triton = serve.tritonserver()
    regions = procs.shm_regions(triton)
    assert regions
    seen = []
    from triffusion.client import start_stream_generation

    running = [start_stream_generation("a lighthouse", url=serve.grpc, steps=80, height=256, width=256, seed=i,
                                       on_progress=lambda step, steps: seen.append(step)) for i in range(2)]
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first progress arrives: the requests are in flight
    serve.process.send_signal(signal.SIGTERM)
    refused = None
    for _ in range(50):  # once draining, new requests get UNAVAILABLE at once
        refused = send(serve, "grpc_unary", steps=2)
        if not refused.ok:
            break
    assert refused.code == "UNAVAILABLE" and "shutting down" in refused.error, refused
    results = [handle.result(timeout=60) for handle in running]  # the ones in flight finish
    assert all(r.metadata["steps_done"] == 80 for r in results)
    assert serve.process.wait(60) == 0
    assert "stopping: new requests get UNAVAILABLE" in serve.process.stdout.read()
    with pytest.raises(ProcessLookupError):
        os.kill(triton, 0)
    assert not [r for r in regions if Path("/dev/shm", r).exists()], "shared memory left behind"
    assert not re.search(r"SIGKILL|did not exit", Path(serve.log.name).read_text())
