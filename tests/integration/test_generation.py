"""Text-to-image through the real tritonserver with real tritonclient calls, gRPC and HTTP."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from triffusion.client import GenerationError, generate, start_stream_generation

PROTOCOLS = ["grpc", "http"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_generates_png_of_requested_size(server, protocol, tmp_path):
    result = generate("a red bicycle", height=64, width=96, steps=4, seed=7, url=server.url(protocol),
                      protocol=protocol)
    path = tmp_path / "out.png"
    result.image.save(path)
    reopened = Image.open(io.BytesIO(path.read_bytes()))
    assert reopened.format == "PNG" and reopened.size == (96, 64)
    assert result.array.shape == (64, 96, 3) and result.array.dtype == np.uint8
    meta = result.metadata
    assert (meta["seed"], meta["steps"], meta["steps_done"], meta["model"]) == (7, 4, 4, "tiny")
    assert set(meta["timings_ms"]) >= {"queue", "encode", "denoise", "decode", "total"}


def test_same_seed_is_byte_identical_and_seeds_differ(server):
    a = generate("a lighthouse at dusk", steps=5, seed=11, url=server.grpc)
    b = generate("a lighthouse at dusk", steps=5, seed=11, url=server.http, protocol="http")
    c = generate("a lighthouse at dusk", steps=5, seed=12, url=server.grpc)
    assert a.array.tobytes() == b.array.tobytes()
    assert a.array.tobytes() != c.array.tobytes()


def test_streamed_progress_arrives_once_per_step_in_order(server):
    seen = []
    result = generate("a cat", steps=7, seed=1, url=server.grpc, stream=True,
                      on_progress=lambda step, steps: seen.append((step, steps)))
    assert seen == [(i, 7) for i in range(1, 8)]
    assert result.metadata["steps_done"] == 7


def test_cancelled_request_stops_early_and_frees_its_slot(server):
    """A (cancelled) and the Bs fill every slot; C only finishes before the Bs if A's slot was freed."""
    from .conftest import MAX_ACTIVE

    a_started = threading.Event()
    progress_a = []

    def on_a(step, steps):
        progress_a.append(step)
        if step >= 2:
            a_started.set()

    a = start_stream_generation("slow a", height=256, width=256, steps=100, seed=1, url=server.grpc,
                                on_progress=on_a)
    progress_b = [[] for _ in range(MAX_ACTIVE - 1)]
    bs = [start_stream_generation(f"slow b{i}", height=256, width=256, steps=100, seed=2 + i, url=server.grpc,
                                  on_progress=lambda step, steps, seen=seen: seen.append(step))
          for i, seen in enumerate(progress_b)]
    assert a_started.wait(60), "request A never streamed progress"
    a.cancel()
    c = generate("quick c", steps=3, seed=3, url=server.grpc)
    b_steps_when_c_finished = [len(seen) for seen in progress_b]
    b_results = [b.result(timeout=300) for b in bs]
    assert max(progress_a) < 100
    assert c.metadata["steps_done"] == 3 and all(r.metadata["steps_done"] == 100 for r in b_results)
    # C ran while every B still held its slot, so A's slot was released at cancellation.
    assert max(b_steps_when_c_finished) < 100


BAD_INPUTS = [
    ({"prompt": ""}, "prompt", "1..75 tokens"),
    ({"prompt": "a very long prompt " * 30}, "prompt", "1..75 tokens"),
    ({"height": 100}, "height", "multiples of 16 in 64..512"),
    ({"width": 36}, "width", "multiples of 16 in 64..512"),
    ({"height": 1024}, "height", "multiples of 16 in 64..512"),
    ({"steps": 0}, "steps", "1..100"),
    ({"steps": 1000}, "steps", "1..100"),
    ({"guidance_scale": 50.0}, "guidance_scale", "0.0..20.0"),
    ({"scheduler": "warp_drive"}, "scheduler", "ddim, euler"),
    ({"unet": "huge"}, "unet", "allowed: default, tiny-lite"),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fields, name, allowed", BAD_INPUTS, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_is_invalid_arg_naming_field_and_range(server, protocol, fields, name, allowed):
    fields = {"prompt": "a red bicycle", "steps": 2, **fields}
    prompt = fields.pop("prompt")
    with pytest.raises(GenerationError) as info:
        generate(prompt, url=server.url(protocol), protocol=protocol, **fields)
    message = str(info.value)
    assert "INVALID_ARG" in message and f"{name}:" in message and allowed in message
    assert info.value.status in ("StatusCode.INVALID_ARGUMENT", "400")
    # The server keeps serving.
    assert generate("a red bicycle", steps=2, seed=5, url=server.url(protocol), protocol=protocol).array.shape == (64, 64, 3)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_dtype_and_shape_are_rejected_by_name(server, protocol):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from triffusion import contract

    mod = grpcclient if protocol == "grpc" else httpclient
    client = mod.InferenceServerClient(server.url(protocol))

    def request(name, array, dtype):
        prompt = mod.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"a cat"], dtype=np.object_))
        bad = mod.InferInput(name, list(array.shape), dtype)
        bad.set_data_from_numpy(array)
        return [prompt, bad]

    cases = [request("height", np.array([64.0], np.float32), "FP32"),  # wrong dtype
             request("steps", np.array([2, 3], np.int32), "INT32")]  # wrong shape
    for inputs, field in zip(cases, ["height", "steps"]):
        with pytest.raises(Exception) as info:
            client.infer(contract.TEXT_TO_IMAGE, inputs)
        assert f"'{field}'" in str(info.value)
    ok = generate("a red bicycle", steps=2, url=server.url(protocol), protocol=protocol)
    assert json.loads(json.dumps(ok.metadata))["steps_done"] == 2


def test_streamed_previews_every_n_steps(server):
    previews = []
    handle = start_stream_generation("a cat", height=128, width=64, steps=6, seed=4, preview_every=2,
                                     url=server.grpc, on_preview=previews.append)
    result = handle.result(timeout=120)
    # Steps 2 and 4 (not the last: the final image follows), at latent resolution.
    assert [p.shape for p in previews] == [(16, 8, 3), (16, 8, 3)] and previews[0].dtype == np.uint8
    assert result.array.shape == (128, 64, 3)


def test_unet_variant_is_its_own_model_and_reported(server):
    base = generate("a fox", steps=3, seed=9, url=server.grpc)
    light = generate("a fox", steps=3, seed=9, unet="tiny-lite", url=server.grpc)
    assert (base.metadata["unet"], light.metadata["unet"]) == ("unet", "unet_tiny_lite")
    assert base.array.tobytes() != light.array.tobytes()
