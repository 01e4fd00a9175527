"""The baselines are models of the same server: a plain diffusers loop one request at a time, and
whole-request dynamic batching. They validate like the orchestrator and answer the same outputs."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from triffusion import contract


def call(url, model, batched, **fields):
    fields = {"prompt": "a lighthouse", "height": 64, "width": 64, "steps": 3, "seed": 1, **fields}
    types = {"prompt": ("BYTES", np.object_), "height": ("INT32", np.int32), "width": ("INT32", np.int32),
             "steps": ("INT32", np.int32), "seed": ("INT64", np.int64), "guidance_scale": ("FP32", np.float32)}
    inputs = []
    for name, value in fields.items():
        kind, dtype = types[name]
        array = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
        array = array[None] if batched else array
        tensor = grpcclient.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = grpcclient.InferenceServerClient(url).infer(model, inputs)
    image, metadata = result.as_numpy("image"), result.as_numpy("metadata").reshape(-1)[0]
    return (image[0] if batched else image), json.loads(metadata)


def test_sequential_baseline_is_a_plain_diffusers_loop(server):
    image, metadata = call(server.grpc, contract.BASELINE_SEQUENTIAL, False, height=64, width=128)
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8 and image.std() > 0
    assert metadata["model"] == contract.BASELINE_SEQUENTIAL and metadata["batch"] == 1
    again, _ = call(server.grpc, contract.BASELINE_SEQUENTIAL, False, height=64, width=128)
    assert np.array_equal(image, again)  # seeded


def test_batching_baseline_runs_concurrent_requests_together_with_the_same_images(server):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: call(server.grpc, contract.BASELINE_BATCHING, True, seed=i), range(4)))
    assert max(metadata["batch"] for _, metadata in results) >= 2
    alone, _ = call(server.grpc, contract.BASELINE_SEQUENTIAL, False, seed=2)
    # Batched numerics differ from single ones by rounding only.
    assert np.abs(results[2][0].astype(int) - alone.astype(int)).max() <= 2


def test_baselines_reject_bad_input_like_the_orchestrator(server):
    with pytest.raises(InferenceServerException, match="INVALID_ARG: steps: 0 is out of range; allowed 1..100"):
        call(server.grpc, contract.BASELINE_SEQUENTIAL, False, steps=0)
    image, _ = call(server.grpc, contract.BASELINE_SEQUENTIAL, False)
    assert image.shape == (64, 64, 3)  # and it keeps serving
