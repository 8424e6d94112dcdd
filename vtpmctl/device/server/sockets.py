"""swtpm-compatible control and data channel servers (unix, TCP, fd passing).

Threads, not a selector, carry both channels: a connection's thread blocks
in recv, runs the command (under the engine lock where it needs one) and
sends, so a busy client costs no poll round per command. The main thread
only accepts control clients (one at a time) and handles signals, so a
signal is never held behind a long TPM command.
"""

from __future__ import annotations

import array
import contextlib
import os
import queue
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable

from vtpmctl import logger
from vtpmctl.device.protocol import (
    CODE,
    CTRL_DEADLINE,
    CTRL_FIRST_READ,
    HASH_DATA_MAX,
    MESSAGES,
    SEND_COMMAND_ACK,
    SEND_COMMAND_CODE,
    SEND_COMMAND_HEAD,
    SEND_COMMAND_LENGTH,
    SET_STATEBLOB_MAX,
    TPM_HEADER_SIZE,
    Cmd,
    Res,
    encode_socket_response,
    socket_data_length,
    socket_request_code,
    socket_request_need,
)
from vtpmctl.engine.libtpms import CommandBuffer
from vtpmctl.engine.tpm import ControlReply, Engine, FatalEngineError
from vtpmctl.errors import ServeError
from vtpmctl.frozen import Frozen

log = logger.get(__name__)

BLOB_READ_TIMEOUT = 10.0  # a stalled SET_STATEBLOB sender loses its connection
STOP_POLL = 0.1  # how often a long control read looks whether the server is stopping
CLIENT_JOIN_TIMEOUT = 5.0  # seconds an exiting server waits for the control command under way
UNIX_PATH_MAX = 107


class EndpointError(ServeError):
    """An endpoint spec that cannot be used; the message names the fix."""


class Endpoint(Frozen):
    """Where a channel listens or connects: ``unix:PATH`` or ``tcp:HOST:PORT``."""

    __slots__ = ("kind", "path", "host", "port", "mode", "gid")
    kind: str  # "unix" | "tcp"
    path: str
    host: str
    port: int
    mode: int
    gid: int  # the unix socket's group; -1 keeps the process's

    def __init__(
        self,
        kind: str,
        path: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
        mode: int = 0o600,
        gid: int = -1,
    ) -> None:
        self._init(kind=kind, path=path, host=host, port=port, mode=mode, gid=gid)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_endpoint(spec: str) -> Endpoint:
    """``unix:PATH`` or ``tcp:[HOST:]PORT`` (loopback unless a host is given)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise EndpointError(f"bad endpoint {spec!r}; use unix:PATH or tcp:HOST:PORT")
    if kind == "unix":
        if len(os.fsencode(rest)) > UNIX_PATH_MAX:
            raise EndpointError(
                f"socket path {rest!r} is longer than {UNIX_PATH_MAX} bytes; use a shorter path"
            )
        return Endpoint("unix", path=rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            num = int(port)
        except ValueError:
            raise EndpointError(f"bad TCP port in {spec!r}; use tcp:HOST:PORT") from None
        if not 0 <= num <= 65535:
            raise EndpointError(f"TCP port {num} out of range in {spec!r}")
        return Endpoint("tcp", host=host, port=num)
    raise EndpointError(f"unknown endpoint type {kind!r} in {spec!r}; use unix: or tcp:")


def listen(ep: Endpoint, backlog: int = 1) -> socket.socket:
    if ep.kind == "unix":
        try:
            if stat.S_ISSOCK(os.lstat(ep.path).st_mode):
                os.unlink(ep.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~ep.mode)
        try:
            sock.bind(ep.path)
        except OSError as exc:
            sock.close()
            raise EndpointError(f"cannot listen on {ep}: {exc.strerror}") from exc
        finally:
            os.umask(old)  # the umask gave the socket its mode: no chmod through a swapped link
        if ep.gid != -1:
            try:
                os.chown(ep.path, -1, ep.gid, follow_symlinks=False)
            except OSError as exc:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(ep.path)
                raise EndpointError(
                    f"cannot give {ep.path} group {ep.gid}: {exc.strerror}; "
                    "run as root or as a member of that group"
                ) from exc
    else:
        family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ep.host, ep.port))
        except OSError as exc:
            sock.close()
            raise EndpointError(f"cannot listen on {ep}: {exc.strerror}") from exc
    sock.listen(backlog)
    return sock


# ---------------------------------------------------------------- data channel


class CharDevStream:
    """A character device (or a vTPM proxy's backend) read and written like a stream.

    ``swtpm chardev`` serves its data channel on one: each read() is one TPM
    command and each write() one response, so a DataChannel drives it as a
    connected socket.
    """

    family = socket.AF_UNIX  # not TCP: no socket options to set

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def recv_into(self, view: memoryview) -> int:
        return os.readv(self.fd, [view])

    def send(self, data: bytes | memoryview, flags: int = 0) -> int:
        return os.write(self.fd, data)

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DataChannel:
    """Serves raw TPM commands on one connected stream in its own thread."""

    def __init__(
        self,
        engine: Engine,
        conn: socket.socket | CharDevStream,
        on_close: Callable[[], None],
        on_fatal: Callable[[str], None],
        disconnect: bool = False,
    ) -> None:
        self.engine = engine
        self.conn = conn
        self.on_close = on_close
        self.on_fatal = on_fatal
        self.disconnect = disconnect  # swtpm's --server …,disconnect: one command per connection
        self.thread = threading.Thread(target=self.run, name="data", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        try:
            self._serve()
        except FatalEngineError as exc:
            self.on_fatal(str(exc))
        except OSError as exc:
            log.info("data connection closed: %s", exc.strerror)
        finally:
            self.conn.close()
            self.on_close()

    def _serve(self) -> None:
        if isinstance(self.conn, socket.socket) and self.conn.family in (
            socket.AF_INET,
            socket.AF_INET6,
        ):
            # A response is one write: never hold it back waiting for an ACK.
            self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = CommandBuffer()
        view = buf.view
        recv_into = self.conn.recv_into
        sendall = self.conn.sendall
        # The response goes out from libtpms' buffer under the engine lock, without
        # blocking; whatever the socket does not take at once is sent after.
        run = self.engine.bind(buf, self.conn.send, socket.MSG_DONTWAIT)
        tpm2 = self.engine.config.tpm2
        framed = SEND_COMMAND_CODE
        once = self.disconnect
        while True:
            n = recv_into(view)
            if not n:
                return
            while n < TPM_HEADER_SIZE:  # wait for a whole header, as swtpm does
                more = recv_into(view[n:])
                if not more:
                    return
                n += more
            if tpm2 and view[0] == 0 and view[:4] == framed:
                sendall(self._send_command_framed(buf, n))
            else:
                rest = run(n)
                if rest:
                    sendall(rest)
            if once:
                return

    def _send_command_framed(self, buf: CommandBuffer, n: int) -> bytes:
        """TCG simulator TPM_SEND_COMMAND framing (docs/protocol.md#the-data-channel)."""
        view = buf.view
        self.engine.set_locality_raw(SEND_COMMAND_HEAD.unpack("big", view)["locality"])
        inner = bytes(view[SEND_COMMAND_HEAD.size() : n])
        view[: len(inner)] = inner
        resp = self.engine.process_buffer(buf, len(inner))
        return SEND_COMMAND_LENGTH.pack("big", {"length": len(resp)}) + resp + SEND_COMMAND_ACK


# ---------------------------------------------------------------- control channel


_FDS_SPACE = socket.CMSG_SPACE(array.array("i").itemsize * 4)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, typ, data in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds)


def _blob_too_large(data: bytes) -> bool:
    """A SET_STATEBLOB header announcing more than 512 KiB (answered TPM_FAIL)."""
    if len(data) < CODE.size() or socket_request_code(data) != Cmd.SET_STATEBLOB:
        return False
    length = socket_data_length(data)
    return length is not None and length > SET_STATEBLOB_MAX


# Answering these for a client that has gone changes nothing, so they skip the
# hang-up check (GET_CAPABILITY is the control channel's hot path).
_QUERIES = frozenset({Cmd.GET_CAPABILITY, Cmd.GET_TPMESTABLISHED, Cmd.GET_CONFIG, Cmd.GET_INFO})


class _Dropped(Exception):
    """The control connection is closed without a reply (docs/protocol.md#socket-framing).

    Private control flow of the control channel's servers (this module and admin.py),
    outside the error tree: the connection loop catches it and closes the
    connection; it never reaches the user.
    """


class ControlConnection:
    """One control client: framing, length checks, replies."""

    def __init__(self, server: SocketServer, conn: socket.socket) -> None:
        self.server = server
        self.engine = server.engine
        self.conn = conn
        # Prebuilt for the request loop: a receive buffer, the bound methods, GET_CAPABILITY.
        self._buf = bytearray(CTRL_FIRST_READ)
        self._bufs = [self._buf]
        self._recvmsg_into = conn.recvmsg_into
        self._sendall = conn.sendall
        self._caps_request = server.caps_request
        self._caps_reply = server.caps_reply
        # POLLHUP/POLLERR are always reported: a mask of 0 asks for nothing else.
        self._hangup = select.poll()
        self._hangup.register(conn, 0)

    def _client_gone(self) -> bool:
        """The client hung up (or reset) before its request ran.

        A request can wait unread for seconds in the backlog while another client
        holds the channel; its sender has long reported failure and gone. Running
        it then would stop or reset a TPM behind everyone's back. One poll with no
        timeout costs about a microsecond per request.
        """
        return bool(self._hangup.poll(0))

    @staticmethod
    def _gone(code: int) -> _Dropped:
        return _Dropped(
            f"client hung up before its control command 0x{code & 0xFFFFFFFF:x} ran; "
            "not carried out"
        )

    def _read_more(self, data: bytes, want: int, deadline: float | None) -> bytes:
        """Read until ``want`` bytes: by ``deadline``, or (None) with no more than
        BLOB_READ_TIMEOUT of silence. A stopping server gives up at once, so that a
        stalled client cannot hold back SIGTERM or CMD_SHUTDOWN handling."""
        silent_until = time.monotonic() + BLOB_READ_TIMEOUT
        while len(data) < want:
            if self.server.stopping:
                raise _Dropped("the server is stopping")
            timeout = (deadline if deadline is not None else silent_until) - time.monotonic()
            if timeout <= 0:
                raise _Dropped(
                    "control message incomplete after 500 ms"
                    if deadline is not None
                    else "control message stalled"
                )
            self.conn.settimeout(min(timeout, STOP_POLL))
            try:
                chunk = self.conn.recv(min(want - len(data), 65536))
            except TimeoutError:
                continue
            finally:
                self.conn.settimeout(None)
            if not chunk:
                raise _Dropped("peer closed mid-message")
            data += chunk
            silent_until = time.monotonic() + BLOB_READ_TIMEOUT
        return data

    def serve(self, stopping: Callable[[], bool]) -> None:
        """Serve requests until the client goes or ``stopping()``: the control thread's loop.

        handle_readable's work with GET_CAPABILITY, the channel's hot path, answered
        in the loop itself from locals (about a tenth of its server CPU per request).
        """
        recvmsg_into, bufs, space = self._recvmsg_into, self._bufs, _FDS_SPACE
        caps_request, caps_len, caps_reply = (
            self._caps_request,
            len(self._caps_request),
            self._caps_reply,
        )
        starts = self._buf.startswith
        sendall = self._sendall
        while not stopping():
            try:
                n, ancdata, _flags, _addr = recvmsg_into(bufs, space)
                if n == caps_len and not ancdata and starts(caps_request):
                    sendall(caps_reply)  # the engine's answer never changes
                    continue
            except OSError:
                return
            if not self._handle(n, ancdata):
                return

    def handle_readable(self) -> bool:
        """Serve one request; False when the connection must be closed."""
        try:
            n, ancdata, _flags, _addr = self._recvmsg_into(self._bufs, _FDS_SPACE)
        except OSError:
            return False
        if (
            n == len(self._caps_request)
            and not ancdata
            and self._buf.startswith(self._caps_request)
        ):
            # The control channel's hot path: the engine's answer never changes.
            try:
                self._sendall(self._caps_reply)
            except OSError:
                return False
            return True
        return self._handle(n, ancdata)

    def _handle(self, n: int, ancdata: list[tuple[int, int, bytes]]) -> bool:
        """Any request but GET_CAPABILITY, whose ``n`` bytes are in the buffer."""
        data = bytes(self._buf[:n])
        fds = _fds_of(ancdata) if ancdata else []
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            reply_bytes, reply = self._dispatch(data, fds)
        except _Dropped as exc:
            log.info("control connection dropped: %s", exc)
            return False
        except FatalEngineError as exc:
            self.server.fatal(str(exc))
            return False
        try:
            self.conn.sendall(reply_bytes)
        except OSError:
            return False
        if reply is not None:
            if reply.after_send is not None:
                reply.after_send()
            if reply.exit_after:
                self.server.request_exit()
                return False
        return True

    def _gather(self, data: bytes, deadline: float) -> bytes:
        """Up to CTRL_FIRST_READ bytes of the message within the deadline.

        See docs/protocol.md#socket-framing.

        What a message needs is known only once its header is in, so it is
        re-evaluated after every read: a header split over several writes works.
        """
        while len(data) < (want := min(socket_request_need(data), CTRL_FIRST_READ)):
            if _blob_too_large(data):
                break  # refused at once, not after the deadline
            data = self._read_more(data, want, deadline)
        return data

    def _dispatch(self, data: bytes, fds: list[int]) -> tuple[bytes, ControlReply | None]:
        data = self._gather(data, time.monotonic() + CTRL_DEADLINE)
        first_len = len(data)
        want = socket_request_need(data)
        code = socket_request_code(data)
        if _blob_too_large(data):
            # Reply at once without draining; the stream is unusable afterwards.
            self.conn.sendall(encode_socket_response(Cmd.SET_STATEBLOB, Res.FAIL))
            raise _Dropped("state blob larger than 512 KiB")
        if want > len(data) and code != Cmd.HASH_DATA:
            data = self._read_more(data, want, None)
        if code not in _QUERIES and self._client_gone():
            for fd in fds:
                os.close(fd)
            raise self._gone(code)
        if code == Cmd.HASH_DATA:
            for fd in fds:
                os.close(fd)
            return self._hash_data(data), None
        try:
            cmd = Cmd(code)
        except ValueError:
            log.info("unknown control command 0x%x", code & 0xFFFFFFFF)
            return encode_socket_response(Cmd.STOP, Res.BAD_ORDINAL), None
        if cmd == Cmd.SET_DATAFD:
            return self._set_datafd(fds), None
        for fd in fds:
            os.close(fd)
        return self._run(cmd, data[CODE.size() :], first_len - CODE.size())

    def _hash_data(self, data: bytes) -> bytes:
        """HASH_DATA hashed as it arrives, a piece at a time, as swtpm does.

        The announced length is only a u32, but a whole 4 GiB stream is never held in
        memory. A stream that cannot be followed to its end (TPM not running, a piece
        refused) is answered and then the connection is dropped: what is left of the
        stream would otherwise be read as commands.
        """
        msg = MESSAGES[Cmd.HASH_DATA]
        fixed = CODE.size() + msg.request.size()
        length = msg.request.unpack("big", data[CODE.size() : fixed])["length"]
        present = data[fixed:]
        rc: int = Res.SUCCESS
        if not msg.allowed(self.engine.running):
            rc = Res.BAD_ORDINAL
        elif len(present) > length:
            rc = Res.BAD_PARAMETER
        elif present:
            rc = self.engine.control(Cmd.HASH_DATA, {"length": len(present)}, present).result
        remaining = length - len(present)
        if remaining > 0 and rc != Res.SUCCESS:
            self.conn.sendall(encode_socket_response(Cmd.HASH_DATA, rc))
            raise _Dropped(f"HASH_DATA stream abandoned (0x{rc:x})")
        while remaining > 0:
            piece = self._read_more(b"", min(remaining, HASH_DATA_MAX), None)
            remaining -= len(piece)
            rc = self.engine.control(Cmd.HASH_DATA, {"length": len(piece)}, piece).result
            if rc != Res.SUCCESS and remaining > 0:
                self.conn.sendall(encode_socket_response(Cmd.HASH_DATA, rc))
                raise _Dropped(f"HASH_DATA stream abandoned (0x{rc:x})")
        return encode_socket_response(Cmd.HASH_DATA, rc)

    def _set_datafd(self, fds: list[int]) -> bytes:
        # As swtpm: "a data channel exists already" is checked before the fd, and a
        # configured data listener counts as one.
        if self.server.has_data_channel():
            for fd in fds:
                os.close(fd)
            return encode_socket_response(Cmd.SET_DATAFD, Res.IOERROR)
        if not fds:
            return encode_socket_response(Cmd.SET_DATAFD, Res.BAD_PARAMETER)
        for extra in fds[1:]:
            os.close(extra)
        ok = self.server.attach_data_fd(fds[0])
        return encode_socket_response(Cmd.SET_DATAFD, Res.SUCCESS if ok else Res.IOERROR)

    def _run(self, cmd: Cmd, body: bytes, first_body: int) -> tuple[bytes, ControlReply | None]:
        msg = MESSAGES[cmd]
        engine = self.engine

        def short(result: int) -> tuple[bytes, None]:
            return encode_socket_response(Cmd.STOP, result), None

        # The state before the length check, as swtpm (docs/protocol.md#control-commands).
        if not msg.allowed(engine.running):
            return short(Res.BAD_ORDINAL)
        if msg.req_rule is not None:
            rule, n = msg.req_rule
            if (rule == "exact" and len(body) != n) or len(body) < n:
                return short(Res.BAD_PARAMETER)
        fields = msg.request.unpack("big", body) if msg.request.size() else {}
        data = b""
        if msg.data == "req":
            fixed = msg.request.size()
            length = fields["length"]
            # Bytes beyond the declared length in the first packet are an error.
            if first_body - fixed > length or len(body) - fixed < length:
                return short(Res.BAD_PARAMETER)
            data = body[fixed : fixed + length]
        reply = engine.control(cmd, fields, data)
        return self.encode(cmd, fields, reply), reply

    @staticmethod
    def encode(cmd: Cmd, fields: dict[str, int], reply: ControlReply) -> bytes:
        if cmd == Cmd.GET_STATEBLOB:
            if reply.result in (Res.BAD_ORDINAL, Res.BAD_PARAMETER):
                return encode_socket_response(Cmd.STOP, reply.result)
            blob = reply.data[fields["offset"] :]
            out = {
                "state_flags": reply.fields.get("state_flags", 0),
                "totlength": len(blob),
                "length": len(blob),
            }
            if reply.result != Res.SUCCESS:
                out = {"state_flags": 0, "totlength": 0, "length": 0}
                blob = b""
            return encode_socket_response(cmd, reply.result, out, b"") + blob
        return encode_socket_response(cmd, reply.result, reply.fields, reply.data)


def is_listening(sock: socket.socket) -> bool:
    """A socket passed in (``fd=``) that accepts connections, rather than one connection."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


class SocketServer:
    """The control listener plus the data listener/fd of one engine.

    Each endpoint is a spec to listen on, or a socket that is already bound
    and listening (passed in by the caller, e.g. systemd or mkosi). Instead of
    a control listener the server may get one connected control client
    (``ctrl_client``, swtpm's ``clientfd=``), and instead of a data listener
    one connected data stream (``data_conn``); once such a data stream ends
    the server ends, as swtpm does. No control channel at all is allowed too
    (data commands only, with ``not-need-init``).
    """

    def __init__(
        self,
        engine: Engine,
        ctrl: Endpoint | socket.socket | None,
        data: Endpoint | socket.socket | None = None,
        terminate: bool = False,
        *,
        ctrl_client: socket.socket | None = None,
        data_conn: socket.socket | CharDevStream | None = None,
        disconnect: bool = False,
        admin: Endpoint | None = None,
    ) -> None:
        self.engine = engine
        self.ctrl_ep = ctrl if isinstance(ctrl, Endpoint) else None
        self.data_ep = data if isinstance(data, Endpoint) else None
        self.terminate = terminate
        self.disconnect = disconnect
        self._ctrl_client = ctrl_client
        self._data_conn = data_conn
        self._exit = threading.Event()
        self.exit_message: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ctrl_listener = listen(ctrl) if isinstance(ctrl, Endpoint) else ctrl
        try:
            self._data_listener = listen(data) if isinstance(data, Endpoint) else data
        except EndpointError:
            if self._ctrl_listener is not None:
                self._ctrl_listener.close()
            raise
        self._datafd_channel: DataChannel | None = None
        self._client_error: BaseException | None = None
        self._client_done = threading.Event()
        self._clients: queue.SimpleQueue[ControlConnection | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admin = None
        if admin is not None:
            from vtpmctl.device.server.admin import AdminServer  # imports this module

            try:
                self._admin = AdminServer(self, admin)
            except EndpointError:
                for sock in (self._ctrl_listener, self._data_listener):
                    if sock is not None:
                        sock.close()
                raise
        # GET_CAPABILITY, the request monitors poll, answered from bytes made once
        # by the engine and the protocol table (the engine's caps never change).
        self.caps_request = CODE.pack("big", {"code": Cmd.GET_CAPABILITY})
        caps = engine.control(Cmd.GET_CAPABILITY, {})
        self.caps_reply = ControlConnection.encode(Cmd.GET_CAPABILITY, {}, caps)

    # -- called from other threads

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def request_exit(self) -> None:
        self._exit.set()
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._exit.is_set()

    def fatal(self, message: str) -> None:
        log.error("%s", message)
        self.exit_message = message
        self.request_exit()

    def has_data_channel(self) -> bool:
        """A data listener is configured or a SET_DATAFD channel is live."""
        with self._lock:
            return (
                self._data_listener is not None
                or self._datafd_channel is not None
                or self._data_conn is not None
            )

    def attach_data_fd(self, fd: int) -> bool:
        with self._lock:
            if self._datafd_channel is not None:
                os.close(fd)
                return False
            try:
                conn = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                return False

            def closed() -> None:
                with self._lock:
                    self._datafd_channel = None
                self._data_closed()

            self._datafd_channel = DataChannel(self.engine, conn, closed, self.fatal)
            self._datafd_channel.start()
            return True

    # -- main loop

    def _data_accept_loop(self) -> None:
        """One data client at a time, like swtpm; the next waits in the backlog."""
        assert self._data_listener is not None
        listener = self._data_listener
        while not self._exit.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            # Served in this thread, so the next client waits until this one leaves.
            DataChannel(self.engine, conn, self._data_closed, self.fatal, self.disconnect).run()

    def _data_closed(self) -> None:
        if self.terminate:
            log.info("data connection lost; terminating")
            self.request_exit()

    def _data_conn_closed(self) -> None:
        log.info("data connection closed; terminating")
        self.request_exit()

    def _start_threads(self) -> None:
        """What runs beside the control loop: admin endpoint, data listener or stream."""
        if self._admin is not None:
            self._admin.start()
        if self._data_listener is not None:
            threading.Thread(target=self._data_accept_loop, name="data-accept", daemon=True).start()
        if self._data_conn is not None:
            DataChannel(self.engine, self._data_conn, self._data_conn_closed, self.fatal).start()

    def serve_forever(self) -> None:
        """Accept control clients, one at a time; handle signals and exit requests.

        The main thread polls only the wake-up pipe and the listener, so a
        signal is handled at once. The connected control client is served by
        a blocking loop on the "control" thread: no poll round per request.
        """
        self._start_threads()
        threading.Thread(target=self._control_loop, name="control", daemon=True).start()
        poller = select.poll()
        wake_fd = self._wake_r.fileno()
        listen_fd = self._ctrl_listener.fileno() if self._ctrl_listener is not None else -1
        poller.register(wake_fd, select.POLLIN)
        client: ControlConnection | None = None
        if self._ctrl_client is not None:
            client = ControlConnection(self, self._ctrl_client)
            self._clients.put(client)
        elif self._ctrl_listener is not None:
            poller.register(listen_fd, select.POLLIN)
        shutdown = self.engine.shutdown_requested
        # A signal may be delivered to any thread; its handler runs only on this
        # one, which the wake-up pipe wakes from its poll.
        # (A server run on another thread, as in tests, leaves signals to that one's owner.)
        main = threading.current_thread() is threading.main_thread()
        if main:
            old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        try:
            while not self._exit.is_set() and not shutdown.is_set():
                for fd, _ in poller.poll():
                    if fd == wake_fd:
                        self._drain_wake()
                    elif fd == listen_fd and client is None:
                        assert self._ctrl_listener is not None
                        conn, _ = self._ctrl_listener.accept()
                        # One control client at a time: stop polling the listener.
                        poller.unregister(listen_fd)
                        client = ControlConnection(self, conn)
                        self._clients.put(client)
                if client is not None and self._client_done.is_set():
                    self._client_finished(client)
                    client = None
                    if self._ctrl_listener is not None:
                        poller.register(listen_fd, select.POLLIN)
        finally:
            if main:
                signal.set_wakeup_fd(old_wakeup)
            if client is not None:
                with contextlib.suppress(OSError):
                    client.conn.shutdown(socket.SHUT_RDWR)  # ends its blocking read
                self._client_done.wait(CLIENT_JOIN_TIMEOUT)
                client.conn.close()
            self._clients.put(None)
            self.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def _client_finished(self, client: ControlConnection) -> None:
        """The control thread is done with ``client``: close it, raise what broke it."""
        self._client_done.clear()
        client.conn.close()
        if self._client_error is not None:
            raise self._client_error

    def _control_loop(self) -> None:
        """The "control" thread: each client handed over, in a blocking request loop."""
        while (client := self._clients.get()) is not None:
            try:
                client.serve(self._exit.is_set)
            except BaseException as exc:  # a bug: the main thread raises it, as it would have
                self._client_error = exc
            finally:
                self._client_done.set()
                self.wake()

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
        for sock in (self._ctrl_listener, self._data_listener):
            if sock is not None:
                sock.close()
        for ep in (self.ctrl_ep, self.data_ep):
            if ep is not None and ep.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ep.path)
