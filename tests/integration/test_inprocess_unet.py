"""The orchestrator with the UNet in its own process gives the same images as over BLS."""

import json
import shutil

import pytest

from triffusion.client import generate
from triffusion.export.repository import write_repository
from triffusion.server import TritonServer, free_port


@pytest.fixture(scope="module")
def inprocess_server(tiny_repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("inprocess") / "model_repository"
    shutil.copytree(tiny_repository, repo)
    pipeline = json.loads((repo / "orchestrator/1/pipeline.json").read_text())
    write_repository(repo, pipeline, orchestrator={"unet_executor": "inprocess"})
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        server.wait_ready(180)
        yield server.urls["grpc"]


def test_inprocess_unet_images_equal_bls_images(server, inprocess_server):
    kwargs = dict(height=128, width=64, steps=6, seed=21)
    over_bls = generate("a quiet harbour", url=server.grpc, **kwargs)
    in_process = generate("a quiet harbour", url=inprocess_server, **kwargs)
    assert in_process.array.tobytes() == over_bls.array.tobytes()
