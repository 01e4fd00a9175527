"""One real tritonserver (from the nvidia-pytriton wheel) per session, serving the tiny preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from triffusion.export.repository import write_repository
from triffusion.server import TritonServer, free_port


MAX_ACTIVE = 4
CASCADE_THRESHOLD = 1.01


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "model_repository"
    # What `make serve` exports: the registry's tiny family (heavy and light UNets, the cascade, the SLO
    # classes), plus the benchmark baselines.
    registry = Path(__file__).resolve().parents[1] / "registry.example.yaml"
    subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--registry", str(registry), "--family", "tiny",
                    "--out", str(out), "--baselines"], check=True)
    return out


@pytest.fixture(scope="session")
def server(tiny_repository):
    import json

    pipeline = json.loads((tiny_repository / "orchestrator" / "1" / "pipeline.json").read_text())
    # Few slots make slot release observable: a request beyond them only runs once one is free.
    # An entropy threshold above any possible change (64 bins: at most 6 bits) makes step_mode=auto stop
    # exactly at its minimum fraction, so the plumbing is testable; the policy has its own unit tests.
    # A cascade threshold above any gate score escalates every cascade request (the heavy path); the torch
    # runtime's server in tests/integration uses 0 (the light path).
    write_repository(tiny_repository, pipeline, orchestrator={"max_active": MAX_ACTIVE, "max_queue": 32,
                                                              "entropy_threshold": 8.0, "entropy_min_fraction": 0.4,
                                                              "cascade_threshold": CASCADE_THRESHOLD})
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    with TritonServer(tiny_repository, **ports) as srv:
        srv.wait_ready(timeout_s=180)
        urls = Urls(http=f"localhost:{ports['http_port']}", grpc=f"localhost:{ports['grpc_port']}",
                    metrics=f"http://localhost:{ports['metrics_port']}/metrics")
        urls.triton = srv  # the TritonServer (its process and supervisor): tests/deploy reloads a stub
        yield urls


class Urls:
    def __init__(self, http: str, grpc: str, metrics: str):
        self.http, self.grpc, self.metrics = http, grpc, metrics

    def url(self, protocol: str) -> str:
        return self.http if protocol == "http" else self.grpc


CRASH_MARKS = ("Signal (", "terminate called", "what():", "exited with code", "Stub process")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's server logs (under its tmp_path) are gone when CI reports it: the report keeps
    what a crash left in them (a signal, an abort's reason, a dead stub)."""
    outcome = yield
    report = outcome.get_result()
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.when != "call" or not report.failed or tmp is None:
        return
    for log in sorted(Path(tmp).rglob("*.log"))[:8]:
        lines = log.read_text(errors="replace").splitlines()
        marked = [i for i, line in enumerate(lines) if any(mark in line for mark in CRASH_MARKS)]
        if marked:
            first = max(0, marked[0] - 3)
            report.sections.append((f"crash lines in {log.name}", "\n".join(lines[first:first + 40])))
