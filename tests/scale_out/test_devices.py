"""The served orchestrator with an engine per device (`devices: 2`, CPU stand-ins): every request is answered,
both devices take work, and health reports each device."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from perf.overload import run_load
from triffusion import contract
from triffusion.export.repository import write_repository
from triffusion.server import TritonServer, free_port
from triffusion.supervisor import AdminClient

pytestmark = pytest.mark.server


def test_two_device_orchestrator_answers_everything_and_places_on_both(tiny_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo, symlinks=True)
    pipeline = json.loads((repo / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    write_repository(repo, pipeline, orchestrator={"devices": 2, "max_active": 4})
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      log_file=tmp_path / "server.log") as server:
        server.wait_ready(300)
        requests = [{"prompt": "a red bicycle", "steps": 6, "seed": i, "height": 64 if i % 2 else 128,
                     "width": 64 if i % 2 else 128, **({"unet": "cascade"} if i % 3 == 0 else {})} for i in range(10)]
        result = asyncio.run(run_load(server.urls["grpc"], requests, [0.05 * i for i in range(10)],
                                      model=contract.TEXT_TO_IMAGE, timeout_s=90))
        admin = AdminClient(server.internal_http, server.urls["grpc"], server.admin_key)
        health = admin.control({"op": "health"})
        profile = admin.control({"op": "profile"})
    assert [r.outcome for r in result.records] == ["ok"] * 10, [r.message for r in result.records]
    assert health["ok"] and len(health["devices"]) == 2
    assert sum(health["placed"]) == 10 and min(health["placed"]) >= 1
    # What perf.slo_proof feeds the simulator, per device: the learned overlap of side stages and UNet calls.
    # On this CPU host the side thread's calls and the UNet's share the cores, so some of every side stage
    # shows in the iteration: a device that did both kinds of work learned a share above 0.
    shares = [device["side_share"] for device in profile["devices"]]
    assert all(0.0 <= share <= 1.0 for share in shares) and max(shares) > 0.0, profile
