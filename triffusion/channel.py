"""The fronts' line to the orchestrator: framed messages over a Unix socket between the two python-backend
processes of one tritonserver.

Why not BLS: with Triton 2.51's python backend, decoupled BLS calls iterated on many threads, with
clients cancelling, corrupt the calling stub's Python heap (measured: the streaming front crashed every
few minutes under 8 concurrent streams), and a response sent to a BLS caller whose process died blocks the
sender forever. A socket has neither problem, and tells each side at once when the other one is gone
(EOF, or a failed write). Both processes are this project's own; the socket lives in a directory only
this user can open.

A message is a dict (numpy arrays allowed), pickled, preceded by its length."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import tempfile
import threading
from pathlib import Path

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 256 << 20
SEND_TIMEOUT_S = 5.0  # a peer that stops reading for this long is treated as gone


class ChannelClosed(ConnectionError):
    """The other side is gone."""


def socket_path(server_pid: int) -> Path:
    """Where the orchestrator of the tritonserver with this pid listens."""
    return Path(tempfile.gettempdir()) / f"triffusion-{os.getuid()}-{server_pid}" / "orchestrator.sock"


class Channel:
    """One connected socket: whole messages in, whole messages out; writes from several threads are safe."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._write = threading.Lock()
        self.closed = False

    def send(self, message: dict) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._write:
                self.sock.sendall(_LENGTH.pack(len(data)) + data)
        except (OSError, ValueError) as exc:
            self.close()
            raise ChannelClosed(str(exc)) from None

    def recv(self) -> dict | None:
        """The next message; None once the other side closed."""
        header = self._read(_LENGTH.size)
        if header is None:
            return None
        (length,) = _LENGTH.unpack(header)
        if length > MAX_MESSAGE:
            self.close()
            return None
        body = self._read(length)
        return None if body is None else pickle.loads(body)

    def _read(self, n: int) -> bytes | None:
        chunks, left = [], n
        while left:
            try:
                chunk = self.sock.recv(min(left, 1 << 20))
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def connect(path: Path, timeout_s: float = 2.0) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ChannelClosed(f"cannot connect to {path.name}: {exc.strerror or exc}") from None
    sock.settimeout(None)
    _send_timeout(sock)
    return Channel(sock)


def _send_timeout(sock: socket.socket) -> None:
    seconds = int(SEND_TIMEOUT_S)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))


class Listener:
    """Accepts connections on `path` and serves each on its own thread with `handle(channel)`."""

    def __init__(self, path: Path, handle):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a stale socket of an orchestrator that died
        self.path, self.handle = path, handle
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(64)
        self._thread = threading.Thread(target=self._accept, name="triffusion-channel", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return  # closed
            _send_timeout(sock)
            threading.Thread(target=self.handle, args=(Channel(sock),), name="triffusion-channel-conn",
                             daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
