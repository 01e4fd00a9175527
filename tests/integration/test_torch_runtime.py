"""The torch runtime served by the real server: components exported as torch folders, the orchestrator
running the UNet in process with per-request state as torch tensors (the device-resident engine path
a GPU host uses, here on the CPU). Images and UNet outputs match the ONNX repository's."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from triffusion.client import generate
from triffusion.export.repository import write_repository
from triffusion.server import TritonServer, free_port


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("torch") / "model_repository"
    subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--preset", "tiny", "--runtime", "torch",
                    "--sizes", "64,128", "--max-unet-rows", "8", "--no-profile", "--unet-variant", "tiny-lite",
                    "--cascade", "tiny-lite", "--gate", "clip:random", "--out", str(repo)], check=True)
    pipeline = json.loads((repo / "orchestrator/1/pipeline.json").read_text())
    write_repository(repo, pipeline, runtime="torch",
                     orchestrator={"unet_executor": "inprocess", "runtime": "torch", "device": "cpu",
                                   "cascade_threshold": 0.0})  # no gate score is below 0: the light path
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        server.wait_ready(180)
        yield server.urls["grpc"], repo


def test_torch_repository_declares_graph_buckets(torch_server):
    _, repo = torch_server
    config = (repo / "unet/config.pbtxt").read_text()
    assert 'key: "runtime" value { string_value: "torch" }' in config
    assert "2x8x8,4x8x8,6x8x8,8x8x8" in config and "8x16x16" in config


def test_unet_component_matches_the_onnx_one(server, torch_server):
    rng = np.random.default_rng(3)
    inputs = {"sample": rng.standard_normal((3, 4, 8, 16), dtype=np.float32),
              "timestep": np.array([999.0, 500.0, 1.0], np.float32),
              "encoder_hidden_states": rng.standard_normal((3, 77, 32), dtype=np.float32)}

    def call(url):
        client = grpcclient.InferenceServerClient(url)
        tensors = []
        for name, value in inputs.items():
            tensor = grpcclient.InferInput(name, list(value.shape), "FP32")
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return client.infer("unet", tensors).as_numpy("noise_pred")

    assert np.abs(call(torch_server[0]) - call(server.grpc)).max() < 1e-4


def test_device_resident_engine_gives_the_onnx_images(server, torch_server):
    kwargs = dict(height=128, width=64, steps=6, seed=21)
    torch_image = generate("a quiet harbour", url=torch_server[0], **kwargs)
    onnx_image = generate("a quiet harbour", url=server.grpc, **kwargs)
    difference = np.abs(torch_image.array.astype(int) - onnx_image.array.astype(int))
    assert difference.max() <= 2, difference.max()
    assert torch_image.metadata["steps_done"] == 6


def test_cascade_keeps_the_light_answer_when_the_gate_passes_it(torch_server):
    url, repo = torch_server
    kwargs = dict(height=64, width=64, steps=4, seed=5)
    cascade = generate("a quiet harbour", url=url, unet="cascade", **kwargs)
    light = generate("a quiet harbour", url=url, unet="tiny-lite", **kwargs)
    assert cascade.metadata["unet"] == "unet_tiny_lite" and cascade.metadata["cascade"]["escalated"] is False
    assert cascade.array.tobytes() == light.array.tobytes()
    # This repository gates on CLIP (--gate clip:random): the quality_gate model scored the light image
    # against the request's own prompt, as the same CLIP weights do in this process.
    from triffusion.orchestrator.gate import load_gate

    clip = load_gate(repo / "quality_gate/1/clip")
    expected = clip.score(cascade.array[None], ["a quiet harbour"])[0]
    assert abs(cascade.metadata["cascade"]["score"] - float(expected)) < 1e-5
    assert abs(float(clip.score(cascade.array[None], ["a bowl of ramen"])[0]) - float(expected)) > 1e-6


def test_clip_quality_gate_model_needs_the_prompts_and_keeps_serving(torch_server):
    client = grpcclient.InferenceServerClient(torch_server[0])
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    image = grpcclient.InferInput("image", list(images.shape), "UINT8")
    image.set_data_from_numpy(images)
    with pytest.raises(Exception, match="quality_gate: prompt: the CLIP gate scores each image against its prompt; "
                                        "expected 2 prompts, got none"):
        client.infer("quality_gate", [image])
    prompt = grpcclient.InferInput("prompt", [2], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a red fox", b"a bowl of ramen"], dtype=np.object_))
    scores = client.infer("quality_gate", [image, prompt]).as_numpy("score")
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
