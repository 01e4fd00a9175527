"""Client request building: only fields that are set are sent, with the contract's dtypes."""

import numpy as np

from triffusion.client import request_arrays


def test_only_set_fields_with_contract_dtypes():
    arrays = request_arrays("a cat", height=64, steps=None, guidance_scale=3, seed=7, scheduler="ddim")
    assert set(arrays) == {"prompt", "height", "guidance_scale", "seed", "scheduler"}
    assert arrays["prompt"][1] == "BYTES" and arrays["prompt"][0][0] == b"a cat"
    assert arrays["height"][1] == "INT32" and arrays["height"][0].dtype == np.int32
    assert arrays["guidance_scale"][1] == "FP32" and arrays["guidance_scale"][0].dtype == np.float32
    assert arrays["seed"][1] == "INT64" and arrays["seed"][0].dtype == np.int64
    assert all(array.shape == (1,) for array, _ in arrays.values())


def test_extra_fields_infer_their_type():
    arrays = request_arrays("a cat", slo_ms=5000, min_quality=0.25, allow_degrade=True, style="photo")
    assert [arrays[k][1] for k in ("slo_ms", "min_quality", "allow_degrade", "style")] == \
        ["INT32", "FP32", "BOOL", "BYTES"]
