"""Python-backend stub processes, read from the process table.

Each model instance of the python backend runs in a stub process, a child of tritonserver whose argv
names the instance (`unet_0_0`: model, group, instance). Triton 2.51 never restarts a stub that died and
keeps its model READY (python_backend fixed that in r25.12/r26.01, #423), so the fronts, the
orchestrator and the supervisor look here: a stub that is gone is a model that cannot answer."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

STUB = "triton_python_backend_stub"
_INSTANCE = re.compile(r"^(?P<model>.+)_(?P<group>\d+)_(?P<instance>\d+)$")
_PROC = Path("/proc")


def _children(parent: int) -> list[int]:
    """Pids whose parent is `parent` (Linux /proc)."""
    found = []
    try:
        tasks = list((_PROC / str(parent) / "task").iterdir())
    except OSError:
        tasks = []
    for task in tasks:  # fast path: the kernel keeps each thread's children
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            break
    else:
        if tasks:
            return found
    for entry in _PROC.iterdir():  # fallback: every process's stat (ppid is field 4)
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def _argv(pid: int) -> list[str]:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def stubs(server_pid: int) -> dict[str, int]:
    """Live python-backend stubs of one tritonserver: instance name (e.g. 'unet_0_0') -> pid."""
    out = {}
    for pid in _children(server_pid):
        argv = _argv(pid)
        if not argv or not argv[0].endswith(STUB) or not alive(pid):
            continue
        for arg in argv[1:]:
            if _INSTANCE.match(arg) and not arg.startswith("triton_python_backend_shm"):
                out[arg] = pid
                break
    return out


def model_of(instance: str) -> str:
    match = _INSTANCE.match(instance)
    return match["model"] if match else instance


def stubs_of(server_pid: int, model: str) -> dict[str, int]:
    return {name: pid for name, pid in stubs(server_pid).items() if model_of(name) == model}


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def shm_regions(server_pid: int) -> list[str]:
    """Shared-memory regions the stubs of this server use (argv names them); cleaned up after a crash."""
    regions = []
    for pid in _children(server_pid):
        for arg in _argv(pid):
            if arg.startswith("triton_python_backend_shm_region"):
                regions.append(arg)
    return regions


def default_sigint() -> None:
    """For `preexec_fn`: SIGINT back to its default in a child before it starts. A process launched in the
    background (`cmd &` in a script, nohup) inherits SIGINT ignored, and so would its children, which then
    could not be interrupted gently."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
