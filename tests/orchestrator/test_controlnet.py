"""ControlNet in the runner and in validation, on a fake executor (no Triton): which rows the ControlNet gets,
the zero residuals of plain rows in the shared UNet call, per-row scales, failures contained per request."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from triffusion.orchestrator.engine import PipelineSpec, make_engine
from triffusion.orchestrator.errors import InvalidRequest
from triffusion.orchestrator.params import Limits, parse_params
from triffusion.orchestrator.scheduler import StepScheduler

from .fakes import SCHEDULER_CONFIG, FakeExecutor, make_state

WIDTH = 5  # residual width of the fake ControlNet


class ControlExecutor(FakeExecutor):
    """FakeExecutor plus a ControlNet whose residuals are scale x (a per-row number), and a controlled UNet
    that adds the residuals' row mean to its output."""

    def __init__(self, fail_controlnet: bool = False):
        super().__init__()
        self.fail_controlnet = fail_controlnet
        self.controlnet_calls: list[dict] = []
        self.unet_calls: list[tuple[str, np.ndarray | None]] = []

    def controlnet(self, model, sample, timestep, text_embeddings, control_image, scale):
        self.controlnet_calls.append({"model": model, "rows": len(sample), "scale": scale.copy(),
                                      "image": control_image.copy()})
        if self.fail_controlnet:
            raise RuntimeError("controlnet exploded")
        return np.repeat((scale * (1.0 + control_image.mean(axis=(1, 2, 3))))[:, None], WIDTH, axis=1).astype(np.float32)

    def denoise(self, model, sample, timestep, text_embeddings, **residuals):
        self.unet_calls.append((model, residuals.get("residuals")))
        noise = super().denoise(model, sample, timestep, text_embeddings)
        if "residuals" in residuals:
            noise = noise + residuals["residuals"].mean(axis=1)[:, None, None, None]
        return noise


SPEC = PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG, controlnets={"canny": "controlnet_canny"},
                    control_unet="unet_control")


def controlled(i: int, scale: float = 0.5, value: int = 255, **kw):
    state = make_state(i, **kw)
    image = np.full((state.params.height, state.params.width, 3), value, np.uint8)
    state.params = dataclasses.replace(state.params, controlnet="canny", controlnet_scale=scale, control_image=image)
    return state


def run(executor, states, max_active=8):
    engine = make_engine(executor, SPEC, StepScheduler(max_active=max_active), pipelined=False)
    for state in states:
        engine.submit(state)
    for _ in range(200):
        if not engine.scheduler.has_work:
            return
        engine.step()
    raise AssertionError("engine did not drain")


def test_control_and_plain_rows_share_one_controlled_unet_call_with_zero_residuals_for_plain_rows():
    executor = ControlExecutor()
    control, plain = controlled(1, scale=0.5, steps=3), make_state(2, steps=3)
    run(executor, [control, plain])
    # Every step: the ControlNet on the control request's two CFG rows only, each scaled by its request's scale.
    assert [c["rows"] for c in executor.controlnet_calls] == [2, 2, 2]
    assert all(np.allclose(c["scale"], [0.5, 0.5]) for c in executor.controlnet_calls)
    assert all(c["image"].shape == (2, 3, 64, 64) and np.allclose(c["image"], 1.0) for c in executor.controlnet_calls)
    # One UNet call per step for both requests, on the controlled UNet; the plain request's rows are zero.
    assert [m for m, _ in executor.unet_calls] == ["unet_control"] * 3
    for _, residuals in executor.unet_calls:
        assert residuals.shape == (4, WIDTH)
        assert np.allclose(residuals[:2], 1.0) and np.allclose(residuals[2:], 0.0)
    assert control.sink.outcome == "finish" and plain.sink.outcome == "finish"
    metadata = control.sink.finals[0][2]
    assert metadata["controlnet"] == {"name": "canny", "model": "controlnet_canny", "scale": 0.5}
    assert plain.sink.finals[0][2]["controlnet"] is None


def test_a_batch_without_control_runs_on_the_plain_unet_and_no_controlnet():
    executor = ControlExecutor()
    run(executor, [make_state(1, steps=2), make_state(2, steps=2)])
    assert executor.controlnet_calls == []
    assert executor.unet_calls == [("unet", None)] * 2


def test_plain_request_batched_with_control_gets_the_image_it_gets_alone():
    alone, together = ControlExecutor(), ControlExecutor()
    solo = make_state(2, steps=3)
    run(alone, [solo])
    plain = make_state(2, steps=3)
    run(together, [controlled(1, steps=3), plain])
    assert np.array_equal(solo.sink.finals[0][1], plain.sink.finals[0][1])


def test_scale_and_image_change_the_residuals_per_row():
    executor = ControlExecutor()
    run(executor, [controlled(1, scale=0.25, value=0, steps=1), controlled(2, scale=2.0, value=255, steps=1)])
    (call,) = executor.controlnet_calls  # both requests in one ControlNet call
    assert np.allclose(call["scale"], [0.25, 0.25, 2.0, 2.0])
    (_, residuals), = executor.unet_calls
    assert np.allclose(residuals[:, 0], [0.25, 0.25, 4.0, 4.0])


def test_a_failing_controlnet_fails_its_requests_only():
    executor = ControlExecutor(fail_controlnet=True)
    control, plain = controlled(1, steps=2), make_state(2, steps=2)
    run(executor, [control, plain])
    assert control.sink.finals == [("fail", control.sink.finals[0][1], "controlnet_canny failed (RuntimeError)")]
    assert plain.sink.outcome == "finish"


LIMITS = Limits(controlnets=("canny",), unets=("default", "tiny-lite"))
EDGES = np.zeros((64, 64, 3), np.uint8)


@pytest.mark.parametrize("raw, message", [
    ({"controlnet": "depth", "control_image": EDGES}, "controlnet: 'depth' is not served; allowed: canny"),
    ({"controlnet": "canny"}, "control_image: is required with controlnet"),
    ({"controlnet": "canny", "control_image": EDGES[:32]}, "control_image: has shape (32, 64, 3); allowed (64, 64, 3)"),
    ({"controlnet": "canny", "control_image": EDGES.astype(np.float32)}, "control_image: has type float32"),
    ({"controlnet": "canny", "control_image": EDGES.tolist()}, "control_image: is not an image array"),
    ({"controlnet": "canny", "control_image": EDGES, "controlnet_scale": 2.01}, "controlnet_scale: 2.01 is out of range; allowed 0.0..2.0"),
    ({"controlnet": "canny", "control_image": EDGES, "controlnet_scale": float("nan")}, "controlnet_scale: is NaN"),
    ({"controlnet": "canny", "control_image": EDGES, "unet": "tiny-lite"}, "controlnet: runs with unet 'default' only"),
    ({"control_image": EDGES}, "control_image: needs controlnet"),
    ({"controlnet_scale": 1.0}, "controlnet_scale: needs controlnet"),
])
def test_bad_control_fields_are_refused_by_name(raw, message):
    with pytest.raises(InvalidRequest) as info:
        parse_params({"prompt": "a cat", **raw}, LIMITS)
    assert str(info.value).startswith(message)


def test_control_fields_parse_and_survive_the_orchestrator_s_second_check():
    params = parse_params({"prompt": "a cat", "controlnet": "canny", "control_image": EDGES}, LIMITS)
    assert (params.controlnet, params.controlnet_scale) == ("canny", 1.0)
    again = parse_params(dataclasses.asdict(params), LIMITS)  # what the orchestrator gets from a front
    assert again.controlnet == "canny" and np.array_equal(again.control_image, EDGES)
    plain = parse_params({"prompt": "a cat"}, LIMITS)
    assert (plain.controlnet, plain.controlnet_scale, plain.control_image) == (None, None, None)
    assert parse_params(dataclasses.asdict(plain), LIMITS).controlnet is None
    with pytest.raises(InvalidRequest, match="^controlnet: 'canny' is not served; allowed: none"):
        parse_params({"prompt": "a cat", "controlnet": "canny", "control_image": EDGES}, Limits())
