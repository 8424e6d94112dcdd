"""The CUSE server: one engine as the character device /dev/vtpm-NAME.

The kernel's messages are decoded and encoded by ``wire``; state blobs move
through ``blobs``; this module does the I/O, the per-open state and the
threads.

Threads: a reader thread blocks in read() on /dev/cuse and answers every
request; the main thread only waits, so signals are handled there at once.
TPM commands run inline on the reader, except the few that generate keys
(seconds under emulation): those run on a worker thread, like swtpm's CUSE
mode, so the device keeps answering while they run. Meanwhile the commands
the protocol table marks ``while_busy`` (CMD_CANCEL_TPM_CMD, GET_CAPABILITY)
are served at once, another write() gets EBUSY, a read() is parked and
answered when the response exists (or with EINTR when the caller is
interrupted), and other ioctls wait in order for the command to end. To
stop, the main thread aborts the connection (sysfs ``abort``), which ends
the reader's read().
"""

from __future__ import annotations

import errno
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vtpmctl import logger
from vtpmctl.device.protocol import (
    HASH_DATA_MAX,
    MESSAGES,
    TPM2_SHORT_WRITE_RESPONSE,
    TPM12_KEYGEN_ORDINALS,
    TPM12_SHORT_WRITE_RESPONSE,
    TPM_HEADER_SIZE,
    Cmd,
    Res,
    decode_ioctl_request,
    encode_ioctl_response,
    tpm_code,
)
from vtpmctl.device.server.cuse.blobs import BlobTransfer
from vtpmctl.device.server.cuse.wire import (
    CUSE_DEVICE,
    CUSE_INIT_IN,
    FUSE_POLL_SCHEDULE_NOTIFY,
    HDR,
    IN_HEADER,
    INTERRUPT_IN,
    IOCTL_IN,
    IOCTL_REPLY,
    OPEN_OUT,
    POLL_IN,
    POLL_REPLY,
    POLLIN_BITS,
    POLLOUT_BITS,
    READ_BUFSIZE,
    RELEASE_IN,
    RW_IN,
    WRITE_REPLY,
    CuseError,
    Op,
    ReplyError,
    device_name,
    encode_init_reply,
    encode_notify_poll,
    encode_read_header,
    encode_reply,
    exact_device_name,
    lookup_ioctl,
)
from vtpmctl.engine.libtpms import CommandBuffer
from vtpmctl.engine.tpm import ControlReply, Engine, FatalEngineError
from vtpmctl.engine.tpm2 import KEYGEN_COMMANDS

log = logger.get(__name__)

TPM_COMMAND_MAX = 4096  # a longer write() is truncated, as swtpm does
NODE_TIMEOUT = 10.0  # seconds for devtmpfs to show the node

# TPM commands that generate keys: worth a thread, and the ones libtpms can cancel.
_LONG_TPM2 = KEYGEN_COMMANDS
_LONG_TPM12 = TPM12_KEYGEN_ORDINALS


def is_long_command(cmd: bytes | bytearray | memoryview, tpm2: bool) -> bool:
    """Whether a TPM command generates a key (runs on the worker thread)."""
    return tpm_code(cmd) in (_LONG_TPM2 if tpm2 else _LONG_TPM12)


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
        self,
        engine: Engine,
        name: str,
        *,
        fd: int | None = None,
        wait_for_node: bool = True,
        exact_name: bool = False,
    ) -> None:
        self.engine = engine
        # exact_name: /dev/NAME as given (swtpm cuse -n NAME), not /dev/vtpm-NAME
        self.devname = exact_device_name(name) if exact_name else device_name(name)
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
        self._blobs = BlobTransfer(engine, self._mu)
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
                except Exception as exc:
                    self._answer_failure(unique, exc, "request with opcode %d failed", opcode)
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

    def _send(self, data: bytes | list[bytes]) -> None:
        """Write one reply, whole or as header and payload parts (writev, no copy);
        a request the caller gave up on is not an error."""
        fd = self._fd
        if fd < 0:
            return
        try:
            if isinstance(data, bytes):
                os.write(fd, data)
            else:
                os.writev(fd, data)
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
        self._blobs.reset()
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
            if self._blobs.download is not None and self._blobs.download.read_pos is not None:
                self._blobs.download.read_pos = None  # back to command mode
                raise ReplyError(errno.EIO)
            if self._blobs.upload.streaming:
                self._blobs.upload.write(data)
                self._send(WRITE_REPLY.pack(WRITE_REPLY.size, 0, unique, size, 0))
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
                self._send(WRITE_REPLY.pack(WRITE_REPLY.size, 0, unique, size, 0))
                return
            cmdbuf = self._cmdbuf
            cmdbuf.view[:length] = data[:length]
            response = self.engine.process_buffer(cmdbuf, length)
        with self._mu:
            self._response = response
            self._resp_pos = 0
            kh, self._poll_kh = self._poll_kh, None
        self._send(WRITE_REPLY.pack(WRITE_REPLY.size, 0, unique, size, 0))
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
            self._send([encode_read_header(unique, min(size, len(response))), response[:size]])
            self._resp_pos = min(size, len(response))
        if kh is not None:
            self._notify_poll(kh)  # under the lock: close() cannot pull the fd away

    def _on_read(self, unique: int, n: int) -> None:
        _fh, _off, size, _rflags, _owner, flags, _pad = RW_IN.unpack_from(self._rview, HDR)
        after: Callable[[], None] | None = None
        with self._mu:
            download = self._blobs.download
            pos = self._resp_pos
            if self._blobs.upload.streaming:
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
            self._send([encode_read_header(unique, len(data)), data])
        if after is not None:
            after()

    def _on_poll(self, unique: int, n: int) -> None:
        _fh, kh, flags, _events = POLL_IN.unpack_from(self._rview, HDR)
        with self._mu:
            revents = 0
            download = self._blobs.download
            if self._resp_pos < len(self._response) or (
                download is not None and download.read_pos is not None
            ):
                revents |= POLLIN_BITS
            if not self._inflight:
                revents |= POLLOUT_BITS
            if not revents & POLLIN_BITS and flags & FUSE_POLL_SCHEDULE_NOTIFY:
                self._poll_kh = kh
        self._send(POLL_REPLY.pack(POLL_REPLY.size, 0, unique, revents, 0))

    def _notify_poll(self, kh: int) -> None:
        self._send(encode_notify_poll(kh))

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
        except Exception as exc:
            self._answer_failure(unique, exc, "deferred CMD_%s failed", cmd.name)

    def _answer_failure(self, unique: int, exc: Exception, what: str, arg: object) -> None:
        """How a request that raised is answered, so the caller never waits for a reply:
        its own errno, or EIO (and the device fails when the engine did)."""
        if isinstance(exc, ReplyError):
            self._send(encode_reply(unique, error=exc.errno))
        elif isinstance(exc, FatalEngineError):
            self._send(encode_reply(unique, error=errno.EIO))
            self._fail(str(exc))
        else:
            log.exception(what, arg)  # called in the except block: the traceback is exc's
            self._send(encode_reply(unique, error=errno.EIO))

    def _control(self, unique: int, cmd: Cmd, data: bytes) -> None:
        """Run one PTM ioctl and answer it with the whole union buffer."""
        after: Callable[[], None] | None = None
        exit_after = False
        if cmd == Cmd.GET_STATEBLOB:
            out, after = self._blobs.get(data)
        elif cmd == Cmd.SET_STATEBLOB:
            out = self._blobs.set(data)
        else:
            reply = self._engine_control(cmd, data)
            values: dict[str, int] = {"result": reply.result}
            if reply.result == Res.SUCCESS:
                values.update(reply.fields)
            out = encode_ioctl_response(cmd, values, reply.data)
            after = reply.after_send
            exit_after = reply.exit_after
        self._send(IOCTL_REPLY.pack(IOCTL_REPLY.size + len(out), 0, unique, 0, 0, 0, 0) + out)
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
                self._blobs.reset()
        return self.engine.control(cmd, fields, payload)
