"""A client pointed at the wrong port or protocol is told so in one line, within seconds: through the
Python API (GenerationError) and `triffusion generate` (exit 2)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from triffusion.client import GenerationError, generate, start_stream_generation
from triffusion.server import free_port

OTHER = {"grpc": "http", "http": "grpc"}
NAMES = {"grpc": "gRPC", "http": "HTTP"}


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triffusion.cli", "generate", "a cat", *argv],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closed_port_is_one_line_and_quick(protocol, tmp_path):
    url = f"localhost:{free_port()}"
    started = time.monotonic()
    with pytest.raises(GenerationError) as info:
        generate("a cat", url=url, protocol=protocol)
    assert str(info.value) == (f"cannot reach a Triton {NAMES[protocol]} endpoint at {url} (connection refused; "
                               f"is tritonserver running there? {NAMES[protocol]} listens on "
                               f"{8001 if protocol == 'grpc' else 8000} by default)")
    assert info.value.status == "unreachable"
    done = run_cli("--protocol", protocol, "--url", url, "-o", str(tmp_path / "x.png"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {info.value}"]
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_silent_port_gives_up_at_the_connect_timeout(protocol, silent_port):
    started = time.monotonic()
    with pytest.raises(GenerationError, match=rf"cannot reach a Triton {NAMES[protocol]} endpoint at "
                                              rf"127\.0\.0\.1:{silent_port} \(no answer within 0\.5 s; "):
        generate("a cat", url=f"127.0.0.1:{silent_port}", protocol=protocol, connect_timeout_s=0.5)
    assert time.monotonic() - started < 10  # both protocols probed, 0.5 s each, plus channel set-up


def test_streaming_checks_the_endpoint_first(silent_port):
    with pytest.raises(GenerationError, match="no answer within 0.5 s"):
        start_stream_generation("a cat", url=f"127.0.0.1:{silent_port}", connect_timeout_s=0.5)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_other_protocols_port_is_named(server, protocol, tmp_path):
    """gRPC at the HTTP port and HTTP at the gRPC port: the message says which port that is."""
    url = server.url(OTHER[protocol])
    expected = (f"cannot reach a Triton {NAMES[protocol]} endpoint at {url} (that is Triton's "
                f"{NAMES[OTHER[protocol]]} port: use protocol {OTHER[protocol]} there, or {NAMES[protocol]}'s port, "
                f"{8001 if protocol == 'grpc' else 8000} by default)")
    started = time.monotonic()
    with pytest.raises(GenerationError) as info:
        generate("a cat", steps=2, url=url, protocol=protocol)
    assert str(info.value) == expected
    if protocol == "grpc":
        with pytest.raises(GenerationError, match="that is Triton's HTTP port"):
            start_stream_generation("a cat", steps=2, url=url)
    done = run_cli("--protocol", protocol, "--url", url, "--steps", "2", "-o", str(tmp_path / "x.png"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {expected}"]
    assert time.monotonic() - started < 20
    # The right port still works.
    assert generate("a cat", steps=2, url=server.url(protocol), protocol=protocol).metadata["steps_done"] == 2
