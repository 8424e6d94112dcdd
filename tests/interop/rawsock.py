"""Raw bytes on a control or data socket, for byte-exact comparisons.

No protocol knowledge here on purpose: tests spell requests as hex so that what is
sent is exactly what the tables of docs/protocol.md show.
"""

from __future__ import annotations

import array
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from swtpm_peer import Endpoint


@dataclass
class Reply:
    data: bytes
    closed: bool  # the server closed the connection (EOF) after ``data``

    def __repr__(self) -> str:
        return f"Reply({self.data.hex(' ')!r}, closed={self.closed})"


def read_reply(sock: socket.socket, first_wait: float = 2.0, idle: float = 0.03) -> Reply:
    """Whatever arrives: wait up to ``first_wait`` for the first byte, then until idle."""
    out = b""
    sock.settimeout(first_wait)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return Reply(out, False)
        except ConnectionResetError:
            return Reply(out, True)
        if not chunk:
            return Reply(out, True)
        out += chunk
        sock.settimeout(idle)


def exchange(
    sock: socket.socket, request: bytes, first_wait: float = 2.0, idle: float = 0.03
) -> Reply:
    sock.sendall(request)
    return read_reply(sock, first_wait, idle)


def read_exact(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return out


def tpm_transact(sock: socket.socket, timeout: float = 30.0) -> Callable[[bytes], bytes]:
    """Whole TPM commands on a data socket (either family): each answer is as long as
    the size in its header says, which is all the framing a raw data channel has."""

    def transact(command: bytes) -> bytes:
        sock.sendall(command)
        head = read_exact(sock, 10, timeout)
        return head + read_exact(sock, int.from_bytes(head[2:6], "big") - 10, timeout)

    return transact


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """All of ``data``; the fds (SCM_RIGHTS) travel with its first bytes."""
    if not fds:
        sock.sendall(data)
        return
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def connect(ep: Endpoint, timeout: float = 2.0) -> socket.socket:
    return ep.connect(timeout)


def h(text: str) -> bytes:
    """Hex with spaces allowed: ``h("00 00 00 01")``."""
    return bytes.fromhex(text)
