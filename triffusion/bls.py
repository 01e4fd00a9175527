"""Every BLS call goes through `infer`: it checks the response it got, names the callee in errors,
and hands tensors over without copies where it can (DLPack for torch tensors)."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from triffusion import contract


class ComponentError(RuntimeError):
    pass


def _tensor(name: str, value) -> "pb_utils.Tensor":
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, np.ascontiguousarray(value))
    from torch.utils.dlpack import to_dlpack  # torch tensor, CPU or GPU

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


def request_scalar(request, name: str):
    """One request input of shape [1] (or [1, 1] under dynamic batching) as a Python value; None if absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value.item()


def infer(model: str, inputs: dict, outputs: list[str]) -> dict[str, np.ndarray]:
    request = pb_utils.InferenceRequest(model_name=model, inputs=[_tensor(k, v) for k, v in inputs.items()],
                                        requested_output_names=outputs)
    response = request.exec()
    if response.has_error():
        raise ComponentError(f"{model}: {response.error().message()}")
    result = {}
    for name in outputs:
        tensor = pb_utils.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise ComponentError(f"{model}: response has no output '{name}'")
        result[name] = tensor.as_numpy() if tensor.is_cpu() else tensor  # GPU tensors stay on the GPU
    return result


class TritonExecutor:
    """Executor over BLS: the component models are separate Triton models."""

    def __init__(self, text_encoder: str = contract.TEXT_ENCODER, vae_decoder: str = contract.VAE_DECODER):
        self.text_encoder, self.vae_decoder = text_encoder, vae_decoder

    def encode(self, input_ids):
        return infer(self.text_encoder, {"input_ids": input_ids}, ["text_embeddings"])["text_embeddings"]

    def denoise(self, model, sample, timestep, text_embeddings):
        return infer(model, {"sample": sample, "timestep": timestep, "encoder_hidden_states": text_embeddings},
                     ["noise_pred"])["noise_pred"]

    def decode(self, latent):
        return infer(self.vae_decoder, {"latent": latent}, ["image"])["image"]

    def score(self, images, prompts=None):
        inputs = {"image": images}
        if prompts is not None:
            inputs["prompt"] = np.array([p.encode("utf-8") for p in prompts], dtype=np.object_)
        return infer(contract.QUALITY_GATE, inputs, ["score"])["score"]


class InProcessUNetExecutor(TritonExecutor):
    """Text encoder and VAE over BLS (once per request), UNet steps in this process: the per-step BLS
    round trip (about 4 ms with GPU tensors on an H100) disappears and latents never leave."""

    def __init__(self, unets: dict, **names):
        super().__init__(**names)
        self.unets = unets

    def denoise(self, model, sample, timestep, text_embeddings):
        return self.unets[model].run({"sample": sample, "timestep": timestep,
                                      "encoder_hidden_states": text_embeddings})["noise_pred"]
