"""Engine and step scheduler on a fake executor, driven one iteration at a time (no threads, no Triton)."""

import numpy as np
import pytest

from triffusion.orchestrator.engine import PipelineSpec, make_engine as build
from triffusion.orchestrator.errors import Code
from triffusion.orchestrator.request import Status
from triffusion.orchestrator.scheduler import QueueFull, StepScheduler

from .fakes import SCHEDULER_CONFIG, FakeExecutor, RecordingSink, make_state


def make_engine(executor=None, **scheduler_args):
    return build(executor or FakeExecutor(), PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG),
                 StepScheduler(**scheduler_args))


def drain(engine, limit=200):
    for _ in range(limit):
        if not engine.scheduler.has_work:
            return
        engine.step()
    raise AssertionError("engine did not drain")


def test_request_streams_every_step_in_order_then_finishes():
    engine = make_engine()
    state = make_state(1, steps=5)
    engine.submit(state)
    drain(engine)
    events = state.sink.events
    assert [e[1:] for e in events[:-1]] == [(i, 5) for i in range(1, 6)]
    kind, image, metadata = events[-1]
    assert kind == "finish" and image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert metadata["steps_done"] == 5 and metadata["seed"] == 1
    assert state.status is Status.FINISHED


def test_new_request_joins_running_batch_at_step_boundary():
    executor = FakeExecutor()
    engine = make_engine(executor)
    first = make_state(1, steps=6)
    engine.submit(first)
    engine.step()  # encode first
    engine.step()  # first: step 1 alone
    second = make_state(2, steps=6)
    engine.submit(second)
    engine.step()  # second encodes, first advances alone
    engine.step()  # both advance in one UNet call
    denoise_rows = [rows for name, rows in executor.calls if name == "denoise"]
    assert denoise_rows[:3] == [2, 2, 4]
    assert first.steps_done == 3 and second.steps_done == 1
    drain(engine)
    assert first.sink.outcome == second.sink.outcome == "finish"


def test_buckets_split_by_resolution_and_batch_cap():
    executor = FakeExecutor()
    engine = make_engine(executor, max_active=8, max_batch=4)
    states = [make_state(i, size=64) for i in range(3)] + [make_state(9, size=128)]
    for s in states:
        engine.submit(s)
    engine.step()  # encode all four in one call
    assert executor.calls == [("encode", 8)]
    engine.step()
    # 64px: 3 CFG requests = 6 rows -> calls of 4 and 2; 128px: one call of 2.
    assert sorted(rows for name, rows in executor.calls if name == "denoise") == [2, 2, 4]
    drain(engine)
    assert all(s.sink.outcome == "finish" for s in states)
    assert states[3].sink.events[-1][1].shape == (128, 128, 3)


def test_batched_result_equals_request_served_alone():
    alone_engine = make_engine()
    alone = make_state(3, steps=7)
    alone_engine.submit(alone)
    drain(alone_engine)
    crowd_engine = make_engine()
    crowd = [make_state(i, steps=4 + i) for i in range(4)]
    for s in crowd:
        crowd_engine.submit(s)
    drain(crowd_engine)
    # The fake UNet is row-independent, so batching must not change a single pixel.
    assert np.array_equal(alone.sink.events[-1][1], crowd[3].sink.events[-1][1])


def test_cancel_stops_early_and_frees_slot():
    engine = make_engine(max_active=1)
    cancelled = make_state(1, steps=50, sink=RecordingSink(cancel_after_steps=2))
    waiting = make_state(2, steps=3)
    engine.submit(cancelled)
    engine.submit(waiting)
    drain(engine)
    assert cancelled.sink.outcome == "fail" and cancelled.sink.events[-1][1] is Code.CANCELLED
    assert cancelled.steps_done == 2
    assert waiting.sink.outcome == "finish"


def test_bounded_queue_rejects_when_full():
    engine = make_engine(max_active=1, max_queue=2)
    engine.submit(make_state(1))
    engine.submit(make_state(2))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(make_state(3))


def test_failing_model_fails_its_requests_and_engine_keeps_serving():
    executor = FakeExecutor(fail_denoise=True)
    engine = make_engine(executor)
    broken = make_state(1)
    engine.submit(broken)
    drain(engine)
    # The client reads which component failed, not the exception's text (that goes to the log).
    assert broken.sink.outcome == "fail" and broken.sink.events[-1][1:] == (Code.INTERNAL, "unet failed (RuntimeError)")
    executor.fail_denoise = False
    healthy = make_state(2)
    engine.submit(healthy)
    drain(engine)
    assert healthy.sink.outcome == "finish"


def test_no_cfg_uses_one_row():
    executor = FakeExecutor()
    engine = make_engine(executor)
    engine.submit(make_state(1, guidance=1.0))
    drain(engine)
    assert {rows for name, rows in executor.calls if name == "denoise"} == {1}


def test_pipelined_stages_give_the_same_images_as_sequential():
    results = {}
    for pipelined in (False, True):
        engine = build(FakeExecutor(), PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG),
                       StepScheduler(max_active=3), pipelined=pipelined)
        states = [make_state(i, steps=2 + i) for i in range(6)]
        for s in states:
            engine.submit(s)
        drain(engine)
        results[pipelined] = [s.sink.events[-1][1] for s in states]
    assert all(np.array_equal(a, b) for a, b in zip(results[False], results[True]))


def mixed_requests():
    return [make_state(i, size=size, steps=3) for i, size in enumerate([64, 128, 64, 192])]


def test_patched_batches_serve_mixed_resolutions_in_one_call_and_match_buckets():
    """The fake UNet is pixel-local, so cutting into patches must not change a single pixel."""
    from triffusion.orchestrator.patches import PatchGrid

    results = {}
    for hybrid in ("bucket", "patch"):
        executor = FakeExecutor()
        engine = build(executor, PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG),
                       StepScheduler(max_active=8, hybrid=hybrid, patch_grid=PatchGrid(patch=8, halo=4)))
        states = mixed_requests()
        for s in states:
            engine.submit(s)
        drain(engine)
        calls = [rows for name, rows in executor.calls if name == "denoise"]
        results[hybrid] = ([s.sink.events[-1][1] for s in states], calls)
    bucket_images, bucket_calls = results["bucket"]
    patch_images, patch_calls = results["patch"]
    assert len(bucket_calls) == 3 * 3  # three resolutions, three steps
    # One call per step: 2 CFG rows x (1 + 4 + 1 + 9) patches of 8x8 latent.
    assert patch_calls == [2 * 15] * 3
    assert all(np.array_equal(a, b) for a, b in zip(bucket_images, patch_images))


def test_auto_hybrid_follows_the_predictor():
    from triffusion.orchestrator.patches import PatchGrid
    from triffusion.orchestrator.predictor import LatencyPredictor

    def plan_for(small_batch_cost):
        predictor = LatencyPredictor()
        # Per-call cost dominated by a fixed overhead (a launch-bound GPU) or by pixels (a CPU).
        for size in (64, 128, 192):
            for rows in (1, 2, 4):
                predictor.observe_unet("unet", size, size, rows, small_batch_cost + 1e-6 * rows * size * size)
        for rows in range(1, 65):
            predictor.observe_unet("unet", 128, 128, rows, small_batch_cost + 1e-6 * rows * 128 * 128)
        scheduler = StepScheduler(max_active=8, predictor=predictor, hybrid="auto",
                                  patch_grid=PatchGrid(patch=8, halo=4))
        for s in mixed_requests():
            scheduler.add(s, 0.0)
        scheduler.schedule(0.0)
        for s in scheduler.running:
            s.status, s.steps_target = s.status.DENOISING, 3
        return scheduler.schedule(0.0)

    # Patches of 8 with halo 4 compute 4x their area: 30 tile rows cost 0.49 s of pixels, three bucket
    # calls 0.13 s; patches win once the per-call overhead (3 calls against 1) outweighs that.
    launch_bound = plan_for(small_batch_cost=0.5)
    assert len(launch_bound.patched) == 1 and not launch_bound.denoise
    compute_bound = plan_for(small_batch_cost=0.0)
    assert not compute_bound.patched and len(compute_bound.denoise) == 3
