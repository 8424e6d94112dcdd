"""CUSE frontend: the TPM as the character device /dev/vtpm-NAME.

The kernel's CUSE protocol is spoken directly on /dev/cuse with the standard
library: pyfuse3 has no CUSE support, and the handful of messages a character
device receives is smaller than a binding to libfuse would be.

Naming: ``--cuse NAME`` registers ``DEVNAME=vtpm-NAME``, so the node is
``/dev/vtpm-NAME``; a NAME that already starts with ``vtpm-`` is used as is.

Threads: a reader thread blocks in read() on /dev/cuse and answers every
request; the main thread only waits, so signals are handled there at once.
TPM commands run inline on the reader, except the few that generate keys
(seconds under emulation): those run on a worker thread, like swtpm's CUSE
mode, so the device keeps answering while they run. Meanwhile
CMD_CANCEL_TPM_CMD and GET_CAPABILITY are served at once, another write()
gets EBUSY, a read() is parked and answered when the response exists (or
with EINTR when the caller is interrupted), and other ioctls wait in order
for the command to end. To stop, the main thread aborts the connection
(sysfs ``abort``), which ends the reader's read().

ioctls are "restricted" (the kernel copies exactly the size encoded in the
request number), as with swtpm, so every PTM ioctl needs no retry round.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from vtpmctl.device.protocol import (
    HASH_DATA_MAX,
    IOCTL_TO_CMD,
    MESSAGES,
    SET_STATEBLOB_MAX,
    STATE_BLOB_CHUNK,
    TPM2_SHORT_WRITE_RESPONSE,
    TPM12_KEYGEN_ORDINALS,
    TPM12_SHORT_WRITE_RESPONSE,
    TPM_HEADER_SIZE,
    BlobType,
    Cmd,
    Res,
    decode_ioctl_request,
    encode_ioctl_response,
    ioctl_fields,
    ioctl_sizes,
    tpm_code,
)
from vtpmctl.engine.libtpms import CommandBuffer
from vtpmctl.engine.tpm import ControlReply, Engine, FatalEngineError
from vtpmctl.errors import ServeError

log = logging.getLogger(__name__)

CUSE_DEVICE = "/dev/cuse"
DEVNAME_PREFIX = "vtpm-"
FUSE_KERNEL_VERSION = 7
FUSE_MIN_MINOR = 16  # ioctl and poll exist since 7.11; 7.16 fixed the ioctl iovec layout
FUSE_OUR_MINOR = 31
# The kernel splits one write() into requests of at most this size (and of at most
# its own 128 KiB page limit), so any sane TPM command arrives in one request.
MAX_WRITE = 128 * 1024
MAX_READ = 128 * 1024
READ_BUFSIZE = MAX_WRITE + 4096  # kernel minimum: header + fuse_write_in + max_write
TPM_COMMAND_MAX = 4096  # a longer write() is truncated, as swtpm does
NODE_TIMEOUT = 10.0  # seconds for devtmpfs to show the node

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,62}")


class Op(IntEnum):
    """FUSE opcodes a CUSE character device receives."""

    OPEN = 14
    READ = 15
    WRITE = 16
    RELEASE = 18
    FLUSH = 25
    INTERRUPT = 36
    IOCTL = 39
    POLL = 40
    CUSE_INIT = 4096


FUSE_NOTIFY_POLL = 1
FUSE_POLL_SCHEDULE_NOTIFY = 1
FUSE_IOCTL_UNRESTRICTED = 2
FUSE_IOCTL_RETRY = 4

# Kernel structures (host byte order, no implicit padding).
IN_HEADER = struct.Struct("=IIQQIIIHH")  # fuse_in_header
OUT_HEADER = struct.Struct("=IiQ")  # fuse_out_header
CUSE_INIT_IN = struct.Struct("=IIII")
CUSE_INIT_OUT = struct.Struct("=IIIIIIII40x")
OPEN_IN = struct.Struct("=II")
OPEN_OUT = struct.Struct("=QII")
RW_IN = struct.Struct("=QQIIQII")  # fuse_read_in and fuse_write_in share the layout
WRITE_OUT = struct.Struct("=II")
RELEASE_IN = struct.Struct("=QIIQ")
IOCTL_IN = struct.Struct("=QIIQII")
IOCTL_OUT = struct.Struct("=iIII")
POLL_IN = struct.Struct("=QQII")
POLL_OUT = struct.Struct("=II")
INTERRUPT_IN = struct.Struct("=Q")
NOTIFY_POLL_OUT = struct.Struct("=Q")

HDR = IN_HEADER.size
# Replies whose header and body are packed in one go (the hot path).
_WRITE_REPLY = struct.Struct("=IiQII")
_IOCTL_REPLY = struct.Struct("=IiQiIII")
_POLL_REPLY = struct.Struct("=IiQII")

_POLLIN = select.POLLIN | select.POLLRDNORM
_POLLOUT = select.POLLOUT | select.POLLWRNORM

# TPM commands that generate keys: worth a thread, and the ones libtpms can cancel.
_LONG_TPM2 = frozenset({0x131, 0x153, 0x191})  # CreatePrimary, Create, CreateLoaded
_LONG_TPM12 = TPM12_KEYGEN_ORDINALS


class CuseError(ServeError):
    """The device cannot be created; the message names the problem and the fix."""


class ReplyError(Exception):
    """Answer the current request with this errno.

    Control flow inside the server, outside the error tree: the request loop
    turns it into an errno reply to the kernel; it never reaches the user.
    """

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


# ---------------------------------------------------------------- pure wire helpers


def device_name(name: str) -> str:
    """The DEVNAME for ``--cuse NAME``: ``vtpm-NAME``, never ``vtpm-vtpm-NAME``."""
    base = name[len(DEVNAME_PREFIX) :] if name.startswith(DEVNAME_PREFIX) else name
    if not _NAME_RE.fullmatch(base):
        raise CuseError(
            f"bad device name {name!r}: use 1-63 letters, digits, '.', '_', "
            "'+' or '-', starting with a letter or digit"
        )
    return DEVNAME_PREFIX + base


def encode_reply(unique: int, body: bytes = b"", error: int = 0) -> bytes:
    """One reply: an error (a positive errno here) is the header alone."""
    if error:
        return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def encode_init_reply(unique: int, kernel_major: int, kernel_minor: int, devname: str) -> bytes:
    """The CUSE_INIT answer that registers DEVNAME (restricted ioctls, dynamic major)."""
    if kernel_major != FUSE_KERNEL_VERSION or kernel_minor < FUSE_MIN_MINOR:
        raise CuseError(
            f"the kernel speaks FUSE {kernel_major}.{kernel_minor}; "
            f"need {FUSE_KERNEL_VERSION}.{FUSE_MIN_MINOR} or newer"
        )
    minor = min(kernel_minor, FUSE_OUR_MINOR)
    info = f"DEVNAME={devname}\0".encode()
    body = CUSE_INIT_OUT.pack(FUSE_KERNEL_VERSION, minor, 0, 0, MAX_READ, MAX_WRITE, 0, 0)
    return encode_reply(unique, body + info)


def lookup_ioctl(request: int, in_size: int, out_size: int) -> Cmd:
    """The control command of a PTM ioctl; ReplyError for anything else.

    An unknown number is ENOTTY. A PTM number whose size or direction does not
    match (a short buffer, or a 32-bit caller's layout) is EINVAL. SET_DATAFD
    has no meaning on a device and is ENOTTY, as the capabilities say.
    """
    cmd = IOCTL_TO_CMD.get(request)
    if cmd is None:
        nr_type = ioctl_fields(request)[2]
        for known in IOCTL_TO_CMD:
            if ioctl_fields(known)[2] == nr_type:
                raise ReplyError(errno.EINVAL)
        raise ReplyError(errno.ENOTTY)
    if cmd == Cmd.SET_DATAFD:
        raise ReplyError(errno.ENOTTY)
    if (in_size, out_size) != ioctl_sizes(request):
        raise ReplyError(errno.EINVAL)
    return cmd


def is_long_command(cmd: bytes | bytearray | memoryview, tpm2: bool) -> bool:
    """Whether a TPM command generates a key (runs on the worker thread)."""
    return tpm_code(cmd) in (_LONG_TPM2 if tpm2 else _LONG_TPM12)


class BlobUpload:
    """SET_STATEBLOB over CUSE (spec §3.3), reassembled.

    Chunks of exactly 3072 bytes say "more follows"; a shorter one (even
    empty) ends the blob. An empty first chunk of a new transfer opens the
    streaming mode instead, where write() calls carry the bytes until the
    next (normally empty) chunk ends it. A chunk of another blob type starts
    a new transfer.
    """

    def __init__(self) -> None:
        self.blob_type: int | None = None
        self.state_flags = 0
        self.streaming = False
        self._data = bytearray()

    def reset(self) -> None:
        self.blob_type = None
        self.state_flags = 0
        self.streaming = False
        self._data = bytearray()

    @property
    def active(self) -> bool:
        return self.blob_type is not None

    def _append(self, data: bytes | memoryview) -> None:
        # Keep one byte past the limit so the commit can tell the blob is too big.
        room = SET_STATEBLOB_MAX + 1 - len(self._data)
        if room > 0:
            self._data += data[:room]

    def chunk(self, blob_type: int, state_flags: int, data: bytes) -> bytes | None:
        """Take one ioctl chunk; the whole blob when this chunk ends it."""
        if blob_type != self.blob_type:
            self.reset()
            self.blob_type = blob_type
            if not data:
                self.streaming = True
                return None
        self.state_flags = state_flags
        self._append(data)
        if len(data) == STATE_BLOB_CHUNK:
            return None
        blob = bytes(self._data)
        self.reset()
        return blob

    def write(self, data: bytes | memoryview) -> None:
        """Bytes streamed with write() between the opening and the closing ioctl."""
        self._append(data)


@dataclass
class BlobDownload:
    """One GET_STATEBLOB blob, generated once and handed out in pieces (spec §3.2).

    A transfer that starts at offset 0 generates a fresh blob; the chunks of
    one transfer therefore all come from the same bytes (one IV when
    encrypted). ``after_send`` runs once the last byte has gone out.
    """

    blob_type: int
    request_flags: int
    blob: bytes
    state_flags: int
    after_send: Callable[[], None] | None = None
    read_pos: int | None = None  # not None: read() streams the rest from here
    sent_all: bool = False

    def chunk(self, offset: int) -> bytes:
        data = self.blob[offset : offset + STATE_BLOB_CHUNK]
        end = offset + len(data)
        self.read_pos = end if end < len(self.blob) else None
        self._note_sent(end)
        return data

    def read(self, size: int) -> bytes:
        """read() in blob mode; a short read ends the mode."""
        pos = self.read_pos or 0
        data = self.blob[pos : pos + size]
        end = pos + len(data)
        self.read_pos = end if len(data) == size else None
        self._note_sent(end)
        return data

    def _note_sent(self, end: int) -> None:
        if end >= len(self.blob):
            self.sent_all = True

    def take_after_send(self) -> Callable[[], None] | None:
        """The post-transfer action, once, when everything has been sent."""
        if not self.sent_all:
            return None
        action, self.after_send = self.after_send, None
        return action


# ---------------------------------------------------------------- the server


@dataclass
class _Deferred:
    unique: int
    cmd: Cmd
    data: bytes


class CuseServer:
    """Serves one engine as /dev/vtpm-NAME until request_exit() or CMD_SHUTDOWN.

    The device exists once the constructor returns; it disappears when the
    channel to /dev/cuse is closed (close(), or the process ending).
    """

    def __init__(
        self, engine: Engine, name: str, *, fd: int | None = None, wait_for_node: bool = True
    ) -> None:
        self.engine = engine
        self.devname = device_name(name)
        self.path = f"/dev/{self.devname}"
        self.exit_message: str | None = None
        self._stop = False  # request_exit() and CMD_SHUTDOWN set it
        self._mu = threading.Lock()
        self._tpm2 = engine.config.tpm2
        self._short_response = (
            TPM2_SHORT_WRITE_RESPONSE if self._tpm2 else TPM12_SHORT_WRITE_RESPONSE
        )
        self._rbuf = bytearray(READ_BUFSIZE)
        self._rview = memoryview(self._rbuf)
        self._cmdbuf = CommandBuffer()
        # Per-open state (reset on OPEN and RELEASE).
        self._opener: int | None = None
        self._next_fh = 1
        self._session = 0
        self._response = b""
        self._resp_pos = 0
        self._inflight = False  # a long command runs on the worker
        self._parked_read: tuple[int, int] | None = None  # (unique, size)
        self._poll_kh: int | None = None
        self._deferred: list[_Deferred] = []
        self._upload = BlobUpload()
        self._download: BlobDownload | None = None
        self._done = threading.Event()  # the reader has ended, or an exit was asked for
        if fd is None:
            fd = self._open_channel()
        self._fd = fd
        try:
            self._handshake()
            if wait_for_node:
                self._wait_for_node()
        except BaseException:
            self.close()
            raise
        self._handlers: dict[int, Callable[[int, int], None]] = {
            Op.OPEN: self._on_open,
            Op.READ: self._on_read,
            Op.WRITE: self._on_write,
            Op.RELEASE: self._on_release,
            Op.INTERRUPT: self._on_interrupt,
            Op.IOCTL: self._on_ioctl,
            Op.POLL: self._on_poll,
        }
        log.info("created %s", self.path)

    # ------------------------------------------------------------ setup

    def _open_channel(self) -> int:
        if os.path.exists(self.path):
            raise CuseError(
                f"{self.path} exists already; is another vtpmctl or swtpm "
                "serving that name? Choose another name or stop it"
            )
        try:
            return os.open(CUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CuseError(
                f"{CUSE_DEVICE} does not exist: this kernel has no CUSE; load "
                "it with 'modprobe cuse', or use --ctrl for sockets"
            ) from None
        except PermissionError:
            raise CuseError(
                f"no permission to open {CUSE_DEVICE}; creating a CUSE device needs root"
            ) from None
        except OSError as exc:
            raise CuseError(f"cannot open {CUSE_DEVICE}: {exc.strerror}") from None

    def _handshake(self) -> None:
        n = os.readv(self._fd, [self._rbuf])
        _len, opcode, unique, *_ = IN_HEADER.unpack_from(self._rview)
        if opcode != Op.CUSE_INIT or n < HDR + CUSE_INIT_IN.size:
            raise CuseError(f"{CUSE_DEVICE} sent opcode {opcode} instead of CUSE_INIT")
        major, minor, _unused, _flags = CUSE_INIT_IN.unpack_from(self._rview, HDR)
        try:
            os.write(self._fd, encode_init_reply(unique, major, minor, self.devname))
        except OSError as exc:
            raise CuseError(
                f"the kernel rejected the CUSE_INIT reply for {self.path}: {exc.strerror}"
            ) from None

    def _wait_for_node(self) -> None:
        """Return once /dev/NAME exists; the kernel refuses a name already in use."""
        sysfs = f"/sys/class/cuse/{self.devname}"
        deadline = time.monotonic() + NODE_TIMEOUT
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            for _fd, ev in poller.poll(0):
                if ev & (select.POLLERR | select.POLLHUP):
                    raise CuseError(
                        f"the kernel refused to create {self.path}; is the "
                        "name in use by another CUSE device?"
                    )
            try:
                if stat.S_ISCHR(os.stat(self.path).st_mode):
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                if os.path.exists(sysfs):
                    log.warning(
                        "%s is registered but no node appeared in /dev (no devtmpfs?)", self.devname
                    )
                    return
                raise CuseError(f"{self.path} did not appear within {NODE_TIMEOUT:g} s")
            time.sleep(0.01)

    # ------------------------------------------------------------ called from other threads

    def request_exit(self) -> None:
        """Safe from signal handlers and any thread."""
        self._stop = True
        self._done.set()

    def _fail(self, message: str) -> None:
        log.error("%s", message)
        if self.exit_message is None:
            self.exit_message = message
        self.request_exit()

    # ------------------------------------------------------------ main loop

    def serve_forever(self) -> None:
        reader = threading.Thread(target=self._read_loop, name="cuse", daemon=True)
        reader.start()
        try:
            # Signal handlers run on this thread while it waits.
            while not self._done.wait(0.5):
                pass
        finally:
            self._stop = True
            if reader.is_alive():
                self._abort_connection()
                reader.join(10)
            self.close(reader_alive=reader.is_alive())

    def _abort_connection(self) -> None:
        """End the reader's blocking read(): the kernel fails it with ENODEV."""
        try:
            with open(f"/sys/class/cuse/{self.devname}/abort", "w") as f:
                f.write("1")
        except OSError as exc:
            log.warning("cannot abort the CUSE connection of %s: %s", self.path, exc.strerror)

    def _read_loop(self) -> None:
        """The reader thread: one request per read(), answered before the next."""
        fd = self._fd
        buf = [self._rbuf]
        readv = os.readv
        unpack_header = IN_HEADER.unpack_from
        handlers = self._handlers
        view = self._rview
        try:
            while not self._stop:
                try:
                    n = readv(fd, buf)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.EINTR):  # a request already dropped
                        continue
                    if self._stop:
                        break
                    if exc.errno == errno.ENODEV:
                        self._fail(f"{self.path} was removed (the CUSE connection was aborted)")
                    else:
                        self._fail(f"reading {CUSE_DEVICE} failed: {exc.strerror}")
                    break
                if n < HDR:  # /dev/cuse never does this; a channel that did has ended
                    if not self._stop:
                        self._fail(f"the CUSE channel of {self.path} was closed")
                    break
                _len, opcode, unique = unpack_header(view)[:3]
                handler = handlers.get(opcode)
                try:
                    if handler is None:
                        self._send(encode_reply(unique, error=errno.ENOSYS))
                    else:
                        handler(unique, n)
                except ReplyError as exc:
                    self._send(encode_reply(unique, error=exc.errno))
                except FatalEngineError as exc:
                    self._send(encode_reply(unique, error=errno.EIO))
                    self._fail(str(exc))
                except Exception:
                    log.exception("request with opcode %d failed", opcode)
                    self._send(encode_reply(unique, error=errno.EIO))
        finally:
            self._done.set()

    def close(self, reader_alive: bool = False) -> None:
        """Remove the device (closing the channel unregisters it)."""
        with self._mu:
            fd, self._fd = self._fd, -1
            inflight = self._inflight
        # A reader still inside read() keeps using the descriptor; its number must
        # not be reused under it, so it is left to the process's end.
        if fd >= 0 and not reader_alive:
            os.close(fd)
        if inflight:
            self.engine.cancel()

    def _send(self, data: bytes) -> None:
        """Write one reply; a request the caller gave up on is not an error."""
        fd = self._fd
        if fd < 0:
            return
        try:
            os.write(fd, data)
        except OSError as exc:
            self._send_failed(exc)

    def _sendv(self, parts: list[bytes]) -> None:
        fd = self._fd
        if fd < 0:
            return
        try:
            os.writev(fd, parts)
        except OSError as exc:
            self._send_failed(exc)

    def _send_failed(self, exc: OSError) -> None:
        if exc.errno == errno.ENOENT:
            return
        if exc.errno == errno.ENODEV:
            self._fail(f"{self.path} was removed (the CUSE connection was aborted)")
            return
        log.error("cannot answer a request: %s", exc.strerror)

    # ------------------------------------------------------------ per-open state

    def _reset_open_state(self) -> None:
        self._response = b""
        self._resp_pos = 0
        self._upload.reset()
        self._download = None
        self._poll_kh = None

    def _on_open(self, unique: int, n: int) -> None:
        with self._mu:
            if self._opener is not None:
                raise ReplyError(errno.EBUSY)
            fh = self._next_fh
            self._next_fh += 1
            self._opener = fh
            self._reset_open_state()
        self._send(encode_reply(unique, OPEN_OUT.pack(fh, 0, 0)))

    def _on_release(self, unique: int, n: int) -> None:
        fh = RELEASE_IN.unpack_from(self._rview, HDR)[0]
        with self._mu:
            if fh == self._opener:
                self._opener = None
                self._session += 1  # a response still being computed is dropped
                self._reset_open_state()
                self._parked_read = None
        self._send(encode_reply(unique))

    # ------------------------------------------------------------ data path

    def _on_write(self, unique: int, n: int) -> None:
        view = self._rview
        size = RW_IN.unpack_from(view, HDR)[2]
        data = view[HDR + RW_IN.size : HDR + RW_IN.size + size]
        with self._mu:
            if self._download is not None and self._download.read_pos is not None:
                self._download.read_pos = None  # back to command mode
                raise ReplyError(errno.EIO)
            if self._upload.streaming:
                self._upload.write(data)
                self._send(_WRITE_REPLY.pack(_WRITE_REPLY.size, 0, unique, size, 0))
                return
            if self._inflight:
                raise ReplyError(errno.EBUSY)
            self._response = b""
            self._resp_pos = 0
        if size < TPM_HEADER_SIZE:
            response = self._short_response
        else:
            length = min(size, TPM_COMMAND_MAX)
            if is_long_command(data, self._tpm2):
                self._start_long(bytes(data[:length]))
                self._send(_WRITE_REPLY.pack(_WRITE_REPLY.size, 0, unique, size, 0))
                return
            cmdbuf = self._cmdbuf
            cmdbuf.view[:length] = data[:length]
            response = self.engine.process_buffer(cmdbuf, length)
        with self._mu:
            self._response = response
            self._resp_pos = 0
            kh, self._poll_kh = self._poll_kh, None
        self._send(_WRITE_REPLY.pack(_WRITE_REPLY.size, 0, unique, size, 0))
        if kh is not None:
            self._notify_poll(kh)

    def _start_long(self, command: bytes) -> None:
        with self._mu:
            self._inflight = True
            session = self._session
        threading.Thread(
            target=self._run_long, args=(command, session), name="tpm-worker", daemon=True
        ).start()

    def _run_long(self, command: bytes, session: int) -> None:
        """Worker: run one long command, then hand its response to the waiting reader."""
        buf = CommandBuffer()
        buf.view[: len(command)] = command
        try:
            response = self.engine.process_buffer(buf, len(command))
        except FatalEngineError as exc:
            response = self.engine.fatal_response
            self._fail(str(exc))
        except Exception:
            log.exception("TPM command failed")
            response = self.engine.fatal_response
        # ioctls that arrived meanwhile come after the command, in order; the
        # command counts as running until they are done.
        while True:
            with self._mu:
                if not self._deferred:
                    self._inflight = False  # in the same section: nothing can slip in
                    self._publish(response, session)
                    return
                item = self._deferred.pop(0)
            self._control_guarded(item.unique, item.cmd, item.data)

    def _publish(self, response: bytes, session: int) -> None:
        """Hand a worker's response to the reader side (caller holds the lock)."""
        if session != self._session:
            return  # its opener has gone
        self._response = response
        self._resp_pos = 0
        kh, self._poll_kh = self._poll_kh, None
        parked, self._parked_read = self._parked_read, None
        if parked is not None:
            unique, size = parked
            self._sendv([self._read_header(unique, min(size, len(response))), response[:size]])
            self._resp_pos = min(size, len(response))
        if kh is not None:
            self._notify_poll(kh)  # under the lock: close() cannot pull the fd away

    @staticmethod
    def _read_header(unique: int, length: int) -> bytes:
        return OUT_HEADER.pack(OUT_HEADER.size + length, 0, unique)

    def _on_read(self, unique: int, n: int) -> None:
        _fh, _off, size, _rflags, _owner, flags, _pad = RW_IN.unpack_from(self._rview, HDR)
        after: Callable[[], None] | None = None
        with self._mu:
            download = self._download
            pos = self._resp_pos
            if self._upload.streaming:
                raise ReplyError(errno.EIO)
            if download is not None and download.read_pos is not None:
                data = download.read(size)
                after = download.take_after_send()
            elif pos < len(self._response):
                data = self._response[pos : pos + size]
                self._resp_pos = pos + len(data)
            elif flags & os.O_NONBLOCK:
                raise ReplyError(errno.EAGAIN)
            elif self._inflight:
                self._parked_read = (unique, size)
                return
            else:
                # Nothing was written, so nothing will come: end of file, as swtpm answers.
                data = b""
            self._sendv([self._read_header(unique, len(data)), data])
        if after is not None:
            after()

    def _on_poll(self, unique: int, n: int) -> None:
        _fh, kh, flags, _events = POLL_IN.unpack_from(self._rview, HDR)
        with self._mu:
            revents = 0
            download = self._download
            if self._resp_pos < len(self._response) or (
                download is not None and download.read_pos is not None
            ):
                revents |= _POLLIN
            if not self._inflight:
                revents |= _POLLOUT
            if not revents & _POLLIN and flags & FUSE_POLL_SCHEDULE_NOTIFY:
                self._poll_kh = kh
        self._send(_POLL_REPLY.pack(_POLL_REPLY.size, 0, unique, revents, 0))

    def _notify_poll(self, kh: int) -> None:
        body = NOTIFY_POLL_OUT.pack(kh)
        self._send(OUT_HEADER.pack(OUT_HEADER.size + len(body), FUSE_NOTIFY_POLL, 0) + body)

    def _on_interrupt(self, unique: int, n: int) -> None:
        target = INTERRUPT_IN.unpack_from(self._rview, HDR)[0]
        with self._mu:
            if self._parked_read is not None and self._parked_read[0] == target:
                self._parked_read = None
                self._send(encode_reply(target, error=errno.EINTR))
                return
            for i, item in enumerate(self._deferred):
                if item.unique == target:
                    del self._deferred[i]
                    self._send(encode_reply(target, error=errno.EINTR))
                    return
        # Already answered (or never parked): an INTERRUPT itself gets no reply.

    # ------------------------------------------------------------ ioctls

    def _on_ioctl(self, unique: int, n: int) -> None:
        view = self._rview
        _fh, _flags, request, _arg, in_size, out_size = IOCTL_IN.unpack_from(view, HDR)
        cmd = lookup_ioctl(request, in_size, out_size)
        start = HDR + IOCTL_IN.size
        data = bytes(view[start : start + in_size])
        with self._mu:
            if self._inflight and not MESSAGES[cmd].while_busy:
                # Wait for the TPM command, as swtpm does, without blocking the device.
                self._deferred.append(_Deferred(unique, cmd, data))
                return
        self._control(unique, cmd, data)

    def _control_guarded(self, unique: int, cmd: Cmd, data: bytes) -> None:
        """_control off the reader thread: every failure still gets an answer."""
        try:
            self._control(unique, cmd, data)
        except ReplyError as exc:
            self._send(encode_reply(unique, error=exc.errno))
        except FatalEngineError as exc:
            self._send(encode_reply(unique, error=errno.EIO))
            self._fail(str(exc))
        except Exception:
            log.exception("deferred CMD_%s failed", cmd.name)
            self._send(encode_reply(unique, error=errno.EIO))

    def _control(self, unique: int, cmd: Cmd, data: bytes) -> None:
        """Run one PTM ioctl and answer it with the whole union buffer."""
        after: Callable[[], None] | None = None
        exit_after = False
        if cmd == Cmd.GET_STATEBLOB:
            out, after = self._get_stateblob(data)
        elif cmd == Cmd.SET_STATEBLOB:
            out = self._set_stateblob(data)
        else:
            reply = self._engine_control(cmd, data)
            values: dict[str, int] = {"result": reply.result}
            if reply.result == Res.SUCCESS:
                values.update(reply.fields)
            out = encode_ioctl_response(cmd, values, reply.data)
            after = reply.after_send
            exit_after = reply.exit_after
        self._send(_IOCTL_REPLY.pack(_IOCTL_REPLY.size + len(out), 0, unique, 0, 0, 0, 0) + out)
        if after is not None:
            after()
        if exit_after:
            self.request_exit()

    def _engine_control(self, cmd: Cmd, data: bytes) -> ControlReply:
        fields = decode_ioctl_request(cmd, data) if MESSAGES[cmd].ioctl_request.fields else {}
        payload = b""
        if cmd == Cmd.HASH_DATA:
            length = fields["length"]
            if length > HASH_DATA_MAX:
                return ControlReply(Res.FAIL)
            start = MESSAGES[cmd].ioctl_request.size()
            payload = data[start : start + length]
        if cmd in (Cmd.INIT, Cmd.STOP, Cmd.SHUTDOWN):
            with self._mu:
                self._upload.reset()
                self._download = None
        return self.engine.control(cmd, fields, payload)

    def _get_stateblob(self, data: bytes) -> tuple[bytes, Callable[[], None] | None]:
        req = decode_ioctl_request(Cmd.GET_STATEBLOB, data)
        blob_type, flags, offset = req["type"], req["state_flags"], req["offset"]
        download = self._download
        if (
            offset == 0
            or download is None
            or download.blob_type != blob_type
            or download.request_flags != flags
        ):
            reply = self.engine.control(
                Cmd.GET_STATEBLOB, {"state_flags": flags, "type": blob_type, "offset": 0}
            )
            if reply.result != Res.SUCCESS:
                with self._mu:
                    self._download = None
                return encode_ioctl_response(Cmd.GET_STATEBLOB, {"result": reply.result}), None
            download = BlobDownload(
                blob_type, flags, reply.data, reply.fields.get("state_flags", 0), reply.after_send
            )
        with self._mu:
            self._download = download
            chunk = download.chunk(offset)
        out = encode_ioctl_response(
            Cmd.GET_STATEBLOB,
            {
                "result": Res.SUCCESS,
                "state_flags": download.state_flags,
                "totlength": len(download.blob),
                "length": len(chunk),
            },
            chunk,
        )
        return out, download.take_after_send()

    def _set_stateblob(self, data: bytes) -> bytes:
        req = decode_ioctl_request(Cmd.SET_STATEBLOB, data)
        blob_type, flags, length = req["type"], req["state_flags"], req["length"]

        def result(rc: int) -> bytes:
            return encode_ioctl_response(Cmd.SET_STATEBLOB, {"result": rc})

        start = MESSAGES[Cmd.SET_STATEBLOB].ioctl_request.size()
        with self._mu:
            if not MESSAGES[Cmd.SET_STATEBLOB].allowed(self.engine.running):
                self._upload.reset()
                return result(Res.BAD_ORDINAL)
            if length > STATE_BLOB_CHUNK or blob_type not in BlobType._value2member_map_:
                self._upload.reset()
                return result(Res.BAD_PARAMETER)
            blob = self._upload.chunk(blob_type, flags, data[start : start + length])
        if blob is None:
            return result(Res.SUCCESS)
        if len(blob) > SET_STATEBLOB_MAX:
            return result(Res.FAIL)
        reply = self.engine.control(
            Cmd.SET_STATEBLOB, {"state_flags": flags, "type": blob_type, "length": len(blob)}, blob
        )
        return result(reply.result)
