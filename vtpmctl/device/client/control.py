"""Client side of the swtpm control protocol.

``ControlClient`` speaks in commands (caps, init, get_state …) and knows
nothing about framing. A ``Transport`` moves one command at a time: the
socket transport frames big-endian messages on a unix or TCP stream, the
ioctl transport (CUSE) issues native-endian ioctls. The two differ most in
how state blobs travel (one reply on a socket, 3072-byte chunks on CUSE), so
whole-blob transfer is a transport operation and callers never see chunks.

This module is on the start-up path of every ``vtpmctl`` query, so it keeps
its imports to what a single control round trip needs.
"""

from __future__ import annotations

import _socket  # the C module: socket.py adds selectors, enums and array on the path
import errno
import os
import stat
import struct
import sys
import time
from abc import ABC, abstractmethod

from vtpmctl.device.protocol import (
    HASH_DATA_MAX,
    MESSAGES,
    NON_FATAL,
    RESULT,
    SET_STATEBLOB_MAX,
    STATE_BLOB_CHUNK,
    BlobType,
    Cmd,
    InfoFlag,
    InitFlag,
    Res,
    StateFlag,
    decode_ioctl_response,
    encode_ioctl_request,
    encode_socket_request,
    socket_error_size,
)
from vtpmctl.errors import DeviceError

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType
    from typing import Any, Self

DEFAULT_TIMEOUT = 10.0  # seconds for one control round trip

# A control reply longer than this is not from a TPM: swtpm refuses blobs over
# 512 KiB on the way in, and a real permanent state is tens of KiB.
_MAX_REPLY_DATA = 16 * 1024 * 1024
# Every result a TPM can produce fits in 16 bits (TPM 1.2 codes, the 0x800
# non-fatal bit, TPM 2 response codes). Anything larger is somebody else's bytes.
_MAX_RESULT = 0xFFFF


# ---------------------------------------------------------------- errors


_RESULT_NAMES = {r: "TPM_" + r.name for r in Res} | {Res.TPM2_FAILURE: "TPM_RC_FAILURE"}


def result_name(result: int) -> str:
    """The symbolic name of a control result, or 'unknown' for codes swtpm never sends."""
    try:
        return _RESULT_NAMES[Res(result)]
    except ValueError:
        return "unknown"


def _explain(cmd: Cmd, result: int, target: str) -> str:
    """What a failed result most likely means for this command, as advice."""
    msg = MESSAGES[cmd]
    if result == Res.BAD_ORDINAL:
        if msg.needs_running:
            return f"the TPM is not running; initialise it first (vtpmctl ctl {target} init)"
        if msg.needs_running is False:
            return f"the TPM is running; stop it first (vtpmctl ctl {target} stop)"
        if msg.stopped_to_set is not None:
            return (
                f"the buffer size can only change while the TPM is stopped "
                f"(vtpmctl ctl {target} stop)"
            )
        return "the peer does not implement this command"
    if result == Res.TPM2_FAILURE and cmd == Cmd.INIT:
        return "the TPM could not load its state (wrong state key, or corrupt state?)"
    if result == Res.FAIL and cmd in (Cmd.INIT, Cmd.LOCK_STORAGE):
        return (
            "the storage lock could not be taken or the TPM failed to start "
            "(is another process using the same state?)"
        )
    if result == Res.KEYNOTFOUND:
        return "the blob is encrypted with a key this TPM was not given"
    if result == Res.DECRYPT_ERROR:
        return "the blob could not be decrypted (wrong key, or a corrupt blob)"
    if result == Res.BAD_LOCALITY:
        return "the TPM does not accept that locality"
    if result == Res.BAD_TYPE and cmd == Cmd.SET_STATEBLOB:
        return "a TPM 2 has no savestate blob"
    if result == Res.BAD_PARAMETER:
        return "the peer rejected the request's format or size"
    if result == Res.IOERROR and cmd == Cmd.SET_STATEBLOB:
        return "the peer could not lock its storage (swtpm exits in this case)"
    return "see the TPM's log"


class ControlError(DeviceError):
    """The TPM answered a control command with a non-zero result."""

    def __init__(self, cmd: Cmd, result: int, target: str = "the target") -> None:
        self.cmd = cmd
        self.result = result
        self.target = target
        super().__init__(
            f"CMD_{cmd.name} failed: TPM result {result:#x} ({result_name(result)}): "
            f"{_explain(cmd, result, target)}"
        )


class TargetError(DeviceError):
    """The target could not be reached or does not speak the control protocol.

    Messages are one line that names the target and says what to do.
    """

    def __init__(self, message: str, target: str | None = None) -> None:
        self.target = target
        super().__init__(message)


# ---------------------------------------------------------------- transports


class Reply:
    """One decoded control reply: result, fixed fields and trailing bytes."""

    __slots__ = ("result", "fields", "data")

    def __init__(self, result: int, fields: dict[str, int], data: bytes = b"") -> None:
        self.result = result
        self.fields = fields
        self.data = data

    def __repr__(self) -> str:
        return f"Reply(result={self.result:#x}, fields={self.fields}, data={len(self.data)} bytes)"


class Transport(ABC):
    """Moves control commands to one TPM; one command in flight at a time."""

    name: str  # how the target is shown in messages, e.g. "unix:/run/vtpm/x.ctrl"
    timeout: float = DEFAULT_TIMEOUT  # seconds per command unless a call says otherwise

    @abstractmethod
    def call(
        self,
        cmd: Cmd,
        fields: Mapping[str, int] | None = None,
        data: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> Reply:
        """Send one command and return its reply, whatever the result."""

    @abstractmethod
    def get_blob(self, blob_type: BlobType, state_flags: int) -> Reply:
        """CMD_GET_STATEBLOB for a whole blob; ``data`` holds all of it."""

    @abstractmethod
    def set_blob(self, blob_type: BlobType, data: bytes, state_flags: int) -> Reply:
        """CMD_SET_STATEBLOB for a whole blob; returns the final reply."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection or device; the transport cannot be used afterwards."""


class SocketTransport(Transport):
    """The control channel on a unix or TCP stream socket, fields big-endian.

    swtpm reads each command within 500 ms of its first byte and serves one
    control client at a time, so a request is always a single ``sendall`` and
    the reply is read before the next request is sent.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        name: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        if name is None:
            name = f"unix:{address}" if isinstance(address, str) else _tcp_name(*address)
        self.name = name
        self._sock: _socket.socket | None = None

    # -- connection

    def connect(self) -> None:
        """Open the connection now rather than on the first command."""
        if self._sock is not None:
            return
        if isinstance(self.address, str):
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        else:
            sock = self._tcp_socket(*self.address)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
        except OSError as exc:
            sock.close()
            raise self._connect_error(exc) from exc
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def _tcp_socket(self, host: str, port: int) -> _socket.socket:
        try:
            infos = _socket.getaddrinfo(host, port, type=_socket.SOCK_STREAM)
        except _socket.gaierror as exc:
            raise TargetError(
                f"{self.name}: cannot resolve host {host!r} ({exc.strerror}); check the host name",
                self.name,
            ) from exc
        family, _, _, _, sockaddr = infos[0]
        self.address = (str(sockaddr[0]), int(sockaddr[1]))
        return _socket.socket(family, _socket.SOCK_STREAM)

    def _connect_error(self, exc: OSError) -> TargetError:
        name = self.name
        if isinstance(exc, TimeoutError):
            return TargetError(
                f"{name}: timed out connecting after {self.timeout:g} s; "
                "check the address and that the TPM process is alive",
                name,
            )
        if isinstance(self.address, str):
            path = self.address
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return TargetError(
                    f"{name}: no such socket; is the TPM running? (check the path, or start it)",
                    name,
                )
            except PermissionError:
                return TargetError(
                    f"{name}: permission denied; run as a user who may "
                    "reach the socket (its directory and the socket itself)",
                    name,
                )
            except OSError as err:
                return TargetError(f"{name}: {err.strerror}", name)
            if not stat.S_ISSOCK(st.st_mode):
                return TargetError(
                    f"{name}: {path} is not a socket; give the TPM's control socket", name
                )
            if exc.errno in (errno.EACCES, errno.EPERM):
                return TargetError(
                    f"{name}: permission denied; run as a user who may "
                    "write to the socket (owner, group or root)",
                    name,
                )
            if exc.errno == errno.ECONNREFUSED:
                return TargetError(
                    f"{name}: nothing is listening (a stale socket: the TPM "
                    "process has exited); start the TPM again",
                    name,
                )
        elif exc.errno == errno.ECONNREFUSED:
            return TargetError(
                f"{name}: connection refused; check the port and that the "
                "TPM's control channel listens there",
                name,
            )
        return TargetError(f"{name}: cannot connect: {exc.strerror or exc}", name)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- I/O

    def _send(self, buf: bytes, deadline: float, cmd: Cmd) -> None:
        sock = self._require()
        sock.settimeout(self._remaining(deadline, cmd))
        try:
            # MSG_NOSIGNAL: a peer that went away must not kill us with SIGPIPE
            # even when the process restored the default SIGPIPE handler.
            sock.sendall(buf, _socket.MSG_NOSIGNAL)
        except TimeoutError as exc:
            raise self._timeout_error(cmd) from exc
        except OSError as exc:
            self.close()
            raise TargetError(
                f"{self.name}: the connection broke while sending "
                f"({exc.strerror or exc}); is the TPM process alive?",
                self.name,
            ) from exc

    def _recv_exact(self, n: int, deadline: float, cmd: Cmd) -> bytes:
        sock = self._require()
        buf = bytearray()
        while len(buf) < n:
            sock.settimeout(self._remaining(deadline, cmd))
            try:
                chunk = sock.recv(n - len(buf))
            except TimeoutError as exc:
                raise self._timeout_error(cmd) from exc
            except OSError as exc:
                self.close()
                raise TargetError(
                    f"{self.name}: the connection broke while reading the "
                    f"reply to CMD_{cmd.name} ({exc.strerror or exc})",
                    self.name,
                ) from exc
            if not chunk:
                self.close()
                if not buf:
                    raise TargetError(
                        f"{self.name}: closed the connection without answering "
                        f"CMD_{cmd.name}; is it a TPM control channel?",
                        self.name,
                    )
                raise TargetError(
                    f"{self.name}: sent a short reply to CMD_{cmd.name} "
                    f"({len(buf)} of {n} bytes); not a TPM control channel?",
                    self.name,
                )
            buf += chunk
        return bytes(buf)

    def _remaining(self, deadline: float, cmd: Cmd) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timeout_error(cmd)
        return left

    def _timeout_error(self, cmd: Cmd) -> TargetError:
        """Hang up and say what became of the request.

        A vtpmctl TPM drops a request whose client hung up before it was served,
        so a request still unread is withdrawn for good; one the peer has read may
        be running. On a unix socket the bytes the peer has not read yet are ours
        to count (SIOCOUTQ); on TCP they cannot be told apart, and the connection
        is reset rather than closed so that the peer sees the hang-up at once.
        """
        unread = self._unread_bytes()
        if self._sock is not None and not isinstance(self.address, str):
            self._sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()
        name, what, after = self.name, f"CMD_{cmd.name}", f"{self.timeout:g} s"
        if unread:
            text = (
                f"{name}: another client (such as QEMU) holds the control channel, or "
                f"the TPM process is hung; {what} was withdrawn unread after {after} "
                "and not carried out (a swtpm may still run it once the channel is free)"
            )
        elif unread is None:
            text = (
                f"{name}: no reply to {what} within {after}; if another client (such as "
                "QEMU) holds the control channel the request was withdrawn and not carried "
                "out, otherwise the TPM may still be carrying it out"
            )
        else:
            text = (
                f"{name}: took {what} but sent no reply within {after}; it may still be "
                "carrying it out (is it the control channel, not the data channel?)"
            )
        return TargetError(text, name)

    def _unread_bytes(self) -> int | None:
        """How much of what we sent the unix peer has not read; None if unknown."""
        if self._sock is None or not isinstance(self.address, str):
            return None
        import fcntl
        import termios

        buf = bytearray(4)
        try:
            fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, buf)
        except OSError:
            return None
        return int.from_bytes(buf, sys.byteorder)

    def _not_a_tpm(self, what: str) -> TargetError:
        self.close()
        return TargetError(f"{self.name}: {what}; is it a TPM control channel?", self.name)

    def _require(self) -> _socket.socket:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        return self._sock

    # -- commands

    def call(
        self,
        cmd: Cmd,
        fields: Mapping[str, int] | None = None,
        data: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> Reply:
        msg = MESSAGES[cmd]
        request = encode_socket_request(cmd, dict(fields or {}), data)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._require()
        self._send(request, deadline, cmd)
        # The first 4 bytes decide how much follows: errors are short.
        head = self._recv_exact(RESULT.size(), deadline, cmd)
        result = RESULT.unpack("big", head)["result"]
        if result > _MAX_RESULT:
            raise self._not_a_tpm(
                f"answered CMD_{cmd.name} with {head.hex()}, which is no TPM result"
            )
        layout = msg.response if result == Res.SUCCESS else msg.error_response
        size = layout.size() if result == Res.SUCCESS else socket_error_size(cmd, result)
        if size > len(head):
            head += self._recv_exact(size - len(head), deadline, cmd)
        if size < layout.size():
            return Reply(result, {"result": result})
        values = layout.unpack("big", head)
        payload = b""
        if msg.data == "resp" and "length" in values:
            length = values["length"]
            if length > _MAX_REPLY_DATA:
                raise self._not_a_tpm(f"announced {length} bytes of CMD_{cmd.name} data")
            if length:
                payload = self._recv_exact(length, deadline, cmd)
        return Reply(result, values, payload)

    def get_blob(self, blob_type: BlobType, state_flags: int) -> Reply:
        # A socket peer sends everything from the offset in one reply; asking
        # again would make it regenerate the blob (a fresh IV when encrypted).
        reply = self.call(
            Cmd.GET_STATEBLOB, {"state_flags": state_flags, "type": blob_type, "offset": 0}
        )
        if reply.result == Res.SUCCESS:
            total, length = reply.fields["totlength"], reply.fields["length"]
            if total != length:
                raise self._not_a_tpm(
                    f"sent {length} of {total} bytes of a state blob in one reply"
                )
        return reply

    def set_blob(self, blob_type: BlobType, data: bytes, state_flags: int) -> Reply:
        # Header with the whole length, then the bytes, in one write.
        return self.call(
            Cmd.SET_STATEBLOB,
            {"state_flags": state_flags, "type": blob_type, "length": len(data)},
            data,
        )


def _tcp_name(host: str, port: int) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


class IoctlTransport(Transport):
    """A CUSE character device: native-endian ioctls on an open file descriptor.

    A subclass supplies ``ioctl``; this class owns the encoding and the CUSE
    chunking rules (docs/protocol.md#state-blobs): GET loops on the offset in 3072-byte
    chunks, SET sends 3072-byte chunks where a shorter one (possibly empty)
    ends the blob.
    """

    @abstractmethod
    def ioctl(self, request: int, buf: bytearray) -> bytes:
        """Issue one ioctl with the whole union buffer; return the buffer after it."""

    def call(
        self,
        cmd: Cmd,
        fields: Mapping[str, int] | None = None,
        data: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> Reply:
        msg = MESSAGES[cmd]
        out = self.ioctl(msg.ioctl, encode_ioctl_request(cmd, dict(fields or {}), data))
        values = decode_ioctl_response(cmd, out)
        result = values.get("result", Res.SUCCESS)  # PTM_GET_CAPABILITY has no result field
        payload = b""
        if msg.data == "resp" and result == Res.SUCCESS:
            start = msg.ioctl_resp.size()
            payload = bytes(out[start : start + min(values["length"], STATE_BLOB_CHUNK)])
        return Reply(result, values, payload)

    def get_blob(self, blob_type: BlobType, state_flags: int) -> Reply:
        chunks: list[bytes] = []
        offset = 0
        while True:
            reply = self.call(
                Cmd.GET_STATEBLOB, {"state_flags": state_flags, "type": blob_type, "offset": offset}
            )
            if reply.result != Res.SUCCESS:
                return reply
            chunks.append(reply.data)
            offset += len(reply.data)
            if not reply.data or offset >= reply.fields["totlength"]:
                break
        blob = b"".join(chunks)
        fields = dict(reply.fields, totlength=len(blob), length=len(blob))
        return Reply(reply.result, fields, blob)

    def set_blob(self, blob_type: BlobType, data: bytes, state_flags: int) -> Reply:
        # A chunk shorter than 3072 bytes ends the transfer, so a blob whose size
        # is a multiple of 3072 (including 0) needs a final empty chunk.
        offsets = list(range(0, len(data), STATE_BLOB_CHUNK))
        if len(data) % STATE_BLOB_CHUNK == 0:
            offsets.append(len(data))
        reply = Reply(Res.SUCCESS, {})
        for off in offsets:
            chunk = data[off : off + STATE_BLOB_CHUNK]
            reply = self.call(
                Cmd.SET_STATEBLOB,
                {"state_flags": state_flags, "type": blob_type, "length": len(chunk)},
                chunk,
            )
            if reply.result != Res.SUCCESS:
                break
        return reply


# ---------------------------------------------------------------- the client


class ControlClient:
    """Control commands of one TPM, as methods; any non-zero result raises ControlError."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @property
    def name(self) -> str:
        return self.transport.name

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        cmd: Cmd,
        fields: Mapping[str, int] | None = None,
        data: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> Reply:
        reply = self.transport.call(cmd, fields, data, timeout=timeout)
        if reply.result != Res.SUCCESS:
            raise ControlError(cmd, reply.result, self.name)
        return reply

    def caps(self) -> int:
        """The PTM_CAP_* bits the peer implements."""
        return self._call(Cmd.GET_CAPABILITY).fields["caps"]

    def init(self, flags: int = 0) -> None:
        """(Re)start the TPM from its stored state; see InitFlag.DELETE_VOLATILE."""
        self._call(Cmd.INIT, {"init_flags": int(InitFlag(flags))})

    def stop(self) -> None:
        self._call(Cmd.STOP)

    def shutdown(self) -> None:
        """Stop the TPM and make the peer process exit."""
        self._call(Cmd.SHUTDOWN)

    def get_established(self) -> bool:
        return bool(self._call(Cmd.GET_TPMESTABLISHED).fields["bit"])

    def set_locality(self, locality: int) -> None:
        self._call(Cmd.SET_LOCALITY, {"loc": _u8(locality, "locality")})

    def reset_established(self, locality: int) -> None:
        """TPMs allow this only from locality 3 or 4."""
        self._call(Cmd.RESET_TPMESTABLISHED, {"loc": _u8(locality, "locality")})

    def hash_start(self) -> None:
        self._call(Cmd.HASH_START)

    def hash_data(self, data: bytes) -> None:
        """Feed the DRTM hash; sent in pieces that every transport accepts."""
        for off in range(0, len(data), HASH_DATA_MAX):
            chunk = data[off : off + HASH_DATA_MAX]
            self._call(Cmd.HASH_DATA, {"length": len(chunk)}, chunk)

    def hash_end(self) -> None:
        self._call(Cmd.HASH_END)

    def cancel(self) -> None:
        self._call(Cmd.CANCEL_TPM_CMD)

    def store_volatile(self) -> None:
        self._call(Cmd.STORE_VOLATILE)

    def get_config(self) -> int:
        """ConfigFlag bits: which keys (state, migration) the peer was given."""
        return self._call(Cmd.GET_CONFIG).fields["flags"]

    def set_buffersize(self, size: int = 0) -> tuple[int, int, int]:
        """Set (or with 0 only query) the TPM I/O buffer size: (current, min, max)."""
        f = self._call(Cmd.SET_BUFFERSIZE, {"buffersize": _u32(size, "buffer size")}).fields
        return f["buffersize"], f["minsize"], f["maxsize"]

    def get_info(self, flags: int) -> dict[str, Any]:
        """The peer's JSON description for InfoFlag bits, as one parsed object.

        The string arrives in pieces of at most 3072 bytes; totlength counts the
        terminating NUL.
        """
        import json

        flags = int(InfoFlag(flags))
        parts: list[bytes] = []
        offset = 0
        while True:
            reply = self._call(Cmd.GET_INFO, {"flags": flags, "offset": offset})
            total = reply.fields["totlength"]
            if total > _MAX_REPLY_DATA:
                raise TargetError(
                    f"{self.name}: announced {total} bytes of info; is it a TPM control channel?",
                    self.name,
                )
            parts.append(reply.data)
            offset += len(reply.data)
            if not reply.data or offset >= total:
                break
        text = b"".join(parts).split(b"\0", 1)[0]
        try:
            obj = json.loads(text) if text.strip() else {}
        except (ValueError, RecursionError) as exc:
            raise TargetError(
                f"{self.name}: CMD_GET_INFO returned text that is not JSON ({exc})", self.name
            ) from exc
        if not isinstance(obj, dict):
            raise TargetError(
                f"{self.name}: CMD_GET_INFO returned JSON that is not an object", self.name
            )
        return obj

    def lock_storage(self, retries: int = 0) -> None:
        """(Re)take the storage lock; the peer retries every 10 ms up to ``retries`` times."""
        retries = _u32(retries, "retries")
        # The peer may spend retries x 10 ms before it answers.
        timeout = self.transport.timeout + retries * 0.01
        self._call(Cmd.LOCK_STORAGE, {"retries": retries}, timeout=timeout)

    def get_state(self, blob_type: BlobType | int, decrypted: bool = True) -> tuple[int, bytes]:
        """One state blob as (response state_flags, bytes); a missing blob is b"".

        ``decrypted`` asks the peer to remove state-key encryption (what QEMU and
        swtpm_ioctl ask for); migration-key encryption stays either way. A
        result with the non-fatal bit (0x800) means the blob does not exist.
        """
        flags = int(StateFlag.DECRYPTED) if decrypted else 0
        reply = self.transport.get_blob(BlobType(blob_type), flags)
        if reply.result & NON_FATAL:
            return reply.fields.get("state_flags", 0), b""
        if reply.result != Res.SUCCESS:
            raise ControlError(Cmd.GET_STATEBLOB, reply.result, self.name)
        return reply.fields["state_flags"], reply.data

    def set_state(self, blob_type: BlobType | int, data: bytes, state_flags: int = 0) -> None:
        """Stage a blob in a stopped TPM; the next init() makes it live.

        ``state_flags`` StateFlag.ENCRYPTED says the payload is still state-key
        encrypted (the blob header says so too).
        """
        if len(data) > SET_STATEBLOB_MAX:
            raise ValueError(
                f"state blob of {len(data)} bytes is larger than the "
                f"{SET_STATEBLOB_MAX} bytes a TPM accepts"
            )
        reply = self.transport.set_blob(BlobType(blob_type), data, int(StateFlag(state_flags)))
        if reply.result != Res.SUCCESS:
            raise ControlError(Cmd.SET_STATEBLOB, reply.result, self.name)


def _u8(value: int, what: str) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{what} {value} is out of range 0..255")
    return value


def _u32(value: int, what: str) -> int:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{what} {value} is out of range 0..4294967295")
    return value
