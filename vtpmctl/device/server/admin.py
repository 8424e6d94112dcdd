"""The admin endpoint: the read-only control commands, beside the control channel.

A hypervisor holds a daemon's control channel for as long as its VM runs, and
the control channel serves one client at a time (as swtpm's), so ``vtpmctl
info`` would wait behind QEMU until it gave up. The admin endpoint is a second
listener, served on its own threads, that answers what only reads the TPM —
GET_CAPABILITY, GET_INFO, GET_CONFIG, GET_TPMESTABLISHED, SET_BUFFERSIZE as a
query (0) and GET_STATEBLOB of the permanent state — and refuses everything
else with TPM_BAD_ORDINAL, as swtpm answers a command it does not allow. It
never touches the data channel or the control channel's loop, so neither
pays for it.

Its socket is made 0600 for the daemon's user whatever the control socket's
mode and group: never wider than the control socket.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time

from vtpmctl import logger
from vtpmctl.device.protocol import (
    CODE,
    CTRL_DEADLINE,
    MESSAGES,
    BlobType,
    Cmd,
    Res,
    encode_socket_response,
    socket_request_code,
)
from vtpmctl.device.server.sockets import ControlConnection, _Dropped, listen

# Off `typing` at run time: the zygote, and so every daemon, would carry it
# (0.4 MiB; docs/architecture.md, "The zygote").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from vtpmctl.device.server.sockets import Endpoint, SocketServer

log = logger.get(__name__)

# What the admin endpoint answers: commands that read and change nothing.
ADMIN_COMMANDS = frozenset(
    {
        Cmd.GET_CAPABILITY,
        Cmd.GET_INFO,
        Cmd.GET_CONFIG,
        Cmd.GET_TPMESTABLISHED,
        Cmd.GET_STATEBLOB,  # the permanent state only: reading volatile state writes a file
        Cmd.SET_BUFFERSIZE,  # as a query (buffersize 0) only
    }
)
# Commands whose body may still be on its way: after refusing one, the stream
# cannot be followed, so the connection is closed.
_STREAMING = frozenset({Cmd.SET_STATEBLOB, Cmd.HASH_DATA})
IDLE_TIMEOUT = 30.0  # an admin client silent this long is disconnected
MAX_CLIENTS = 16  # more wait in the backlog
STOP_POLL = 0.1


def refusal(code: int, body: bytes) -> bool:
    """The admin endpoint refuses this request (it could change the TPM)."""
    if code not in ADMIN_COMMANDS:
        return True
    request = MESSAGES[Cmd(code)].request
    if code not in (Cmd.GET_STATEBLOB, Cmd.SET_BUFFERSIZE) or len(body) < request.size():
        return False  # a short request gets the control channel's own error
    fields = request.unpack("big", body[: request.size()])
    if code == Cmd.GET_STATEBLOB:
        return bool(fields["type"] != BlobType.PERMANENT)
    return bool(fields["buffersize"] != 0)


class AdminConnection(ControlConnection):
    """One admin client: the control channel's framing, with the refusals first."""

    def _dispatch(self, data: bytes, fds: list[int]) -> tuple[bytes, None]:
        for fd in fds:  # no SET_DATAFD here
            os.close(fd)
        data = self._gather(data, time.monotonic() + CTRL_DEADLINE)
        code = socket_request_code(data) if len(data) >= CODE.size() else 0
        if refusal(code, data[CODE.size() :]):
            log.info("admin endpoint: refused control command 0x%x", code & 0xFFFFFFFF)
            reply = encode_socket_response(Cmd.STOP, Res.BAD_ORDINAL)
            if code in _STREAMING:
                self.conn.sendall(reply)
                raise _Dropped("a refused command's body cannot be skipped")
            return reply, None
        reply_bytes, _reply = super()._dispatch(data, [])
        return reply_bytes, None


class AdminServer:
    """The admin listener and one thread per client (at most MAX_CLIENTS at once)."""

    def __init__(self, server: SocketServer, ep: Endpoint) -> None:
        self.server = server
        self.ep = ep
        self.listener = listen(ep, backlog=MAX_CLIENTS)
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="admin-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.server.stopping:
            self._slots.acquire()
            try:
                conn, _ = self.listener.accept()
            except OSError:
                self._slots.release()
                return
            threading.Thread(target=self._serve, args=(conn,), name="admin", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        client = AdminConnection(self.server, conn)
        try:
            idle_until = time.monotonic() + IDLE_TIMEOUT
            while not self.server.stopping and time.monotonic() < idle_until:
                readable, _, _ = select.select([conn], [], [], STOP_POLL)
                if not readable:
                    continue
                if not client.handle_readable():
                    return
                idle_until = time.monotonic() + IDLE_TIMEOUT
        except OSError as exc:
            log.info("admin connection closed: %s", exc.strerror)
        finally:
            conn.close()
            self._slots.release()

    def close(self) -> None:
        """Stop listening and remove the socket (clients still connected finish their reply)."""
        # shutdown() wakes the accept() of the other thread; close() alone may not.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        if self.ep.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ep.path)
