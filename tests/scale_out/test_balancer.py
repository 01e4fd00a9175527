"""Two real `triffusion serve` replicas behind a real HAProxy (triffusion.balancer): requests spread over both;
killing one mid-run fails only the requests it held, at once, while the survivor takes the new ones; the
balancer takes the replica back once it is ready again."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time

import pytest

from perf.overload import run_load
from triffusion import contract
from triffusion.balancer import Balancer, BalancerError, Replica, haproxy_binary, haproxy_config, Backend
from triffusion.export.repository import write_repository
from triffusion.server import free_port

try:
    haproxy_binary()
    MISSING = None
except BalancerError as exc:
    MISSING = str(exc)

pytestmark = [pytest.mark.server, pytest.mark.skipif(MISSING is not None, reason=f"{MISSING} (.ci/run installs it)")]
TIMEOUT_S = 90.0  # a request unanswered this long counts as hung


def requests(n, steps=10, size=64, seed=0):
    return [{"prompt": "a red bicycle", "height": size, "width": size, "steps": steps, "seed": seed + i}
            for i in range(n)]


def load(url, reqs, arrivals=None):
    return asyncio.run(run_load(url, reqs, arrivals or [0.0] * len(reqs), model=contract.TEXT_TO_IMAGE,
                                timeout_s=TIMEOUT_S))


@pytest.fixture(scope="module")
def cluster(tiny_repository, tmp_path_factory):
    work = tmp_path_factory.mktemp("scale_out")
    repo = work / "repo"
    shutil.copytree(tiny_repository, repo, symlinks=True)
    pipeline = json.loads((repo / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    write_repository(repo, pipeline, orchestrator={"max_active": 4, "max_queue": 32})
    replicas = [Replica(f"r{i}", repo, free_port(), free_port(), free_port(), log_path=work / f"r{i}.log")
                for i in range(2)]
    balancer = Balancer([r.backend for r in replicas], free_port(), free_port(), workdir=work / "balancer")
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready(300)
        balancer.start()
        for replica in replicas:
            balancer.wait_status(replica.name, "UP", 10)
        yield replicas, balancer
    finally:
        balancer.stop()
        for replica in replicas:
            replica.stop()


def test_generated_config_is_accepted_by_haproxy(tmp_path):
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_config([Backend("r0", 8000, 8001), Backend("r1", 8010, 8011)], http_port=9000,
                                   grpc_port=9001))
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = path.read_text()
    assert text.count("balance leastconn") == 2 and text.count("option httpchk GET /v2/health/ready") == 2
    assert "server r1 127.0.0.1:8011 proto h2 check port 8010 check-proto h1" in text


def test_the_example_config_is_what_the_generator_writes():
    from pathlib import Path

    from triffusion.balancer import _ports

    example = Path(__file__).resolve().parents[2] / "deploy" / "balancer" / "haproxy.cfg"
    assert example.read_text() == haproxy_config(_ports("8000:8001,8010:8011"), http_port=9000, grpc_port=9001,
                                                 stats_socket="/run/haproxy-triffusion.sock")


def test_requests_spread_over_both_replicas_by_grpc_and_http(cluster):
    replicas, balancer = cluster
    before = balancer.servers()
    result = load(balancer.urls["grpc"], requests(8))
    assert [r.outcome for r in result.records] == ["ok"] * 8
    after = balancer.servers()
    assert all(after[r.name]["stot"] > before[r.name]["stot"] for r in replicas), (before, after)
    from triffusion.client import generate

    image = generate("a red bicycle", steps=2, seed=1, url=balancer.urls["http"], protocol="http").image
    assert image.size == (64, 64)


def test_killed_replica_fails_only_its_inflight_requests_fast_and_is_readmitted_when_ready(cluster):
    replicas, balancer = cluster
    victim, survivor = replicas[1], replicas[0]
    n = 12
    holder = {}

    def run():
        holder["result"] = load(balancer.urls["grpc"], requests(n, steps=60, size=128))
        holder["ended"] = time.monotonic()

    runner = threading.Thread(target=run)
    runner.start()
    # 1. Every request is in flight (the balancer holds its stream) before the kill.
    deadline = time.monotonic() + 30
    while sum(s["scur"] for s in balancer.servers().values()) < n:
        assert time.monotonic() < deadline, balancer.servers()
        time.sleep(0.02)  # the balancer's counts are read by polling its stats socket
    held = balancer.servers()[victim.name]["scur"]
    assert held >= 1
    killed_at = time.monotonic()
    victim.kill()
    runner.join(TIMEOUT_S + 30)
    assert not runner.is_alive()
    result = holder["result"]
    # 2. No request hung; the failures are the victim's in-flight ones, and they failed fast.
    outcomes = [r.outcome for r in result.records]
    hung = [r for r in result.records if (r.message or "").startswith("timeout")]
    failed = [r for r in result.records if r.outcome in ("error", "rejected")]
    assert not hung
    assert 1 <= len(failed) <= held, (held, [(r.outcome, r.message) for r in failed])
    assert outcomes.count("ok") == n - len(failed)
    started = holder["ended"] - result.duration_s  # the run's clock (asyncio's loop time is monotonic)
    assert all(started + r.finished_s - killed_at < 5.0 for r in failed), [r.finished_s for r in failed]
    # 3. New requests go to the survivor while the victim is down.
    balancer.wait_status(victim.name, "DOWN", 10)
    before = balancer.servers()
    after_kill = load(balancer.urls["grpc"], requests(4, seed=100))
    assert [r.outcome for r in after_kill.records] == ["ok"] * 4
    after = balancer.servers()
    # All 4 went to the survivor, none to the victim. stot counts sessions, and CI once counted 5 on the survivor
    # for these 4 requests (all 4 answered), so the survivor's count is held to at least 4.
    assert after[victim.name]["stot"] == before[victim.name]["stot"]
    assert after[survivor.name]["stot"] - before[survivor.name]["stot"] >= 4
    # 4. Started again, it is taken back once ready, and gets work.
    victim.start()
    victim.wait_ready(300)
    readmitted_s = balancer.wait_status(victim.name, "UP", 10)
    assert readmitted_s < 10
    before = balancer.servers()
    again = load(balancer.urls["grpc"], requests(8, seed=200))
    assert [r.outcome for r in again.records] == ["ok"] * 8
    assert balancer.servers()[victim.name]["stot"] > before[victim.name]["stot"]
