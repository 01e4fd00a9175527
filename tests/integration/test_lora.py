"""LoRA adapters through the real server: a tiny family with a `lora` section exported from a registry (two
adapter files, one diffusers/PEFT and one kohya), a third adapter added to the built repository with
`add-lora`, served by a tritonserver of its own. A batch mixing the three adapters and none shares UNet calls
and gives, per request, the image of the same request served alone on a UNet with its adapter merged into the
weights; bad `lora` values are refused by name without touching the batch; metadata and /metrics say what
served each request."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from perf.addons import PARITY_TOLERANCE, fused_reference, image_diff
from triffusion import lora
from triffusion.client import GenerationError, generate
from triffusion.export.repository import write_repository
from triffusion.server import TritonServer, free_port

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = {"inkwash": ("diffusers", 4, 1), "pixel": ("kohya", 4, 2), "sepia": ("diffusers", 2, 4),
            "neon": ("kohya", 8, 3)}  # 4 adapters, 3 slots (cache_mib 1 at rank 8): one is evicted in turn
REQUEST = {"steps": 6, "seed": 5}


def metric(url: str, prefix: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    unet = UNet2DConditionModel.from_config(json.loads((ROOT / "export/configs/tiny/unet.json").read_text()))
    for name, (fmt, rank, seed) in ADAPTERS.items():
        save_file(lora.random_state_dict(unet, rank=rank, seed=seed, fmt=fmt, std=0.15, alpha=float(rank)),
                  tmp / f"{name}.safetensors")
    (tmp / "registry.yaml").write_text(
        "families:\n  tiny:\n    variants:\n      heavy: {preset: tiny}\n"
        "    lora:\n      max_per_request: 2\n      max_rank: 8\n      cache_mib: 1\n"
        "      adapters: {inkwash: inkwash.safetensors, pixel: pixel.safetensors, sepia: sepia.safetensors}\n")
    repo = tmp / "model_repository"
    subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--registry", str(tmp / "registry.yaml"),
                    "--family", "tiny", "--out", str(repo), "--no-profile"], check=True)
    # the third one is added to the built repository, without a rebuild
    subprocess.run([sys.executable, "-m", "triffusion.export", "add-lora", "--repo", str(repo), "--name", "neon",
                    "--file", str(tmp / "neon.safetensors")], check=True)
    pipeline = json.loads((repo / "orchestrator/1/pipeline.json").read_text())
    write_repository(repo, pipeline, orchestrator={"max_active": 4})
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    with TritonServer(repo, **ports) as srv:
        srv.wait_ready(timeout_s=180)
        yield {"repo": repo, "grpc": f"localhost:{ports['grpc_port']}", "http": f"localhost:{ports['http_port']}",
               "metrics": f"http://localhost:{ports['metrics_port']}/metrics", "slots": pipeline["lora"]["slots"]}


MIX = [("a harbour at dawn", "inkwash:0.8"), ("a harbour at dawn", "pixel:1.0"),
       ("a harbour at dawn", "neon:0.6,inkwash:-0.4"), ("a harbour at dawn", None)]


def test_a_batch_of_three_adapters_and_none_matches_each_fused_solo_run(lora_server):
    url, metrics = lora_server["grpc"], lora_server["metrics"]
    for _, adapters in MIX[:3]:  # make them resident: the mixed batch then starts together
        generate("warm-up", steps=1, lora=adapters, url=url)
    shared_before = metric(metrics, 'triffusion_unet_call_seconds_count{rows="8"}')  # 4 requests x 2 CFG rows
    start = threading.Barrier(len(MIX))

    def run(item):
        prompt, adapters = item
        start.wait()
        return generate(prompt, url=url, **REQUEST, **({"lora": adapters} if adapters else {}))

    with ThreadPoolExecutor(len(MIX)) as pool:
        served = list(pool.map(run, MIX))
    assert metric(metrics, 'triffusion_unet_call_seconds_count{rows="8"}') > shared_before  # one call, all four
    plain = served[-1].array
    for (prompt, adapters), result in zip(MIX, served):
        expected = fused_reference(lora_server["repo"], {"prompt": prompt, **REQUEST, "lora": adapters or ""})
        worst = image_diff(result.array, expected)
        print(f"lora={adapters}: served (batched, unmerged) vs fused solo: max {worst} uint8 levels")
        assert worst <= PARITY_TOLERANCE, adapters
        if adapters:  # the adapter changes the image by far more than the tolerance: parity is not vacuous
            assert image_diff(result.array, plain) > 10 * PARITY_TOLERANCE
            names = [item.split(":")[0] for item in adapters.split(",")]
            assert [a["name"] for a in result.metadata["lora"]["adapters"]] == names
            assert result.metadata["lora"]["cache"] == "hit"
        else:
            assert result.metadata["lora"] is None


@pytest.mark.parametrize("value, message", [
    ("watercolor:0.5", "INVALID_ARG: lora: 'watercolor' is not a registered adapter; allowed: inkwash, neon, pixel, sepia"),
    ("inkwash:1,pixel:1,neon:1", "INVALID_ARG: lora: names 3 adapters; allowed: up to 2 of NAME:SCALE"),
    ("inkwash:2.5", "INVALID_ARG: lora: scale 2.5 of 'inkwash' is out of range; allowed -2.0..2.0"),
    ("inkwash=1", "INVALID_ARG: lora: 'inkwash=1' is not a registered adapter"),
    ("/etc/passwd:1", "INVALID_ARG: lora: '/etc/passwd' is not a registered adapter"),
])
def test_bad_lora_values_are_refused_by_name_and_the_batch_goes_on(lora_server, value, message):
    url = lora_server["grpc"]
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(generate, "a harbour at dawn", url=url, lora="pixel:1.0", **REQUEST)
        with pytest.raises(GenerationError) as refused:
            generate("a harbour at dawn", url=url, lora=value, steps=6)
        assert str(refused.value).startswith(message)
        assert "Traceback" not in str(refused.value) and "/tmp" not in str(refused.value)
        result = good.result()
    assert result.array.shape == (64, 64, 3) and result.metadata["lora"]["adapters"][0]["name"] == "pixel"


def test_http_and_cli_field_and_cache_metrics(lora_server, tmp_path):
    metrics = lora_server["metrics"]
    hits = metric(metrics, 'triffusion_adapter_cache_total{event="hit"}')
    result = generate("a harbour at dawn", url=lora_server["http"], protocol="http", lora="inkwash:0.8", **REQUEST)
    assert result.metadata["lora"]["adapters"] == [{"name": "inkwash", "scale": 0.8}]
    assert metric(metrics, 'triffusion_adapter_cache_total{event="hit"}') >= hits + 1
    assert metric(metrics, 'triffusion_adapter_cache_total{event="miss"}') >= 3  # each adapter loaded once
    assert metric(metrics, "triffusion_adapter_load_seconds_count") >= 3
    out = tmp_path / "cli.png"
    subprocess.run([str(Path(sys.executable).parent / "triffusion"), "generate", "a harbour at dawn", "--steps", "6", "--seed",
                    "5", "--lora", "inkwash:0.8", "--url", lora_server["grpc"], "--no-progress", "-o", str(out)],
                   check=True)
    assert out.exists()


def test_more_adapters_than_slots_are_evicted_and_reloaded(lora_server):
    """With fewer slots than adapters in turn, each request still gets its own adapter's image."""
    assert lora_server["slots"] == 3 < len(ADAPTERS)
    url, metrics = lora_server["grpc"], lora_server["metrics"]
    evictions = metric(metrics, 'triffusion_adapter_cache_total{event="eviction"}')
    first = generate("a harbour at dawn", url=url, lora="inkwash:0.8", **REQUEST)
    for name in ("pixel", "neon", "sepia"):  # the three others fill the slots: inkwash, least recent, goes
        generate("a harbour at dawn", url=url, lora=f"{name}:1.0", steps=1)
    again = generate("a harbour at dawn", url=url, lora="inkwash:0.8", **REQUEST)
    assert again.metadata["lora"]["cache"] == "miss"  # it was evicted and loaded again
    assert again.metadata["lora"]["wait_ms"] > 0
    assert metric(metrics, 'triffusion_adapter_cache_total{event="eviction"}') >= evictions + 1
    assert image_diff(first.array, again.array) == 0


def test_an_adapter_added_or_replaced_while_serving_is_served_without_a_restart(lora_server, tmp_path):
    """`add-lora` on the served repository: the next request may name the new adapter and gets its fused
    image; `--force` replaces a file and the next request gets the new one. (Last here: it adds a name.)"""
    url, repo = lora_server["grpc"], lora_server["repo"]
    unet = UNet2DConditionModel.from_config(json.loads((ROOT / "export/configs/tiny/unet.json").read_text()))
    with pytest.raises(GenerationError, match="INVALID_ARG: lora: 'mist' is not a registered adapter"):
        generate("a harbour at dawn", url=url, lora="mist:0.8", **REQUEST)

    def add(seed, *force):
        path = tmp_path / f"mist-{seed}.safetensors"
        save_file(lora.random_state_dict(unet, rank=4, seed=seed, std=0.15, alpha=4.0), path)
        subprocess.run([sys.executable, "-m", "triffusion.export", "add-lora", "--repo", str(repo), "--name", "mist",
                        "--file", str(path), *force], check=True)

    add(11)
    first = generate("a harbour at dawn", url=url, lora="mist:0.8", **REQUEST)
    assert first.metadata["lora"]["adapters"] == [{"name": "mist", "scale": 0.8}]
    expected = fused_reference(repo, {"prompt": "a harbour at dawn", **REQUEST, "lora": "mist:0.8"})
    assert image_diff(first.array, expected) <= PARITY_TOLERANCE
    add(12, "--force")
    second = generate("a harbour at dawn", url=url, lora="mist:0.8", **REQUEST)
    assert second.metadata["lora"]["cache"] == "miss"  # the replaced file was loaded again
    expected = fused_reference(repo, {"prompt": "a harbour at dawn", **REQUEST, "lora": "mist:0.8"})
    assert image_diff(second.array, expected) <= PARITY_TOLERANCE
    assert image_diff(second.array, first.array) > 10 * PARITY_TOLERANCE  # the new file, not the old copy
