"""Cascade requests through the real server: the light model answers, the quality_gate Triton model
scores it, and (the session server's threshold is above any score) the heavy model redoes it. The
answer says which model produced it; metrics count the routes."""

import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

from triffusion.client import generate

from ..conftest import CASCADE_THRESHOLD


def test_escalated_cascade_returns_the_heavy_models_image_and_says_so(server):
    kwargs = dict(height=64, width=64, steps=4, seed=8)
    cascade = generate("a red bicycle", url=server.grpc, unet="cascade", **kwargs)
    heavy = generate("a red bicycle", url=server.grpc, **kwargs)
    gate = cascade.metadata["cascade"]
    assert cascade.metadata["unet"] == "unet" and gate["light"] == "unet_tiny_lite"
    assert gate["escalated"] is True and gate["threshold"] == CASCADE_THRESHOLD and 0.0 <= gate["score"] <= 1.0
    assert cascade.array.tobytes() == heavy.array.tobytes()
    assert cascade.metadata["steps_done"] == 4 and heavy.metadata["cascade"] is None
    text = urllib.request.urlopen(server.metrics, timeout=10).read().decode()
    heavy_routes = [l for l in text.splitlines() if l.startswith('triffusion_cascade_total{route="heavy"}')]
    assert heavy_routes and float(heavy_routes[0].split()[-1]) >= 1


def test_quality_gate_is_a_triton_model_scoring_a_batch(server):
    client = grpcclient.InferenceServerClient(server.grpc)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 48, 3), dtype=np.uint8)
    tensor = grpcclient.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    scores = client.infer("quality_gate", [tensor]).as_numpy("score")
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()


def test_cascade_is_listed_among_the_unets_and_an_unknown_one_is_refused(server):
    from triffusion.client import GenerationError
    import pytest

    with pytest.raises(GenerationError, match="unet.*'nope' is not served; allowed: default, tiny-lite, cascade"):
        generate("x", url=server.grpc, unet="nope", steps=2)
