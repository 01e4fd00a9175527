"""Launch the tritonserver bundled in the nvidia-pytriton wheel (or one named by TRITONSERVER), and keep
it serving (triffusion.supervisor).

The python backend stub embeds the interpreter: it must load *this* interpreter's libpython (not the
system one) and find this environment's site-packages, so the launcher sets LD_LIBRARY_PATH and PATH.

A safe edge by default: the server listens on localhost only (`host` changes that), and the admin APIs
(model control, shared memory, logging, trace) need the admin key, which only this process and the
server's stubs know (it is generated per launch unless given).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from triffusion import procs
from triffusion.supervisor import ADMIN_HEADER

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


def _backend_dir() -> Path:
    """A python backend directory holding the stub built for the running Python version: one per
    environment (it sits in the environment's own tree, so two checkouts never share or race on it)."""
    override = os.environ.get("TRITON_BACKENDS")
    if override:
        return Path(override)
    src = _pytriton_dir() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the bundled python backend has no stub for Python {version}")
    dest = Path(sys.prefix) / "var" / "triffusion" / "backends" / "python"
    dest.mkdir(parents=True, exist_ok=True)
    for item in list((src / "backends" / "python").iterdir()) + [stub]:
        target = dest / item.name
        if item.is_file() and (not target.exists() or target.stat().st_size != item.stat().st_size):
            tmp = target.with_suffix(target.suffix + f".{os.getpid()}")
            shutil.copy2(item, tmp)
            os.replace(tmp, target)  # atomic: a concurrent launcher never sees half a file
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


def _wait_group_gone(pgid: int, timeout_s: float = 5.0) -> None:
    """Until every process of the group has been reaped (stubs orphaned by a dead server go to init)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)  # reaping happens in another process; there is nothing to wait on


ADMIN_APIS = "model-repository,shared-memory,logging,trace"  # need the admin key
SHM = Path("/dev/shm")


class TritonServer:
    """A tritonserver process serving one model repository, supervised; a context manager."""

    def __init__(self, model_repository, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 log_verbose: int = 0, extra_args: tuple[str, ...] = (), log_file: str | os.PathLike | None = None,
                 host: str = "127.0.0.1", supervise: bool = True, admin_key: str | None = None,
                 exit_timeout_s: int = 5, drain_grace_s: float = 30.0, http_edge: bool = True):
        self.model_repository = Path(model_repository)
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log_verbose, self.extra_args = log_verbose, tuple(extra_args)
        self.log_file = Path(log_file) if log_file else None
        self.host, self.supervise = host, supervise
        self.admin_key = admin_key or os.environ.get("TRIFFUSION_ADMIN_KEY") or secrets.token_hex(16)
        self.exit_timeout_s, self.drain_grace_s = exit_timeout_s, drain_grace_s
        # With the edge, tritonserver's own HTTP port is internal (localhost) and the edge takes the public one.
        self.http_edge = http_edge
        self.triton_http_port = free_port() if http_edge else http_port
        self.edge = None
        self.process: subprocess.Popen | None = None
        self.supervisor = None
        self._log_tail: deque[str] = deque(maxlen=400)
        self._shm: set[str] = set()
        self.ready_s: float | None = None

    @property
    def urls(self) -> dict[str, str]:
        return {"http": f"localhost:{self.ports['http']}", "grpc": f"localhost:{self.ports['grpc']}",
                "metrics": f"http://localhost:{self.ports['metrics']}/metrics"}

    @property
    def internal_http(self) -> str:
        """tritonserver's own HTTP endpoint (behind the edge, when there is one)."""
        return f"localhost:{self.triton_http_port}"

    def command(self) -> list[str]:
        http_host = "127.0.0.1" if self.http_edge else self.host
        return [str(server_binary()), f"--model-repository={self.model_repository}",
                f"--backend-directory={_backend_dir()}",
                f"--http-address={http_host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
                f"--http-port={self.triton_http_port}", f"--grpc-port={self.ports['grpc']}",
                f"--metrics-port={self.ports['metrics']}", "--allow-metrics=true", "--allow-gpu-metrics=false",
                "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.log_verbose}",
                # Explicit model control: the supervisor reloads a model whose stub died.
                "--model-control-mode=explicit", "--load-model=*",
                f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}={self.admin_key}",
                f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}={self.admin_key}",
                f"--exit-timeout-secs={self.exit_timeout_s}",
                *self.extra_args]

    def start(self) -> "TritonServer":
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist; "
                              "run `python -m triffusion.export build --preset tiny --out DIR` first")
        for kind, port in self.ports.items():
            if port_in_use(port):
                raise ServerError(f"port {port} ({kind}) is already in use; pass --{kind}-port to choose another")
        if self.http_edge:
            from triffusion.edge import HttpEdge

            self.edge = HttpEdge(self.host, self.ports["http"], self.triton_http_port).start()
        self._launch()
        return self

    def _launch(self) -> None:
        self._started = time.monotonic()
        env = {**server_env(), "TRIFFUSION_ADMIN_KEY": self.admin_key}
        self.process = subprocess.Popen(self.command(), env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                        start_new_session=True)
        self._pgid = self.process.pid  # its own session: the group outlives the process if it crashes
        import threading

        threading.Thread(target=self._pump_log, args=(self.process,), daemon=True).start()

    def _pump_log(self, process) -> None:
        sink = open(self.log_file, "a") if self.log_file else None
        for line in process.stdout:
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
        """Block until /v2/health/ready answers 200, then start supervising; seconds from start to ready."""
        try:
            self.ready_s = self._wait_ready(timeout_s)
        except ServerError:
            self.close_edge()
            raise
        if self.supervise and self.supervisor is None:
            from triffusion.supervisor import AdminClient, Supervisor

            self.supervisor = Supervisor(self, AdminClient(self.internal_http, self.urls["grpc"], self.admin_key))
            self.supervisor.start()
        return self.ready_s

    def _wait_ready(self, timeout_s: float) -> float:
        url = f"http://{self.internal_http}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        relaunches = 1
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                failed = [l.strip() for l in self._log_tail if "failed to load" in l or "UNAVAILABLE" in l]
                if self.process.returncode < 0 and not failed and relaunches:
                    # Killed by a signal while loading, with every model fine so far: 2.51 aborts now and then
                    # on a python-backend shared-memory lock (boost::interprocess::lock_exception) when the
                    # machine is loaded. One fresh start, with the same ports and key.
                    relaunches -= 1
                    log.warning("tritonserver died (signal %d) while loading; starting it again",
                                -self.process.returncode)
                    self._terminate()
                    self._launch()
                    deadline = time.monotonic() + timeout_s
                    continue
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready:\n"
                                  + ("\n".join(failed) if failed else self.log_tail()))
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        ready_s = time.monotonic() - self._started
                        log.info("tritonserver ready in %.1f s", ready_s)
                        self.remember_shm()
                        return ready_s
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)  # polling an HTTP endpoint: the server offers no readiness signal to wait on
        self._terminate()
        raise ServerError(f"tritonserver was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def remember_shm(self) -> None:
        """Note the stubs' shared-memory regions, to remove them if the server dies."""
        self._shm.update(procs.shm_regions(self.process.pid))

    def restart(self, timeout_s: float = 300.0) -> float:
        """Start again after the process died (the supervisor calls this): same ports, same key."""
        self._terminate()
        self._launch()
        return self._wait_ready(timeout_s)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop admitting (new requests get UNAVAILABLE), let the requests in flight finish for up to
        `grace_s` (drain_grace_s by default), then stop the server; the rest are failed with a message."""
        if self.supervisor is not None:
            self.supervisor.stop()
            if self.process is not None and self.process.poll() is None:
                self.supervisor.drain(self.drain_grace_s if grace_s is None else grace_s)
        self._terminate()
        self.close_edge()

    def _terminate(self) -> None:
        if self.process is None:
            return
        pgid = self._pgid
        if self.process.poll() is None:
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                log.error("tritonserver did not exit within %d s; killing it", self.exit_timeout_s + 10)
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait()
        try:  # python backend stubs share the group; none outlives the server, even one that crashed
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_group_gone(pgid)
        self._remove_shm()

    def _remove_shm(self) -> None:
        """Shared memory the stubs of a dead or stopped server left behind."""
        for name in self._shm:
            try:
                (SHM / name).unlink()
            except FileNotFoundError:
                pass
        self._shm.clear()

    def close_edge(self) -> None:
        if self.edge is not None:
            self.edge.stop()
            self.edge = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace_s=0 if exc[0] is not None else None)
