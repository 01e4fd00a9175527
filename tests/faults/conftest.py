"""A supervised tritonserver whose components can be made to fail on demand (faulty_model.py), for the
fault suite. One per module: faults leave restarts behind that other tests should not inherit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from triffusion import contract, procs
from triffusion.export.repository import write_repository
from triffusion.server import TritonServer, free_port

WRAPPED = (contract.TEXT_ENCODER, contract.UNET, contract.VAE_DECODER, contract.QUALITY_GATE)
COMPONENT_TIMEOUT_S = 3


class FaultServer:
    def __init__(self, server: TritonServer, repo: Path):
        self.server, self.repo = server, repo
        self.grpc, self.http, self.metrics = server.urls["grpc"], server.urls["http"], server.urls["metrics"]
        self.models = {procs.model_of(name) for name in procs.stubs(self.pid)}  # every model runs a stub

    def url(self, protocol: str) -> str:
        return self.http if protocol == "http" else self.grpc

    def inject(self, model: str, mode: str, times: int = 1) -> None:
        faults = json.loads((self.repo / "faults.json").read_text() or "{}")
        faults[model] = {"mode": mode, "times": times}
        (self.repo / "faults.json").write_text(json.dumps(faults))

    def clear(self) -> None:
        (self.repo / "faults.json").write_text("{}")

    @property
    def pid(self) -> int:
        return self.server.process.pid


def lean_repository(source: Path, dest: Path) -> Path:
    """The tiny repository without the baselines (benchmark models, each a diffusers pipeline in memory:
    without them the server starts, and restarts, faster)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(contract.BASELINE_SEQUENTIAL,
                                                                  contract.BASELINE_BATCHING))
    pipeline = json.loads((dest / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    pipeline.pop("baselines", None)
    write_repository(dest, pipeline, orchestrator={"max_active": 4, "max_queue": 32, "cascade_threshold": 0.0,
                                                   "component_timeout_s": COMPONENT_TIMEOUT_S})
    return dest


def fault_repository(source: Path, dest: Path) -> Path:
    lean_repository(source, dest)
    here = Path(__file__).with_name("faulty_model.py")
    for model in WRAPPED:
        version = dest / model / "1"
        (version / "model.py").rename(version / "real_model.py")
        shutil.copyfile(here, version / "model.py")
    (dest / "faults.json").write_text("{}")
    return dest


@pytest.fixture(scope="module")
def fault_server(tiny_repository, tmp_path_factory):
    repo = fault_repository(tiny_repository, tmp_path_factory.mktemp("faults") / "repo")
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_file=repo.parent / "server.log")
    with server:
        server.wait_ready(timeout_s=180)
        yield FaultServer(server, repo)


@pytest.fixture
def faults(fault_server):
    """The module's server with no fault pending, healthy before the test starts: a normal request succeeds,
    and it is ready with every model's stub running (no reload from the last test still under way)."""
    from .harness import wait_recovered, wait_whole

    fault_server.clear()
    wait_recovered(fault_server)
    wait_whole(fault_server, fault_server.models)
    yield fault_server
    fault_server.clear()
