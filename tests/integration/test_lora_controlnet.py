"""LoRA adapters and a ControlNet in one request, through the real server: a tiny family with a ControlNet and
a `lora` section. The controlled UNet runs in the orchestrator with the adapter slots, so a request with an
adapter and a control image, one with either and one with none share its calls; each gives the image of
diffusers' own pipeline for the same request with the adapter merged into the UNet's weights."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from perf.addons import registered_adapter
from perf.addons_controlnet import TOLERANCE_MAX, TOLERANCE_MEAN, control_image, diff, diffusers_folder, reference_image
from triffusion import lora
from triffusion.client import GenerationError, generate
from triffusion.server import TritonServer, free_port

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
EDGES = control_image(64, 64, seed=3)
PROMPT = "a lighthouse on a cliff"
BASE = {"seed": 11, "steps": 8}
CONTROL = {"controlnet": "canny", "controlnet_scale": 0.8, "control_image": EDGES}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-control")
    unet = UNet2DConditionModel.from_config(json.loads((ROOT / "export/configs/tiny/unet.json").read_text()))
    save_file(lora.random_state_dict(unet, rank=4, seed=1, std=0.15, alpha=4.0), tmp / "inkwash.safetensors")
    (tmp / "registry.yaml").write_text(
        "families:\n  tiny:\n    variants:\n      heavy: {preset: tiny}\n"
        "    controlnets:\n      canny: {preset: tiny-controlnet}\n"
        "    lora:\n      max_per_request: 2\n      max_rank: 8\n      cache_mib: 1\n"
        "      adapters: {inkwash: inkwash.safetensors}\n")
    repo = tmp / "model_repository"
    subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--registry", str(tmp / "registry.yaml"),
                    "--family", "tiny", "--out", str(repo), "--no-profile"], check=True)
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    with TritonServer(repo, **ports) as srv:
        srv.wait_ready(timeout_s=180)
        yield {"repo": repo, "grpc": f"localhost:{ports['grpc_port']}"}


MIX = [{"lora": "inkwash:0.9", **CONTROL}, dict(CONTROL), {"lora": "inkwash:0.9"}, {}]


def test_adapter_and_control_in_one_request_batched_with_either_and_none_match_diffusers(server):
    url, repo = server["grpc"], server["repo"]
    generate("warm-up", steps=1, lora="inkwash:1", url=url)  # resident: the four start together
    start = threading.Barrier(len(MIX))

    def run(fields):
        start.wait()
        return generate(PROMPT, url=url, **BASE, **fields)

    with ThreadPoolExecutor(len(MIX)) as pool:
        served = list(pool.map(run, MIX))
    folder = diffusers_folder(repo)
    adapter = registered_adapter(repo, "inkwash", UNet2DConditionModel.from_pretrained(str(folder / "unet")))
    expected = []
    for fields, result in zip(MIX, served):
        reference = reference_image(folder, PROMPT, BASE["seed"], BASE["steps"],
                                    lora=((adapter, 0.9),) if "lora" in fields else (),
                                    **({"controlnet": "controlnet_canny", "image": EDGES, "scale": 0.8}
                                       if "controlnet" in fields else {}))
        worst, mean = diff(result.array, reference)
        print(f"{sorted(fields)}: served (batched) vs diffusers: max {worst}, mean {mean:.4f} uint8 levels")
        assert worst <= TOLERANCE_MAX and mean <= TOLERANCE_MEAN, sorted(fields)
        assert (result.metadata["lora"] is not None) == ("lora" in fields)
        assert (result.metadata["controlnet"] is not None) == ("controlnet" in fields)
        expected.append(reference)
    # each part changes the image by far more than the tolerance: the parity says both were applied
    both, control_only, lora_only, plain = expected
    assert min(diff(both, control_only)[0], diff(both, lora_only)[0], diff(both, plain)[0]) > 8


def test_a_bad_adapter_with_control_is_refused_by_name(server):
    with pytest.raises(GenerationError, match="INVALID_ARG: lora: 'oil' is not a registered adapter"):
        generate(PROMPT, url=server["grpc"], lora="oil:1", **BASE, **CONTROL)
