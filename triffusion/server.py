"""Launch the tritonserver bundled in the nvidia-pytriton wheel (or one named by TRITONSERVER).

The python backend stub embeds the interpreter: it must load *this* interpreter's libpython (not the
system one) and find this environment's site-packages, so the launcher sets LD_LIBRARY_PATH and PATH.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed; `pip install nvidia-pytriton` (it bundles tritonserver)")
    return Path(spec.submodule_search_locations[0])


def _backend_dir(cache: Path) -> Path:
    """A python backend directory holding the stub built for the running Python version."""
    override = os.environ.get("TRITON_BACKENDS")
    if override:
        return Path(override)
    src = _pytriton_dir() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the bundled python backend has no stub for Python {version}")
    dest = cache / "backends" / "python"
    dest.mkdir(parents=True, exist_ok=True)
    for item in list((src / "backends" / "python").iterdir()) + [stub]:
        if item.is_file() and not (dest / item.name).exists():
            shutil.copy2(item, dest / item.name)
    return dest.parent


def server_binary() -> Path:
    override = os.environ.get("TRITONSERVER")
    return Path(override) if override else _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def server_env() -> dict[str, str]:
    env = os.environ.copy()
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    pytriton_libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
    if pytriton_libs.exists():
        libs.append(str(pytriton_libs))
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


class TritonServer:
    """A tritonserver process serving one model repository; a context manager."""

    def __init__(self, model_repository, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 log_verbose: int = 0, extra_args: tuple[str, ...] = (), log_file: str | os.PathLike | None = None):
        self.model_repository = Path(model_repository)
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log_verbose, self.extra_args = log_verbose, tuple(extra_args)
        self.log_file = Path(log_file) if log_file else None
        self.process: subprocess.Popen | None = None
        self._cache = Path(tempfile.gettempdir()) / f"triffusion-{os.getuid()}"
        self._log_tail: deque[str] = deque(maxlen=400)
        self.ready_s: float | None = None

    @property
    def urls(self) -> dict[str, str]:
        return {"http": f"localhost:{self.ports['http']}", "grpc": f"localhost:{self.ports['grpc']}",
                "metrics": f"http://localhost:{self.ports['metrics']}/metrics"}

    def command(self) -> list[str]:
        return [str(server_binary()), f"--model-repository={self.model_repository}",
                f"--backend-directory={_backend_dir(self._cache)}",
                f"--http-port={self.ports['http']}", f"--grpc-port={self.ports['grpc']}",
                f"--metrics-port={self.ports['metrics']}", "--allow-metrics=true", "--allow-gpu-metrics=false",
                "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.log_verbose}",
                *self.extra_args]

    def start(self) -> "TritonServer":
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist; "
                              "run `python -m triffusion.export build --preset tiny --out DIR` first")
        for kind, port in self.ports.items():
            if port_in_use(port):
                raise ServerError(f"port {port} ({kind}) is already in use; pass --{kind}-port to choose another")
        self._started = time.monotonic()
        self.process = subprocess.Popen(self.command(), env=server_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                        start_new_session=True)
        import threading

        threading.Thread(target=self._pump_log, daemon=True).start()
        return self

    def _pump_log(self) -> None:
        sink = open(self.log_file, "a") if self.log_file else None
        for line in self.process.stdout:
            self._log_tail.append(line)
            if sink:
                sink.write(line)
                sink.flush()
            elif self.log_verbose:
                sys.stderr.write(line)
        if sink:
            sink.close()

    def log_tail(self, lines: int = 40) -> str:
        return "".join(list(self._log_tail)[-lines:])

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Block until /v2/health/ready answers 200; returns seconds from start to ready."""
        url = f"http://localhost:{self.ports['http']}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                failed = [l.strip() for l in self._log_tail if "failed to load" in l or "UNAVAILABLE" in l]
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready:\n"
                                  + ("\n".join(failed) if failed else self.log_tail()))
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        self.ready_s = time.monotonic() - self._started
                        log.info("tritonserver ready in %.1f s", self.ready_s)
                        return self.ready_s
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)  # polling an HTTP endpoint: the server offers no readiness signal to wait on
        self.stop()
        raise ServerError(f"tritonserver was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()
        try:  # python backend stubs share the group; make sure none outlives the server
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
