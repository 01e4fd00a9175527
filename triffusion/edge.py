"""The HTTP edge: the public HTTP port of `triffusion serve`, in front of tritonserver's own HTTP port
(which then listens on localhost only).

The bundled tritonserver 2.51 aborts (the whole process) on an HTTP/JSON inference request whose
declared shape makes its byte size overflow: the frontend sizes a buffer from the declared shape before
any check (fixed upstream in 25.06-26.04: #8174, #8432, #8489, #8676). The edge reads each inference
request's JSON header first and refuses a declared shape that is negative, absurd or larger than
`max_input_bytes`, with 400 and a message naming the input. Everything else passes through unchanged;
while tritonserver restarts, clients get 503 instead of a refused connection."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import zlib

log = logging.getLogger("triffusion.edge")

DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
               "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 1}
INFER = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/(infer|generate|generate_stream)$")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"}


def check_infer(body: bytes, header_length: int | None, max_input_bytes: int) -> str | None:
    """Why this inference request body must not reach tritonserver, or None. Only the JSON header is read."""
    header = body[:header_length] if header_length is not None else body
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        return None  # not JSON: Triton refuses it on its own without sizing anything
    if not isinstance(request, dict) or not isinstance(request.get("inputs", []), list):
        return None
    for index, tensor in enumerate(request.get("inputs", [])):
        if not isinstance(tensor, dict):
            continue
        name, shape = tensor.get("name", f"inputs[{index}]"), tensor.get("shape")
        if shape is None:
            continue
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            return f"input '{name}': shape must be a list of integers"
        if any(d < 0 for d in shape):
            return f"input '{name}': shape {shape} has a negative dimension"
        count = 1
        for dim in shape:
            count *= dim  # Python integers do not overflow
        size = count * DTYPE_BYTES.get(str(tensor.get("datatype")), 8)
        if size > max_input_bytes:
            return (f"input '{name}': shape {shape} declares {size} bytes; this server accepts up to "
                    f"{max_input_bytes} bytes per input")
    return None


class HttpEdge:
    """An aiohttp reverse proxy on its own thread and event loop."""

    def __init__(self, host: str, port: int, upstream_port: int, *, max_input_bytes: int = 64 << 20,
                 max_body_bytes: int = 256 << 20):
        self.host, self.port, self.upstream = host, port, f"http://127.0.0.1:{upstream_port}"
        self.max_input_bytes, self.max_body_bytes = max_input_bytes, max_body_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> "HttpEdge":
        self._thread = threading.Thread(target=self._serve, name="triffusion-http-edge", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        timeout = ClientTimeout(total=None, sock_connect=5)
        async with ClientSession(connector=TCPConnector(limit=0), timeout=timeout, auto_decompress=False) as session:
            self._session = session
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
            self._ready.set()
            await self._stopping.wait()
            await runner.cleanup()

    async def _handle(self, request):
        from aiohttp import ClientConnectionError, web

        body = await request.read()
        drop = HOP_BY_HOP - {"content-encoding"}
        if request.headers.get("Content-Encoding", "").lower() in ("gzip", "deflate"):
            body = self._decompress(body, request.headers["Content-Encoding"].lower())
            if body is None:
                return web.json_response({"error": f"INVALID_ARG: the request body inflates past "
                                                   f"{self.max_body_bytes} bytes"}, status=413)
            drop = HOP_BY_HOP  # forwarded inflated
        if request.method == "POST" and INFER.match(request.path):
            length = request.headers.get("Inference-Header-Content-Length")
            problem = check_infer(body, int(length) if length and length.isdigit() else None, self.max_input_bytes)
            if problem:
                return web.json_response({"error": f"INVALID_ARG: {problem}"}, status=400)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        try:
            async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                             headers=headers) as upstream:
                reply = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP - {"content-encoding"}}
                if upstream.headers.get("Content-Length") is not None:
                    return web.Response(status=upstream.status, body=await upstream.read(), headers=reply)
                response = web.StreamResponse(status=upstream.status, headers=reply)  # e.g. generate_stream
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except ClientConnectionError:
            return web.json_response({"error": "UNAVAILABLE: the server is restarting; retry shortly"}, status=503)

    def _decompress(self, body: bytes, encoding: str) -> bytes | None:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            out = inflater.decompress(body, self.max_body_bytes + 1)
        except zlib.error:
            return body  # not what it claims: let Triton say so
        return None if len(out) > self.max_body_bytes or inflater.unconsumed_tail else out
