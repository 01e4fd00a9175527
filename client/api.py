"""Python client: `generate(...)` returns the image and its metadata, over gRPC (streamed progress,
cancellation) or HTTP, built on tritonclient."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from triffusion import contract

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
DEFAULT_URLS = {protocol: f"localhost:{port}" for protocol, port in DEFAULT_PORTS.items()}
PROTOCOL_NAMES = {"grpc": "gRPC", "http": "HTTP"}
# First contact (is_server_live) gets this long: a wrong port or protocol fails in seconds, not minutes.
CONNECT_TIMEOUT_S = 3.0
NUMPY_TYPES = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_, "BYTES": np.object_,
               "UINT8": np.uint8}
KNOWN_INPUTS = {spec.name: spec.dtype for spec in contract.REQUEST_INPUTS + contract.CONTROL_INPUTS}


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
        if name in contract.ARRAY_INPUTS:  # the control image: (H, W, 3) uint8 as it is
            arrays[name] = (image_array(value), KNOWN_INPUTS[name])
            continue
        dtype = _dtype_of(name, value)
        data = str(value).encode("utf-8") if dtype == "BYTES" else value
        arrays[name] = (np.array([data], dtype=NUMPY_TYPES[dtype]), dtype)
    return arrays


def image_array(image) -> np.ndarray:
    """A control image (a path, a PIL image or an (H, W, 3) array) as the (H, W, 3) uint8 array the server
    takes. Nothing is resized or converted beyond RGB: the server checks its size against height and width."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(image)


def _inputs(module, arrays):
    inputs = []
    for name, (array, dtype) in arrays.items():
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer_inputs(module, fields: dict) -> list:
    """tritonclient InferInputs (`module`: tritonclient.grpc or .http) for request `fields` (prompt included)."""
    return _inputs(module, request_arrays(**fields))


def error_message(exc) -> str:
    """The server's message of a tritonclient exception (its code first), else the exception's text."""
    return exc.message() if hasattr(exc, "message") and exc.message() else str(exc)


def _result(response) -> GenerationResult:
    return GenerationResult(array=response.as_numpy("image"),
                            metadata=json.loads(response.as_numpy("metadata")[0]))


# Server messages lead with Triton's code; streamed errors reach the client without a status.
STREAM_STATUS = {"INVALID_ARG": "StatusCode.INVALID_ARGUMENT", "UNAVAILABLE": "StatusCode.UNAVAILABLE",
                 "CANCELLED": "StatusCode.CANCELLED", "INTERNAL": "StatusCode.INTERNAL"}


def _error(exc, url: str, timeout_s: float | None = None) -> GenerationError:
    status = str(exc.status()) if hasattr(exc, "status") and exc.status() is not None else None
    message = exc.message() if hasattr(exc, "message") else str(exc)
    status = status or STREAM_STATUS.get(message.partition(": ")[0])
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return GenerationError(f"no result within the {timeout_s:g} s timeout; the server was told to stop"
                               if timeout_s else f"DEADLINE_EXCEEDED: {message}", status)
    if status in ("StatusCode.UNAVAILABLE", None) and ("connect" in message.lower() or "refused" in message.lower()):
        return GenerationError(f"cannot reach the server at {url}: {message}", status)
    return GenerationError(message, status)


# ---- first contact ---------------------------------------------------------------------------
def _why(exc: BaseException, timeout_s: float) -> str:
    """A few words on why a liveness probe failed."""
    text = " ".join(str(exc).split()).lower()
    if "refused" in text:
        return "connection refused"
    if isinstance(exc, TimeoutError) or "deadline" in text or "timed out" in text or "timeout" in text:
        return f"no answer within {timeout_s:g} s"
    if any(word in text for word in ("dns", "resolv", "lookup", "name or service not known", "nodename")):
        return "the host name does not resolve"
    if "socket closed" in text or "expected http/" in text or "parse" in text or "protocol" in text:
        return "it does not answer that protocol"
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def _probe(url: str, protocol: str, timeout_s: float, client=None) -> str | None:
    """None when a server answers Triton's liveness call over `protocol` at url within timeout_s, else why not.
    `client`: a gRPC client to reuse (its channel then carries the request that follows)."""
    own = client is None
    try:
        if protocol == "grpc":
            if own:
                import tritonclient.grpc as grpcclient

                client = grpcclient.InferenceServerClient(url)
            client.is_server_live(client_timeout=timeout_s)
        else:
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
            client.is_server_live()
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"; the reason is reported
        return _why(exc, timeout_s)
    finally:
        if own and client is not None:
            client.close()
    return None  # live or not, a Triton server answered: its own answer to the request says more


def check_endpoint(url: str, protocol: str, timeout_s: float = CONNECT_TIMEOUT_S, client=None) -> None:
    """Raise GenerationError (status "unreachable") with one line unless a Triton `protocol` endpoint answers
    at url within timeout_s; when the other protocol answers there, the message says so."""
    why = _probe(url, protocol, timeout_s, client)
    if why is None:
        return
    name = PROTOCOL_NAMES[protocol]
    other = "http" if protocol == "grpc" else "grpc"
    if _probe(url, other, timeout_s) is None:
        hint = (f"that is Triton's {PROTOCOL_NAMES[other]} port: use protocol {other} there, or {name}'s port, "
                f"{DEFAULT_PORTS[protocol]} by default")
    else:
        hint = f"{why}; is tritonserver running there? {name} listens on {DEFAULT_PORTS[protocol]} by default"
    raise GenerationError(f"cannot reach a Triton {name} endpoint at {url} ({hint})", "unreachable")


class GenerationHandle:
    """A streamed gRPC generation in flight: `result()` waits for it, `cancel()` stops it on the server (the
    request frees its slot at its next step boundary). Ctrl-C while in `result()` cancels too."""

    def __init__(self, url: str, arrays, on_progress: Callable[[int, int], None] | None, timeout_s: float | None,
                 on_preview: Callable[[np.ndarray], None] | None = None,
                 connect_timeout_s: float | None = CONNECT_TIMEOUT_S):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self.url, self.on_progress, self.on_preview, self.timeout_s = url, on_progress, on_preview, timeout_s
        self._events: queue.Queue = queue.Queue()
        self._outcome: GenerationResult | GenerationError | None = None
        self.client = grpcclient.InferenceServerClient(url)
        try:
            if connect_timeout_s:
                check_endpoint(url, "grpc", connect_timeout_s, client=self.client)
            self.client.start_stream(callback=self._on_response, stream_timeout=timeout_s)
            self.client.async_stream_infer(contract.TEXT_TO_IMAGE_STREAM, _inputs(grpcclient, arrays),
                                           request_id=uuid.uuid4().hex, enable_empty_final_response=True,
                                           timeout=_microseconds(timeout_s))
        except InferenceServerException as exc:
            self.client.close()
            raise _error(exc, url, timeout_s) from None
        except BaseException:
            self.client.close()
            raise

    def _on_response(self, result, error) -> None:
        if error is not None:
            self._events.put(_error(error, self.url, self.timeout_s))
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
        """Wait for the image; on `timeout` (seconds) or KeyboardInterrupt the request is cancelled on the
        server first (GenerationError with status "timeout", or the KeyboardInterrupt, follows)."""
        if self._outcome is None:
            try:
                self._outcome = self._events.get(timeout=timeout)
            except queue.Empty:
                self.cancel()
                raise GenerationError(f"no result within the {timeout:g} s timeout; the server was told to stop",
                                      "timeout") from None
            except BaseException:  # KeyboardInterrupt, SystemExit: stop the work before leaving
                self.cancel()
                raise
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


def _microseconds(timeout_s: float | None) -> int | None:
    """The request's own timeout for the server (the fronts cancel the work once it passed)."""
    return max(1, int(timeout_s * 1e6)) if timeout_s else None


def start_stream_generation(prompt: str, *, url: str | None = None,
                            on_progress: Callable[[int, int], None] | None = None,
                            on_preview: Callable[[np.ndarray], None] | None = None,
                            timeout_s: float | None = None, connect_timeout_s: float | None = CONNECT_TIMEOUT_S,
                            **fields: Any) -> GenerationHandle:
    """Start a streamed generation over gRPC against the streaming front; with `preview_every`,
    on_preview receives (h, w, 3) latent-resolution previews. Raises GenerationError at once when no Triton
    gRPC endpoint answers at url within connect_timeout_s (None: no such check)."""
    fields["stream"] = True
    return GenerationHandle(url or DEFAULT_URLS["grpc"], request_arrays(prompt, **fields), on_progress, timeout_s,
                            on_preview, connect_timeout_s)


def generate(prompt: str, *, url: str | None = None, protocol: str = "grpc", stream: bool = False,
             on_progress: Callable[[int, int], None] | None = None, timeout_s: float | None = None,
             connect_timeout_s: float | None = CONNECT_TIMEOUT_S, **fields: Any) -> GenerationResult:
    """Generate one image. Fields: any request input by name (negative_prompt, height, width, steps,
    guidance_scale, seed, scheduler, slo_ms, priority, min_steps, step_mode, unet, lora ("name:scale,..."
    of registered adapters), controlnet with control_image (a path, PIL image or (H, W, 3) uint8 array of the
    request's size) and controlnet_scale; preview_every needs a stream). gRPC with `stream` or `on_progress` streams progress.

    timeout_s: the request's deadline; the server stops the work once it passed (gRPC: the call's deadline
    too). connect_timeout_s: how long the first contact (a liveness call) may take before GenerationError
    says that nothing, or the other protocol, answers at url (None: no such check).
    A KeyboardInterrupt while waiting cancels the request on the server over gRPC (streamed or unary)."""
    if protocol not in DEFAULT_URLS:
        raise ValueError(f"protocol '{protocol}' is unknown; choose grpc or http")
    url = url or DEFAULT_URLS[protocol]
    if protocol == "grpc" and (stream or on_progress):
        return start_stream_generation(prompt, url=url, on_progress=on_progress, timeout_s=timeout_s,
                                       connect_timeout_s=connect_timeout_s, **fields).result(timeout_s)
    arrays = request_arrays(prompt, **fields)
    if protocol == "grpc":
        return _unary_grpc(url, arrays, timeout_s, connect_timeout_s)
    return _unary_http(url, arrays, timeout_s, connect_timeout_s)


def _unary_grpc(url: str, arrays, timeout_s: float | None, connect_timeout_s: float | None) -> GenerationResult:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        if connect_timeout_s:
            check_endpoint(url, "grpc", connect_timeout_s, client=client)
        done = threading.Event()
        answer: dict = {}

        def on_answer(result, error):
            answer.update(result=result, error=error)
            done.set()

        call = client.async_infer(contract.TEXT_TO_IMAGE, _inputs(grpcclient, arrays), on_answer,
                                  timeout=_microseconds(timeout_s), client_timeout=timeout_s)
        try:
            done.wait()
        except BaseException:  # KeyboardInterrupt: cancel the RPC, which cancels the request on the server
            call.cancel()
            raise
        if answer["error"] is not None:
            raise _error(answer["error"], url, timeout_s)
        return _result(answer["result"])
    except InferenceServerException as exc:
        raise _error(exc, url, timeout_s) from None
    finally:
        client.close()


def _unary_http(url: str, arrays, timeout_s: float | None, connect_timeout_s: float | None) -> GenerationResult:
    """Over HTTP the server learns of no client going away: only timeout_s (the request's `timeout`
    parameter) makes it stop early."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    if connect_timeout_s:
        check_endpoint(url, "http", connect_timeout_s)
    # The server answers CANCELLED once timeout_s passed; the socket waits a little longer for that answer.
    client = httpclient.InferenceServerClient(url, connection_timeout=connect_timeout_s or 60.0,
                                              network_timeout=timeout_s + 10.0 if timeout_s else 600.0)
    try:
        return _result(client.infer(contract.TEXT_TO_IMAGE, _inputs(httpclient, arrays),
                                    timeout=_microseconds(timeout_s)))
    except InferenceServerException as exc:
        raise _error(exc, url, timeout_s) from None
    except (ConnectionError, OSError) as exc:
        raise GenerationError(f"cannot reach the server at {url}: {exc}") from None
    finally:
        client.close()
