"""Step-level batching, SLO admission and metrics through the real server."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from triffusion.client import GenerationError, generate

SIZES = [(64, 64), (128, 128), (64, 128), (256, 256)]


def test_16_concurrent_mixed_resolution_requests_match_requests_served_alone(server, record_property):
    jobs = [dict(prompt=f"mixed {i}", height=SIZES[i % 4][0], width=SIZES[i % 4][1], steps=4 + i % 3, seed=100 + i)
            for i in range(16)]

    def run(job):
        job = dict(job)
        return generate(job.pop("prompt"), url=server.grpc, **job)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, jobs))
    alone = [run(job) for job in jobs]
    worst = 0
    for job, a, b in zip(jobs, together, alone):
        assert a.array.shape == (job["height"], job["width"], 3)
        assert a.metadata["steps_done"] == job["steps"]
        worst = max(worst, int(np.abs(a.array.astype(int) - b.array.astype(int)).max()))
    record_property("max_pixel_difference", worst)
    print(f"max pixel difference, batched vs alone: {worst}")
    # Only batch-size numerics differ (onnxruntime kernels per batch shape): at most a few levels of 255.
    assert worst <= 8


def test_unmeetable_slo_is_rejected_at_once_with_unavailable(server):
    with pytest.raises(GenerationError) as info:
        generate("a red bicycle", height=256, width=256, steps=100, slo_ms=1, url=server.grpc, stream=True)
    assert info.value.status == "StatusCode.UNAVAILABLE"
    assert "UNAVAILABLE: slo_ms 1 cannot be met at the current load" in str(info.value)
    with pytest.raises(GenerationError) as info:
        generate("a red bicycle", height=256, width=256, steps=100, slo_ms=1, url=server.http, protocol="http")
    assert info.value.status == "503"
    ok = generate("a red bicycle", steps=3, slo_ms=60_000, url=server.grpc)
    assert ok.metadata["slo_met"] is True and ok.metadata["slo_ms"] == 60_000


def test_metrics_report_outcomes_batches_and_stages(server):
    generate("for metrics", steps=2, seed=1, url=server.grpc)
    text = urllib.request.urlopen(server.metrics, timeout=10).read().decode()
    finished = [l for l in text.splitlines() if l.startswith('triffusion_requests_total{outcome="finished"}')]
    assert finished and float(finished[0].split()[-1]) >= 1
    for name in ("triffusion_queue_depth", "triffusion_unet_batch_rows_bucket", "triffusion_stage_seconds_count",
                 'triffusion_requests_total{outcome="rejected"}', 'triffusion_unet_call_seconds_count{rows="2"}'):
        assert name in text


def test_the_orchestrator_serves_with_start_ups_objects_frozen_and_its_collections_timed(server):
    """triffusion.heap in the served stub: a full collection there would scan some 350,000 start-up objects
    (torch, onnxruntime, scipy: ~130 ms with the GIL held, admission and rejections waiting); they are frozen."""
    from triffusion.supervisor import AdminClient

    generate("for the heap", steps=2, seed=2, url=server.grpc)
    heap = AdminClient(server.triton.internal_http, server.grpc, server.triton.admin_key).control({"op": "heap"})
    assert heap["frozen"] > 100_000, heap
    assert len(heap["collections"]) == len(heap["longest_ms"]) == 3 and heap["collections"][0] >= 1, heap


def test_auto_steps_report_the_steps_used(server):
    auto = generate("a red bicycle", steps=30, step_mode="auto", seed=3, url=server.grpc)
    fixed = generate("a red bicycle", steps=30, seed=3, url=server.grpc)
    # Stops at 40% of 30 = 12 steps, then one last step to the clean sample.
    assert (auto.metadata["steps_done"], auto.metadata["early_stop"]) == (13, True)
    assert (fixed.metadata["steps_done"], fixed.metadata["early_stop"]) == (30, False)
    assert auto.metadata["unet"] == "unet" and auto.array.shape == (64, 64, 3)
