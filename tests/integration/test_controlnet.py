"""ControlNet through the real server: the registry's tiny-control family (tiny preset + tiny ControlNet, seeded
random weights) exported and served by a tritonserver of its own. Parity with diffusers'
StableDiffusionControlNetPipeline for the same seed, a control and a plain request batched into one UNet call
each matching its solo run, and bad control input refused by name without touching the batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perf.addons_controlnet import (CONTROLNET, FAMILY, TOLERANCE_MAX, TOLERANCE_MEAN, control_image, diff,
                                    diffusers_folder, reference_image)
from triffusion import contract
from triffusion.client import GenerationError, generate, start_stream_generation
from triffusion.export.repository import write_repository
from triffusion.server import TritonServer, free_port

ROOT = Path(__file__).resolve().parents[2]
EDGES = control_image(64, 64, seed=3)


@pytest.fixture(scope="module")
def control_server(tmp_path_factory):
    out = tmp_path_factory.mktemp("control") / "model_repository"
    subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--registry", str(ROOT / "registry.example.yaml"),
                    "--family", FAMILY, "--out", str(out), "--no-profile"], check=True)
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    with TritonServer(out, **ports) as srv:
        srv.wait_ready(timeout_s=180)
        yield {"repo": out, "grpc": f"localhost:{ports['grpc_port']}", "http": f"localhost:{ports['http_port']}",
               "metrics": f"http://localhost:{ports['metrics_port']}/metrics"}


def metric(url: str, prefix: str) -> float:
    """The sum of the samples whose line starts with `prefix` (0 when none)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


CONTROL = {"seed": 11, "steps": 8, "controlnet": CONTROLNET, "controlnet_scale": 0.8, "control_image": EDGES}


def test_control_request_matches_diffusers_controlnet_pipeline(control_server):
    served = generate("a lighthouse on a cliff", url=control_server["grpc"], **CONTROL)
    folder = diffusers_folder(control_server["repo"])
    expected = reference_image(folder, "a lighthouse on a cliff", 11, 8, controlnet="controlnet_canny", image=EDGES,
                               scale=0.8)
    uncontrolled = reference_image(folder, "a lighthouse on a cliff", 11, 8)
    worst, mean = diff(served.array, expected)
    print(f"served vs diffusers ControlNet pipeline: max {worst}, mean {mean:.4f} (uint8 levels)")
    assert worst <= TOLERANCE_MAX and mean <= TOLERANCE_MEAN
    assert diff(expected, uncontrolled)[0] > 8  # the ControlNet changes the image: parity is not vacuous
    assert served.metadata["controlnet"] == {"name": "canny", "model": "controlnet_canny", "scale": 0.8}
    plain = generate("a lighthouse on a cliff", seed=11, steps=8, url=control_server["grpc"])
    assert plain.metadata["controlnet"] is None
    assert diff(plain.array, uncontrolled)[0] <= TOLERANCE_MAX


def test_control_and_plain_requests_share_the_unet_call_and_match_their_solo_runs(control_server):
    url, metrics = control_server["grpc"], control_server["metrics"]
    control = dict(CONTROL, steps=10)
    plain = {"seed": 5, "steps": 30}
    solo_control = generate("a lighthouse on a cliff", url=url, **control)
    solo_plain = generate("a red bicycle", url=url, **plain)
    shared_before = metric(metrics, 'triffusion_unet_call_seconds_count{rows="4"}')
    controlled_before = metric(metrics, 'nv_inference_request_success{model="unet_control"')
    # Sent together: whichever reaches the engine second joins the other at a step boundary, long before the
    # plain request's 30 steps end (sending the control request once the plain one reported a step raced it:
    # on a loaded machine the plain request could finish first).
    start = threading.Barrier(2)

    def send(prompt, fields):
        start.wait()
        return generate(prompt, url=url, **fields)

    with ThreadPoolExecutor(2) as pool:
        control_future = pool.submit(send, "a lighthouse on a cliff", control)
        plain_future = pool.submit(send, "a red bicycle", plain)
        together_control, together_plain = control_future.result(timeout=120), plain_future.result(timeout=120)
    assert not together_plain.metadata["controlnet"] and together_control.metadata["controlnet"]["name"] == "canny"
    # Both rows of each CFG request in one call (4 rows) on the controlled UNet, zeros for the plain rows.
    assert metric(metrics, 'triffusion_unet_call_seconds_count{rows="4"}') > shared_before
    assert metric(metrics, 'nv_inference_request_success{model="unet_control"') > controlled_before
    for together, solo in ((together_control, solo_control), (together_plain, solo_plain)):
        worst, mean = diff(together.array, solo.array)
        assert worst <= TOLERANCE_MAX and mean <= TOLERANCE_MEAN
    assert metric(metrics, 'triffusion_stage_seconds_count{stage="controlnet"}') > 0


BAD = [
    ({"controlnet": "depth", "control_image": EDGES}, "controlnet: 'depth' is not served; allowed: canny"),
    ({"controlnet": "canny", "control_image": EDGES[:32, :32]}, "control_image: has shape (32, 32, 3); allowed (64, 64, 3)"),
    ({"controlnet": "canny", "control_image": EDGES[:, :, :1].repeat(3, axis=2)[:, :48]},
     "control_image: has shape (64, 48, 3); allowed (64, 64, 3)"),
    ({"controlnet": "canny", "control_image": EDGES, "controlnet_scale": 2.5},
     "controlnet_scale: 2.5 is out of range; allowed 0.0..2.0"),
    ({"controlnet": "canny", "control_image": EDGES, "controlnet_scale": -0.1}, "controlnet_scale: -0.1 is out of range"),
    ({"controlnet": "canny"}, "control_image: is required with controlnet"),
    ({"control_image": EDGES}, "control_image: needs controlnet (a served ControlNet: canny)"),
    ({"controlnet": "../../etc/passwd", "control_image": EDGES}, "controlnet: '../../etc/passwd' is not served"),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_control_input_is_invalid_arg_naming_the_field_and_the_batch_goes_on(control_server, protocol):
    url = control_server[protocol]
    solo = generate("a red bicycle", seed=21, steps=20, url=control_server["grpc"])
    # A good request is denoising while the bad ones arrive; it finishes as if alone.
    started = threading.Event()
    handle = start_stream_generation("a red bicycle", seed=21, steps=20, url=control_server["grpc"],
                                     on_progress=lambda step, steps: started.set())
    assert started.wait(120)
    for fields, message in BAD:
        with pytest.raises(GenerationError) as info:
            generate("a lighthouse", steps=2, url=url, protocol=protocol, **fields)
        assert str(info.value).startswith("INVALID_ARG: ") and message in str(info.value), str(info.value)
        assert info.value.status in ("StatusCode.INVALID_ARGUMENT", "400")
        assert "Traceback" not in str(info.value) and "/" not in str(info.value).replace("../../etc/passwd", "")
    assert diff(handle.result(timeout=120).array, solo.array) == (0, 0.0)


def test_control_image_of_the_wrong_type_is_refused_by_name(control_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    def infer(image, dtype):
        inputs = []
        for name, array, kind in (("prompt", np.array([b"a cat"], np.object_), "BYTES"),
                                  ("controlnet", np.array([b"canny"], np.object_), "BYTES"),
                                  ("control_image", image, dtype)):
            tensor = grpcclient.InferInput(name, list(array.shape), kind)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return grpcclient.InferenceServerClient(control_server["grpc"]).infer(contract.TEXT_TO_IMAGE, inputs)

    with pytest.raises(InferenceServerException) as info:  # Triton refuses the datatype, naming the input
        infer(EDGES.astype(np.float32), "FP32")
    assert "'control_image'" in str(info.value) and "UINT8" in str(info.value)
    with pytest.raises(InferenceServerException) as info:  # 4 channels: not an RGB image
        infer(np.zeros((64, 64, 4), np.uint8), "UINT8")
    assert "control_image" in str(info.value)


def test_cli_generates_with_a_control_image(control_server, tmp_path):
    edges = tmp_path / "edges.png"
    Image.fromarray(EDGES).save(edges)
    out = tmp_path / "out.png"
    run = subprocess.run([str(Path(sys.executable).parent / "triffusion"), "generate", "a lighthouse on a cliff",
                          "--control-image", str(edges), "--controlnet", "canny", "--controlnet-scale", "0.8",
                          "--seed", "11", "--steps", "8", "--url", control_server["grpc"], "--no-progress",
                          "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    metadata = json.loads(run.stdout.strip().splitlines()[-1])
    assert metadata["controlnet"] == {"name": "canny", "model": "controlnet_canny", "scale": 0.8}
    direct = generate("a lighthouse on a cliff", url=control_server["grpc"], **CONTROL)
    assert np.array_equal(np.asarray(Image.open(out)), direct.array)


def test_controlnet_in_the_orchestrator_process_gives_the_bls_images(control_server, tmp_path):
    """unet_executor inprocess (the GPU set-up): the controlled UNet and the ControlNets load in the orchestrator
    and run there; images equal those over BLS, a control and a plain request together."""
    repo = tmp_path / "model_repository"
    shutil.copytree(control_server["repo"], repo)
    pipeline = json.loads((repo / "orchestrator/1/pipeline.json").read_text())
    write_repository(repo, pipeline, orchestrator={"unet_executor": "inprocess"})
    plain = {"seed": 5, "steps": 8}
    over_bls = [generate("a lighthouse on a cliff", url=control_server["grpc"], **CONTROL),
                generate("a red bicycle", url=control_server["grpc"], **plain)]
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        server.wait_ready(180)
        url = server.urls["grpc"]
        started = threading.Event()
        handle = start_stream_generation("a red bicycle", url=url, on_progress=lambda step, steps: started.set(),
                                         **plain)
        assert started.wait(120)
        in_process = [generate("a lighthouse on a cliff", url=url, **CONTROL), handle.result(timeout=120)]
    for a, b in zip(in_process, over_bls):
        assert diff(a.array, b.array)[0] <= TOLERANCE_MAX
    assert in_process[0].metadata["controlnet"]["model"] == "controlnet_canny"
