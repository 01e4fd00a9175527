"""Every BLS call goes through `infer`: it checks the response it got, names the callee in errors, hands
tensors over without copies where it can (DLPack for torch tensors, GPU outputs as torch tensors) and
has a deadline: a callee that does not answer in time fails its requests with UNAVAILABLE, and its
stub is killed so that the supervisor reloads it (a hang becomes a restart)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion import contract, procs
from triffusion.orchestrator.errors import ComponentFailed, ComponentUnavailable, InvalidRequest, ServingError
from triffusion.orchestrator.executor import run_controlnet

log = logging.getLogger(__name__)

# What Triton 2.51 says when the callee's stub died, is being reloaded or was unloaded: retryable.
_UNAVAILABLE = ("not healthy", "not ready", "no available versions", "unknown model", "unavailable")


def _tensor(name: str, value) -> "pb_utils.Tensor":
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, np.ascontiguousarray(value))
    from torch.utils.dlpack import to_dlpack  # torch tensor, CPU or GPU

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


def request_input(request, name: str):
    """A request input as the fronts' validation takes it: an array for contract.ARRAY_INPUTS (the control
    image), else request_scalar's value."""
    if name not in contract.ARRAY_INPUTS:
        return request_scalar(request, name)
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def request_scalar(request, name: str):
    """One request input of shape [1] (or [1, 1] under dynamic batching) as a Python value (BYTES stay
    bytes: their length is checked before anything decodes them); None if absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise InvalidRequest(name, f"has {array.size} elements; every request field has shape [1]")
    value = array.reshape(-1)[0]
    return value if isinstance(value, bytes) else value.item()


# The bundled python backend (r24.10) is not safe for response senders used from several threads at once:
# concurrent send() and is_cancelled() calls crash the stub (SIGSEGV in libpython or in its shared-memory
# code), measured under load with 8 concurrent streams. Every sender call in this process goes through here.
_SENDER = threading.Lock()


def send(sender, response, final: bool = False) -> None:
    with _SENDER:
        if final:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            sender.send(response)


def is_cancelled(sender) -> bool:
    with _SENDER:
        return sender.is_cancelled()


def triton_error(error: ServingError) -> "pb_utils.TritonError":
    """A client-facing error: the code leads the message too, because gRPC stream responses carry no
    status code (tritonclient's stream callback only sees the message)."""
    return pb_utils.TritonError(f"{error.code.value}: {error.message}", getattr(pb_utils.TritonError, error.code.value))


def classify(component: str, message: str) -> ServingError:
    """A callee's error response as a typed failure (the raw message goes to the log only)."""
    lowered = message.lower()
    if any(marker in lowered for marker in _UNAVAILABLE):
        return ComponentUnavailable(component, "is restarting; retry shortly")
    return ComponentFailed(component, "failed")


def _output(tensor):
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack  # a GPU output (TensorRT, torch runtime): stays on the GPU

    return from_dlpack(tensor.to_dlpack())


def infer(model: str, inputs: dict, outputs: list[str]) -> dict:
    request = pb_utils.InferenceRequest(model_name=model, inputs=[_tensor(k, v) for k, v in inputs.items()],
                                        requested_output_names=outputs)
    response = request.exec()
    if response.has_error():
        message = response.error().message()
        log.warning("%s answered with an error: %s", model, message)
        raise classify(model, message)
    result = {}
    for name in outputs:
        tensor = pb_utils.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise ComponentFailed(model, f"answered without its output '{name}'")
        result[name] = _output(tensor)
    return result


class Deadlines:
    """Blocking BLS calls run on worker threads so that each has a deadline, and so that the caller can
    watch the callee meanwhile:
    - a callee whose stub is gone fails the call at once (Triton 2.51 would answer after about a second,
      and never restarts the stub; the supervisor reloads it);
    - a call past its deadline fails with UNAVAILABLE and the callee's stub is killed: Triton 2.51 cannot
      cancel a BLS call, and a stub that hangs would otherwise hold every later request."""

    POLL_S = 0.05

    def __init__(self, timeout_s: float, workers: int = 8, server_pid: int | None = None):
        self.timeout_s = timeout_s
        self.server_pid = os.getppid() if server_pid is None else server_pid
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="triffusion-bls")
        self._pids: dict[str, list[int]] = {}  # component -> stub pids, looked up when needed

    def _stub_gone(self, component: str) -> bool:
        pids = self._pids.get(component)
        if not pids or not all(procs.alive(pid) for pid in pids):
            pids = list(procs.stubs_of(self.server_pid, component).values())
            self._pids[component] = pids
        return not pids

    def call(self, component: str, fn, *args):
        if self._stub_gone(component):
            raise ComponentUnavailable(component, "is restarting; retry shortly")
        future = self._pool.submit(fn, *args)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return future.result(timeout=min(self.POLL_S, max(deadline - time.monotonic(), 0.0)))
            except FutureTimeout:
                pass
            if self._stub_gone(component):
                raise ComponentUnavailable(component, "stopped during the call; it is being restarted, retry shortly")
            if time.monotonic() >= deadline:
                log.error("%s did not answer within %.1f s; killing its stub so that it is reloaded",
                          component, self.timeout_s)
                kill_stubs(component, self.server_pid)
                raise ComponentUnavailable(component, f"did not answer within {self.timeout_s:.0f} s; "
                                                      "it is being restarted, retry shortly")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def kill_stubs(model: str, server_pid: int | None = None) -> None:
    """SIGKILL the stubs of `model` (siblings of this stub under the same tritonserver)."""
    for instance, pid in procs.stubs_of(os.getppid() if server_pid is None else server_pid, model).items():
        log.error("killing the stub of %s (pid %d)", instance, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class TritonExecutor:
    """Executor over BLS: the component models are separate Triton models, each call with a deadline."""

    def __init__(self, deadlines: Deadlines, text_encoder: str = contract.TEXT_ENCODER,
                 vae_decoder: str = contract.VAE_DECODER):
        self.deadlines, self.text_encoder, self.vae_decoder = deadlines, text_encoder, vae_decoder

    def _call(self, model, inputs, output):
        return self.deadlines.call(model, infer, model, inputs, [output])[output]

    def encode(self, input_ids):
        return self._call(self.text_encoder, {"input_ids": input_ids}, "text_embeddings")

    def denoise(self, model, sample, timestep, text_embeddings, **residuals):
        return self._call(model, {"sample": sample, "timestep": timestep, "encoder_hidden_states": text_embeddings,
                                  **residuals}, "noise_pred")

    def controlnet(self, model, sample, timestep, text_embeddings, control_image, scale):
        return self._call(model, {"sample": sample, "timestep": timestep, "encoder_hidden_states": text_embeddings,
                                  "controlnet_cond": control_image, "conditioning_scale": scale}, "residuals")

    def decode(self, latent):
        return self._call(self.vae_decoder, {"latent": latent}, "image")

    def score(self, images, prompts=None):
        inputs = {"image": images}
        if prompts is not None:
            inputs["prompt"] = np.array([p.encode("utf-8") for p in prompts], dtype=np.object_)
        return self._call(contract.QUALITY_GATE, inputs, "score")


class InProcessUNetExecutor(TritonExecutor):
    """Text encoder and VAE over BLS (once per request), UNet steps in this process: the per-step BLS
    round trip (about 4 ms with GPU tensors on an H100) disappears and latents never leave."""

    def __init__(self, unets: dict, deadlines: Deadlines, controlnets: dict | None = None, **names):
        super().__init__(deadlines, **names)
        self.unets = unets  # the controlled UNet (unet_control) too, when ControlNets are served
        self.controlnets = controlnets or {}  # ControlNets run here too: their residuals stay on the device

    def denoise(self, model, sample, timestep, text_embeddings, **residuals):
        return self.unets[model].run({"sample": sample, "timestep": timestep,
                                      "encoder_hidden_states": text_embeddings, **residuals})["noise_pred"]

    def controlnet(self, model, sample, timestep, text_embeddings, control_image, scale):
        return run_controlnet(self.controlnets[model], sample, timestep, text_embeddings, control_image, scale)
