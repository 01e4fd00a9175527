"""Fault injection against the real supervised server: stubs killed with requests in flight over gRPC
streaming, gRPC unary and HTTP; components that raise, hang past their deadline or return garbage; a
client that vanishes mid-stream. Each test asserts that every request got exactly one final answer
(none hung), that readiness told the truth, and that a normal request succeeds again within 30 s."""

from __future__ import annotations

import os
import signal
import time

import pytest

from triffusion import contract, procs

from .conftest import COMPONENT_TIMEOUT_S
from .harness import (Burst, ReadinessMonitor, assert_answered_once, each_path, models_running, ready, send,
                      wait_recovered, wait_whole)

pytestmark = pytest.mark.server

# What the requests carry so that the killed model is in their path (the cascade runs the gate). Their
# step counts differ, so that they reach the text encoder (4 slots), the VAE and the gate at different times.
THROUGH = {
    contract.TEXT_ENCODER: {"height": 128, "width": 128},
    contract.UNET: {"height": 128, "width": 128},
    contract.VAE_DECODER: {"height": 128, "width": 128},
    contract.QUALITY_GATE: {"height": 128, "width": 128, "unet": "cascade"},
    contract.ORCHESTRATOR: {"height": 128, "width": 128},
}
# Kill once the first answer arrived for models every request meets only at its end (the rest are
# still to come), else once the requests are under way.
AT_THE_END = (contract.VAE_DECODER, contract.QUALITY_GATE)


def kill(server, model: str) -> float:
    stubs = procs.stubs_of(server.pid, model)
    assert stubs, f"{model} has no stub to kill"
    for pid in stubs.values():
        os.kill(pid, signal.SIGKILL)
    return time.monotonic()


@pytest.mark.parametrize("model", list(THROUGH))
def test_killed_stub_with_requests_in_flight(faults, model):
    monitor = ReadinessMonitor(faults)
    burst = Burst(faults, [(path, {**fields, "steps": 20 + 9 * i}) for i, (path, fields)
                           in enumerate(each_path(3, **THROUGH[model]))])
    if model in AT_THE_END:
        burst.wait_first()
    else:
        time.sleep(0.3)  # the requests are under way: the kill lands while they are in flight
    killed_at = kill(faults, model)
    outcomes = burst.wait()
    recovered_s = wait_recovered(faults)
    monitor.stop()
    assert_answered_once(outcomes)
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:  # the ones it touched fail fast, retryable, naming the model
        assert outcome.code == "UNAVAILABLE" and model in outcome.error, outcome
    if model == contract.QUALITY_GATE:  # a dead gate costs quality, not answers: the light image stands
        assert not failed
        assert any((o.metadata.get("cascade") or {}).get("gate_error") for o in outcomes)
    else:
        assert failed, "the kill touched no request; the test did not test anything"
    assert recovered_s < 30
    assert not monitor.untruthful_after(killed_at), "ready while a stub was dead"
    assert any(not ready for _, ready, _ in monitor.samples), "readiness never showed the reload"


def test_a_stub_that_dies_while_another_model_reloads_is_unloaded_at_once(faults):
    """The gate dies and is being reloaded (seconds); the orchestrator dies meanwhile. Readiness must turn
    false for the orchestrator at once, not when the gate's reload ends (CI saw it claim ready with the
    orchestrator dead for over a second, when its reload waited behind the gate's)."""
    monitor = ReadinessMonitor(faults)
    kill(faults, contract.QUALITY_GATE)
    deadline = time.monotonic() + 10
    while ready(faults) and time.monotonic() < deadline:
        time.sleep(0.02)  # polling readiness from outside: the gate's reload has begun once it turns false
    assert not ready(faults), "the gate's death never showed in readiness"
    assert contract.QUALITY_GATE not in models_running(faults), "the gate's reload ended before the test could act"
    killed_at = kill(faults, contract.ORCHESTRATOR)
    assert wait_recovered(faults) < 30
    wait_whole(faults, faults.models)
    monitor.stop()
    assert not monitor.untruthful_after(killed_at, grace_s=0.5), "ready while the orchestrator was dead"
    assert send(faults, "grpc_stream", steps=3, unet="cascade").metadata["cascade"].get("gate_error") is None


def test_component_that_raises_fails_only_its_own_call(faults):
    faults.inject(contract.UNET, "raise", times=1)  # one call fails: the request alone in it fails
    first = send(faults, "grpc_unary", steps=3)
    after = [send(faults, path, steps=3) for path in ("grpc_stream", "grpc_unary", "http")]
    assert_answered_once([first] + after)
    assert first.code == "INTERNAL" and first.error == "INTERNAL: unet failed"
    assert all(o.ok for o in after)


def test_component_that_hangs_past_its_deadline_is_restarted(faults):
    monitor = ReadinessMonitor(faults)
    faults.inject(contract.UNET, "hang", times=1)
    start = time.monotonic()
    outcomes = Burst(faults, each_path(1, steps=4)).wait()
    assert_answered_once(outcomes)
    failed = [o for o in outcomes if not o.ok]  # the hung call's requests, then those that met the restart
    assert all(o.code == "UNAVAILABLE" and o.error.startswith("UNAVAILABLE: unet ") for o in failed)
    assert any("unet did not answer within 3 s" in o.error for o in failed)
    assert all(o.elapsed_s < COMPONENT_TIMEOUT_S + 5 for o in outcomes)
    assert wait_recovered(faults) < 30
    monitor.stop()
    assert not monitor.untruthful_after(start + COMPONENT_TIMEOUT_S)


@pytest.mark.parametrize("model, message", [
    (contract.UNET, "unet produced non-finite latents"),
    (contract.VAE_DECODER, "vae_decoder returned a malformed image batch"),
])
def test_component_returning_garbage_fails_its_request_with_a_clear_message(faults, model, message):
    faults.inject(model, "garbage", times=1)
    outcome = send(faults, "http", steps=3)
    assert_answered_once([outcome])
    assert outcome.error == f"INTERNAL: {message}"
    assert send(faults, "grpc_unary", steps=3).ok


def test_gate_that_raises_keeps_the_light_answer(faults):
    faults.inject(contract.QUALITY_GATE, "raise", times=1)
    outcome = send(faults, "grpc_stream", steps=3, unet="cascade")
    assert outcome.ok and outcome.metadata["cascade"]["gate_error"] == "quality_gate failed"


VANISHING_CLIENT = """
import sys
from triffusion.client import start_stream_generation
start_stream_generation("a cat", url=sys.argv[1], steps=100, height=256, width=256,
                        on_progress=lambda step, steps: print(step, flush=True))
sys.stdin.read()
"""


def test_client_that_vanishes_mid_stream_frees_its_work(faults):
    """A client process killed mid-stream: its connection drops, the front sees the cancellation and the
    orchestrator stops the work at its next step boundary."""
    import subprocess
    import sys

    cancelled = lambda: _metric(faults, 'triffusion_requests_total{outcome="cancelled"}')
    before = cancelled()
    client = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, faults.grpc], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "1"  # the first step streamed back: the request is running
    client.kill()
    client.wait()
    deadline = time.monotonic() + 10
    while cancelled() <= before and time.monotonic() < deadline:
        time.sleep(0.1)  # the front checks its clients every 0.5 s
    assert cancelled() > before, "the vanished client's request kept running"


def _metric(server, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(server.metrics, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


HUGE = 1 << 62


def _malformed_grpc(server, model: str, inputs: list[dict]) -> str:
    """Every input declared with an absurd leading dimension (the byte size overflows) and no data."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(server.grpc) as channel:
        request = service_pb2.ModelInferRequest(model_name=model)
        for spec in inputs:
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = spec["name"], spec["datatype"]
            tensor.shape.extend([HUGE] + [4] * (len(spec["shape"]) - 1))
            request.raw_input_contents.append(b"")
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            return "OK"
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{model}: no answer in 30 s"
            return exc.code().name


def _malformed_http(server, model: str, inputs: list[dict]) -> int:
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"inputs": [{"name": spec["name"], "datatype": spec["datatype"],
                                   "shape": [HUGE] + [4] * (len(spec["shape"]) - 1), "data": [1]}
                                  for spec in inputs]}).encode()
    request = urllib.request.Request(f"http://{server.http}/v2/models/{model}/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_malformed_declared_shapes_to_every_model_over_both_protocols(faults):
    """Bundled Triton 2.51 aborts on such HTTP/JSON requests (the edge refuses them first) and loses the
    stub of a python model with a variable dim on such gRPC requests (the supervisor reloads it)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(faults.grpc)
    models = sorted(p.name for p in faults.repo.iterdir() if (p / "config.pbtxt").exists())
    assert {contract.UNET, contract.TEXT_TO_IMAGE, contract.ORCHESTRATOR} <= set(models)
    metadata = {m: client.get_model_metadata(m, as_json=True)["inputs"] for m in models}
    monitor = ReadinessMonitor(faults)
    start = time.monotonic()
    answers = {}
    for model in models:
        answers[model] = (_malformed_grpc(faults, model, metadata[model]), _malformed_http(faults, model, metadata[model]))
    recovered_s = wait_recovered(faults)
    monitor.stop()
    assert all(grpc_code != "OK" for grpc_code, _ in answers.values()), answers
    assert all(status == 400 for _, status in answers.values()), answers  # the edge, not a crash
    assert faults.server.process.poll() is None, "tritonserver died"
    assert recovered_s < 30
    assert not monitor.untruthful_after(start, grace_s=1.0)
