"""Python client: `generate(...)` returns the image and its metadata, over gRPC (streamed progress,
cancellation) or HTTP, built on tritonclient."""

from __future__ import annotations

import json
import queue
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from triffusion import contract

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
NUMPY_TYPES = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_, "BYTES": np.object_}
KNOWN_INPUTS = {spec.name: spec.dtype for spec in contract.REQUEST_INPUTS}


class GenerationError(RuntimeError):
    """The server refused or failed the request; `status` is the transport's status code."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class GenerationResult:
    array: np.ndarray  # (H, W, 3) uint8
    metadata: dict

    @property
    def image(self) -> Image.Image:
        return Image.fromarray(self.array)


def _dtype_of(name: str, value: Any) -> str:
    if name in KNOWN_INPUTS:
        return KNOWN_INPUTS[name]
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT32"
    if isinstance(value, float):
        return "FP32"
    return "BYTES"


def request_arrays(prompt: str, **fields: Any) -> dict[str, tuple[np.ndarray, str]]:
    """Named [1]-shaped arrays for the fields that are set; the server fills the rest."""
    arrays = {}
    for name, value in {"prompt": prompt, **fields}.items():
        if value is None:
            continue
        dtype = _dtype_of(name, value)
        data = str(value).encode("utf-8") if dtype == "BYTES" else value
        arrays[name] = (np.array([data], dtype=NUMPY_TYPES[dtype]), dtype)
    return arrays


def _inputs(module, arrays):
    inputs = []
    for name, (array, dtype) in arrays.items():
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _result(response) -> GenerationResult:
    return GenerationResult(array=response.as_numpy("image"),
                            metadata=json.loads(response.as_numpy("metadata")[0]))


# Server messages lead with Triton's code; streamed errors reach the client without a status.
STREAM_STATUS = {"INVALID_ARG": "StatusCode.INVALID_ARGUMENT", "UNAVAILABLE": "StatusCode.UNAVAILABLE",
                 "CANCELLED": "StatusCode.CANCELLED", "INTERNAL": "StatusCode.INTERNAL"}


def _error(exc, url: str) -> GenerationError:
    status = str(exc.status()) if hasattr(exc, "status") and exc.status() is not None else None
    message = exc.message() if hasattr(exc, "message") else str(exc)
    status = status or STREAM_STATUS.get(message.partition(": ")[0])
    if status in ("StatusCode.UNAVAILABLE", None) and ("connect" in message.lower() or "refused" in message.lower()):
        return GenerationError(f"cannot reach the server at {url}: {message}", status)
    return GenerationError(message, status)


class GenerationHandle:
    """A streamed gRPC generation in flight: `result()` waits for it, `cancel()` stops it."""

    def __init__(self, url: str, arrays, on_progress: Callable[[int, int], None] | None, timeout_s: float | None,
                 on_preview: Callable[[np.ndarray], None] | None = None):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self.url, self.on_progress, self.on_preview = url, on_progress, on_preview
        self._events: queue.Queue = queue.Queue()
        self._outcome: GenerationResult | GenerationError | None = None
        self.client = grpcclient.InferenceServerClient(url)
        try:
            self.client.start_stream(callback=self._on_response, stream_timeout=timeout_s)
            self.client.async_stream_infer(contract.TEXT_TO_IMAGE_STREAM, _inputs(grpcclient, arrays),
                                           request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        except InferenceServerException as exc:
            self.client.close()
            raise _error(exc, url) from None

    def _on_response(self, result, error) -> None:
        if error is not None:
            self._events.put(_error(error, self.url))
            return
        if result.as_numpy("progress") is not None:
            step, steps = (int(x) for x in result.as_numpy("progress"))
            if self.on_progress:
                self.on_progress(step, steps)
        if result.as_numpy("preview") is not None and self.on_preview:
            self.on_preview(result.as_numpy("preview"))
        if result.as_numpy("image") is not None:
            self._events.put(_result(result))

    def result(self, timeout: float | None = None) -> GenerationResult:
        if self._outcome is None:
            try:
                self._outcome = self._events.get(timeout=timeout)
            except queue.Empty:
                self.cancel()
                raise GenerationError(f"no result within {timeout} s", "timeout") from None
            finally:
                self._close()
        if isinstance(self._outcome, GenerationError):
            raise self._outcome
        return self._outcome

    def cancel(self) -> None:
        """Cancel on the server: the request stops at its next step boundary and frees its slot."""
        self.client.stop_stream(cancel_requests=True)
        self._outcome = self._outcome or GenerationError("cancelled by the client", "cancelled")
        self._close()

    def _close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def start_stream_generation(prompt: str, *, url: str | None = None,
                            on_progress: Callable[[int, int], None] | None = None,
                            on_preview: Callable[[np.ndarray], None] | None = None,
                            timeout_s: float | None = None, **fields: Any) -> GenerationHandle:
    """Start a streamed generation over gRPC against the streaming front; with `preview_every`,
    on_preview receives (h, w, 3) latent-resolution previews."""
    fields["stream"] = True
    return GenerationHandle(url or DEFAULT_URLS["grpc"], request_arrays(prompt, **fields), on_progress, timeout_s,
                            on_preview)


def generate(prompt: str, *, url: str | None = None, protocol: str = "grpc", stream: bool = False,
             on_progress: Callable[[int, int], None] | None = None, timeout_s: float | None = None,
             **fields: Any) -> GenerationResult:
    """Generate one image. Fields: negative_prompt, height, width, steps, guidance_scale, seed, scheduler,
    and any further request input by name. gRPC with `stream` or `on_progress` streams progress."""
    if protocol not in DEFAULT_URLS:
        raise ValueError(f"protocol '{protocol}' is unknown; choose grpc or http")
    url = url or DEFAULT_URLS[protocol]
    if protocol == "grpc" and (stream or on_progress):
        return start_stream_generation(prompt, url=url, on_progress=on_progress, timeout_s=timeout_s,
                                       **fields).result(timeout_s)
    arrays = request_arrays(prompt, **fields)
    from tritonclient.utils import InferenceServerException

    if protocol == "grpc":
        import tritonclient.grpc as module

        client = module.InferenceServerClient(url)
        call = lambda: client.infer(contract.TEXT_TO_IMAGE, _inputs(module, arrays), client_timeout=timeout_s)
    else:
        import tritonclient.http as module

        client = module.InferenceServerClient(url, network_timeout=timeout_s or 600.0,
                                              connection_timeout=timeout_s or 60.0)
        call = lambda: client.infer(contract.TEXT_TO_IMAGE, _inputs(module, arrays))
    try:
        return _result(call())
    except InferenceServerException as exc:
        raise _error(exc, url) from None
    except (ConnectionError, OSError) as exc:
        raise GenerationError(f"cannot reach the server at {url}: {exc}") from None
    finally:
        client.close()
