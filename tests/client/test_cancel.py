"""Ctrl-C and deadlines cancel on the real server: the orchestrator frees the request's slot (the
`triffusion_requests_total{outcome="cancelled"}` counter goes up) and a following short request completes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from triffusion.client import GenerationError, generate, start_stream_generation
from triffusion.procs import default_sigint

from .waiting import cancelled, unet_calls, wait_for

pytestmark = pytest.mark.server
# Long enough (100 steps at the largest size) that nothing finishes before it is cancelled.
SLOW = ["slow", "--steps", "100", "--height", "512", "--width", "512", "--seed", "1"]
SLOW_FIELDS = {"steps": 100, "height": 512, "width": 512, "seed": 1}


class Cli:
    """`triffusion generate` in a child process, its stderr collected as it comes (tqdm writes no newlines)."""

    def __init__(self, *argv: str):
        # SIGINT at its default in the child: a suite run in the background inherits it ignored.
        self.proc = subprocess.Popen([sys.executable, "-m", "triffusion.cli", "generate", *argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
        self.err = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while chunk := self.proc.stderr.read1(4096):
            self.err.extend(chunk)

    def interrupt(self, timeout_s: float = 30) -> tuple[int, str, str]:
        """Ctrl-C; returns (exit code, stdout, stderr) and how long the exit took."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout_s)
        self._reader.join(5)
        return code, self.proc.stdout.read().decode(), self.err.decode(), time.monotonic() - started

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def cli_process():
    started = []

    def start(*argv):
        started.append(Cli(*argv))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()


def assert_freed(server, before: float):
    """The server counted the cancellation (slot freed) and serves a short request promptly."""
    wait_for(lambda: cancelled(server) > before, 30, "the server counted the request as cancelled")
    quick = generate("quick", steps=2, seed=3, url=server.grpc, timeout_s=60)
    assert quick.metadata["steps_done"] == 2


def test_ctrl_c_on_a_streamed_generation_cancels_on_the_server(server, cli_process, tmp_path):
    before = cancelled(server)
    out = tmp_path / "slow.png"
    proc = cli_process(*SLOW, "--url", server.grpc, "-o", str(out))
    wait_for(lambda: b"denoising" in proc.err, 120, "the CLI showed progress")
    code, stdout, stderr, took = proc.interrupt()
    assert code == 130 and stdout == ""
    assert stderr.splitlines()[-1] == "cancelled" and "Traceback" not in stderr
    assert took < 10 and not out.exists()
    assert_freed(server, before)


def test_ctrl_c_on_a_unary_grpc_call_cancels_on_the_server(server, cli_process, tmp_path):
    before, calls = cancelled(server), unet_calls(server)
    proc = cli_process(*SLOW, "--no-progress", "--url", server.grpc, "-o", str(tmp_path / "slow.png"))
    wait_for(lambda: unet_calls(server) > calls + 1, 120, "the server denoised the request")
    code, stdout, stderr, took = proc.interrupt()
    assert (code, stdout, stderr) == (130, "", "cancelled\n") and took < 10
    assert_freed(server, before)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, whatever the suite inherited (a suite run in
    the background starts with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_keyboard_interrupt_in_result_cancels_the_stream(server, python_sigint):
    """The Python API: Ctrl-C while waiting in result() cancels on the server before it propagates."""
    before = cancelled(server)
    steps, main = [], threading.main_thread().ident

    def on_progress(step, total):
        steps.append(step)
        if step == 2:  # Ctrl-C, delivered to the main thread while it waits in result()
            signal.pthread_kill(main, signal.SIGINT)

    handle = start_stream_generation("slow", url=server.grpc, on_progress=on_progress, **SLOW_FIELDS)
    with pytest.raises(KeyboardInterrupt):
        handle.result(timeout=120)
    with pytest.raises(GenerationError, match="cancelled by the client"):
        handle.result()
    assert_freed(server, before)
    assert max(steps) < 100


@pytest.mark.parametrize("argv", [[], ["--no-progress"], ["--protocol", "http"]], ids=["stream", "unary", "http"])
def test_timeout_stops_the_work_on_the_server(server, tmp_path, argv, capsys):
    from triffusion import cli

    protocol = "http" if "http" in argv else "grpc"
    before = cancelled(server)
    started = time.monotonic()
    code = cli.main(["generate", *SLOW, "--timeout", "1", "--url", server.url(protocol), *argv,
                     "-o", str(tmp_path / "slow.png")])
    assert code == 2 and time.monotonic() - started < 30
    error = capsys.readouterr().err.splitlines()[-1]
    assert error in ("error: no result within the 1 s timeout; the server was told to stop",
                     "error: CANCELLED: the request's timeout passed before it finished")
    assert_freed(server, before)
