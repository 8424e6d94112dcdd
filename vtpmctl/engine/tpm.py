"""The engine: one TPM's power state machine and control semantics.

Every frontend (sockets, CUSE) decodes its wire format with
``device.protocol`` and then calls :meth:`Engine.control` or
:meth:`Engine.process`; the behaviour of each control command exists here
once. The engine reaches the disk only through its :class:`StateDir`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vtpmctl import logger
from vtpmctl.device.protocol import (
    CAPS_CUSE,
    CAPS_SOCKET_TPM2,
    CAPS_SOCKET_TPM12,
    HASH_DATA_MAX,
    LOCALITY_MAX,
    MESSAGES,
    STATE_BLOB_CHUNK,
    TPM2_FATAL_RESPONSE,
    TPM12_FATAL_RESPONSE,
    TPM12_ST_CLEAR,
    TPM12_ST_DEACTIVATED,
    TPM12_ST_STATE,
    TPM_CODE_AT,
    TPM_HEADER_SIZE,
    TPM_ORD_SET_LOCALITY,
    BlobType,
    Cmd,
    ConfigFlag,
    InitFlag,
    Res,
    StateFlag,
    set_locality_response,
    tpm12_startup,
    tpm_code,
)
from vtpmctl.engine.libtpms import CommandBuffer, Libtpms, Storage
from vtpmctl.engine.tpm2.constants import CC, SU_CLEAR, SU_STATE
from vtpmctl.engine.tpm2.power import build_shutdown, build_startup
from vtpmctl.engine.tpm2.rc import RC
from vtpmctl.errors import EngineError
from vtpmctl.model import STATE_FILE_NAMES, BlobKind, OnShutdown, TpmFamily, Transport
from vtpmctl.store.blob import AesKey, BlobError, unwrap_transfer, wrap_transfer
from vtpmctl.store.statedir import StateDir, StateDirError

log = logger.get(__name__)

# Off `typing` at run time: the zygote, and so every daemon, would carry it
# (0.4 MiB; docs/architecture.md, "The zygote").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    Startup = Literal["none", "clear", "state", "deactivated"]  # deactivated: TPM 1.2 only

# libtpms' names of the blobs, as the Storage callbacks get them
_PERMALL = BlobKind.PERMANENT.file_name
_VOLATILESTATE = BlobKind.VOLATILE.file_name
_SAVESTATE = BlobKind.SAVESTATE.file_name

LOCK_RETRIES_AFTER_SAVESTATE = 300

# The fast path looks at one byte of the ordinal for each command that needs the
# slow path: the vendor SetLocality (its top byte) and TPM2_Shutdown (its low byte).
_VENDOR_AT = TPM_CODE_AT
_VENDOR_BYTE = TPM_ORD_SET_LOCALITY >> 24
_SHUTDOWN_AT = TPM_HEADER_SIZE - 1
_SHUTDOWN_BYTE = CC.Shutdown & 0xFF


class FatalEngineError(EngineError):
    """The process must end (the storage lock was lost for good)."""


class EngineConfig:
    """How the daemon's options set up one engine.

    A plain class, not a dataclass: the engine is in every daemon, and
    ``dataclasses`` would bring ``inspect``, ``ast`` and ``dis`` with it.
    """

    __slots__ = (
        "tpm2",
        "transport",
        "state_key",
        "migration_key",
        "startup",
        "not_need_init",
        "disable_auto_shutdown",
        "reject_locality_4",
        "allow_set_locality",
        "incoming",
        "allow_manufacture",
        "on_shutdown",
    )

    def __init__(
        self,
        tpm2: bool = True,
        transport: Transport = Transport.SOCKET,
        state_key: AesKey | None = None,
        migration_key: AesKey | None = None,
        startup: Startup = "none",
        not_need_init: bool = False,
        disable_auto_shutdown: bool = False,
        reject_locality_4: bool = False,
        allow_set_locality: bool = False,
        incoming: bool = False,
        allow_manufacture: bool | None = None,
        on_shutdown: OnShutdown = OnShutdown.EXIT,
    ) -> None:
        self.tpm2 = tpm2
        self.transport = transport
        self.state_key = state_key
        self.migration_key = migration_key
        self.startup = startup
        self.not_need_init = not_need_init
        self.disable_auto_shutdown = disable_auto_shutdown
        self.reject_locality_4 = reject_locality_4
        # The vendor SetLocality on the data channel (swtpm's --locality allow-set-locality).
        self.allow_set_locality = allow_set_locality
        self.incoming = incoming
        # None: a new TPM may be manufactured only if the dir has no permall now.
        self.allow_manufacture = allow_manufacture
        self.on_shutdown = on_shutdown


class ControlReply:
    """What a control command produced; frontends turn it into bytes.

    ``after_send`` runs once the reply left the process (GET_STATEBLOB of
    the savestate releases the storage lock only then). A plain class for
    the reason EngineConfig is one.
    """

    __slots__ = ("result", "fields", "data", "after_send", "exit_after")

    def __init__(
        self,
        result: int,
        fields: dict[str, int] | None = None,
        data: bytes = b"",
        after_send: Callable[[], None] | None = None,
        exit_after: bool = False,
    ) -> None:
        self.result = result
        self.fields = {} if fields is None else fields
        self.data = data
        self.after_send = after_send
        self.exit_after = exit_after


class Engine(Storage):
    """One vTPM. Thread-safe: libtpms calls are serialised by ``self.lock``.

    ``tpm`` is the libtpms binding to drive; by default the engine loads the
    library itself. A process can make only one binding, so one that makes
    engines in turn (the unit tests) passes the same binding to each, after
    closing the previous engine.
    """

    def __init__(
        self, statedir: StateDir, config: EngineConfig, tpm: Libtpms | None = None
    ) -> None:
        self.statedir = statedir
        self.config = config
        self.lock = threading.Lock()
        self.running = False
        self._locality = 0
        self._cache: dict[str, bytes] = {}
        self._last_was_shutdown = False
        self._lock_retries = 0
        self._staged_permanent = False
        self.shutdown_requested = threading.Event()
        # The last state write that failed (libtpms only learns "TPM_FAIL"): lets a
        # caller say "no space left on device writing FILE" instead of a TPM code.
        self.storage_error: OSError | None = None
        if config.allow_manufacture is None:
            # Only an empty dir gets a new TPM: a volatile or save state without its
            # permall is what is left of an existing TPM, not room for a new one.
            self._may_manufacture = not any(statedir.exists(n) for n in STATE_FILE_NAMES)
        else:
            self._may_manufacture = config.allow_manufacture
        if tpm is None:
            tpm = Libtpms(self)
        else:
            tpm.attach(self)
        self.tpm = tpm
        self.tpm.choose(TpmFamily.of(config.tpm2))
        self.tpm.use_locality_callback(self._locality != 0)
        self.fatal_response = TPM2_FATAL_RESPONSE if config.tpm2 else TPM12_FATAL_RESPONSE
        # The fast path reads this without the lock: True only while commands may run.
        self.ready = False

    # ------------------------------------------------------------ Storage (libtpms callbacks)

    def load(self, name: str) -> bytes | None:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        try:
            data = self.statedir.load(name)
        except StateDirError as exc:
            log.error("%s", exc)
            raise
        if data is not None:
            if name == _PERMALL:
                self._may_manufacture = False
                self._cache[name] = data
        elif name == _PERMALL and not self._may_manufacture and not self._staged_permanent:
            # With a blob staged by SET_STATEBLOB (incoming migration) libtpms still asks
            # for the file at MainInit, then uses the staged blob: no file is expected.
            log.error(
                "%s is missing; refusing to create a new TPM in its place",
                self.statedir.fspath(name),
            )
        return data

    def missing_ok(self, name: str) -> bool:
        return name != _PERMALL or self._may_manufacture

    def store(self, name: str, data: bytes) -> None:
        try:
            self.statedir.store(name, data)
        except OSError as exc:
            self.storage_error = exc
            raise
        if name == _PERMALL:
            self._cache[name] = data
            self._may_manufacture = False
            self._staged_permanent = False

    def delete(self, name: str, must_exist: bool) -> None:
        self._cache.pop(name, None)
        self.statedir.delete(name)

    def locality(self) -> int:
        return self._locality

    def set_locality_raw(self, loc: int) -> None:
        """Locality from a TPM_SEND_COMMAND frame: taken as given, like swtpm."""
        with self.lock:
            self._set_locality(loc)

    def _set_locality(self, loc: int) -> None:
        """Caller holds the lock: the callback registration is a libtpms call."""
        self._locality = loc
        self.tpm.use_locality_callback(loc != 0)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Apply ``--flags`` at process start: lock, and maybe INIT + Startup."""
        if not self.config.incoming and not self.statedir.lock(0):
            raise StateDirError(
                f"{self.statedir.dir} is locked by another process (pid "
                f"{self.statedir.holder_pid()}); stop it first"
            )
        if self.config.allow_manufacture is False and not self.config.incoming:
            self._validate_existing()  # an incoming TPM's state comes from QEMU instead
        if self.config.not_need_init or self.config.startup != "none":
            reply = self.control(Cmd.INIT, {"init_flags": 0})
            if reply.result != Res.SUCCESS:
                raise StateDirError(
                    f"the TPM in {self.statedir.dir} failed to start (result "
                    f"0x{reply.result:x}); see the log"
                )
            if self.config.startup != "none":
                self.process(self._startup_command())

    def _startup_command(self) -> bytes:
        startup = self.config.startup
        if self.config.tpm2:
            if startup == "deactivated":
                raise StateDirError("startup-deactivated is for a TPM 1.2 only")
            return build_startup(SU_CLEAR if startup == "clear" else SU_STATE)
        kinds = {"clear": TPM12_ST_CLEAR, "state": TPM12_ST_STATE}
        return tpm12_startup(kinds.get(startup, TPM12_ST_DEACTIVATED))

    def _validate_existing(self) -> None:
        """An existing TPM whose state libtpms rejects fails here, at start, with a
        message, not later as a TPM in failure mode. ValidateState is only safe
        before the first MainInit (it overwrites libtpms' NV globals), as here."""
        with self.lock:
            rc = self.tpm.validate_state([BlobKind.PERMANENT])
            volatile = self.statedir.exists(_VOLATILESTATE)
            if rc == 0 and volatile:
                rc = self.tpm.validate_state([BlobKind.PERMANENT, BlobKind.VOLATILE])
            else:
                volatile = False
        if rc == Res.RETRY:  # the blob does not exist
            raise StateDirError(
                f"{self.statedir.fspath(_PERMALL)} is missing; restore it "
                "from a snapshot or backup (a new TPM is never made in its place)"
            )
        if rc != 0 and volatile:  # the permanent state alone is good: keep it
            raise StateDirError(
                f"the volatile state {self.statedir.fspath(_VOLATILESTATE)} is corrupt "
                f"(libtpms rejects it: 0x{rc:x}); remove it to start as after a reboot "
                "(NV data is kept)"
            )
        if rc != 0:
            raise StateDirError(
                f"the state in {self.statedir.dir} is corrupt (libtpms rejects "
                f"it: 0x{rc:x}); restore it from a snapshot or backup"
            )

    def close(self) -> None:
        """Graceful end of the process: auto-shutdown, teardown, unlock."""
        with self.lock:
            self._stop_locked()
            self.tpm.free_response_buffer()
            self.statedir.unlock()

    def _auto_shutdown(self) -> None:
        if (
            not self.config.tpm2
            or self.config.disable_auto_shutdown
            or self._last_was_shutdown
            or not self.running
        ):
            return
        for su in (SU_STATE, SU_CLEAR):
            rc = tpm_code(self.tpm.process(build_shutdown(su)))
            if rc in (RC.SUCCESS, RC.INITIALIZE):
                break

    def _stop_locked(self) -> None:
        self.ready = False
        if self.running:
            self._auto_shutdown()
            self.tpm.terminate()
            self.running = False

    def _ensure_storage_lock(self, retries: int) -> bool:
        if self.statedir.locked:
            return True
        ok = self.statedir.lock(retries)
        if ok:
            self._lock_retries = 0
        return ok

    # ------------------------------------------------------------ data channel

    def process(self, cmd: bytes | bytearray | memoryview) -> bytes:
        """One TPM command in, one response out (copying; see process_buffer)."""
        buf = CommandBuffer()
        n = len(cmd)
        if n > buf.SIZE:
            return self.fatal_response
        buf.view[:n] = cmd
        return self.process_buffer(buf, n)

    def process_buffer(self, buf: CommandBuffer, length: int) -> bytes:
        """Run the command a frontend received into ``buf``; the hot path."""
        with self.lock:
            view = buf.view
            if (
                not self.ready
                or view[_VENDOR_AT] == _VENDOR_BYTE
                or view[_SHUTDOWN_AT] == _SHUTDOWN_BYTE
            ):
                # not running, lock to re-take, vendor SetLocality or TPM2_Shutdown
                return bytes(self._process_slow(buf, length))
            return bytes(self.tpm.process_in_place(length, buf.raw))

    def bind(
        self, buf: CommandBuffer, send: Callable[[memoryview, int], int], flags: int
    ) -> Callable[[int], bytes]:
        """process_buffer for one frontend connection, sending in place.

        Returns ``run(length)``: it runs the command in ``buf`` exactly as
        process_buffer does, and on the fast path offers the response to
        ``send(response, flags)`` straight from libtpms' buffer while the
        lock is held (nothing copied or allocated but a slice). ``send``
        must not block (``flags`` = MSG_DONTWAIT), so a client that does not
        read cannot hold the engine; ``run`` returns what is left to send,
        which the caller sends after the lock is released.
        """
        lock = self.lock
        view = buf.view
        run_tpm = self.tpm.runner(buf.raw)
        slow = self._process_slow
        vendor_at, vendor, shutdown_at, shutdown = (
            _VENDOR_AT,
            _VENDOR_BYTE,
            _SHUTDOWN_AT,
            _SHUTDOWN_BYTE,
        )

        def run(length: int) -> bytes:
            with lock:
                if not self.ready or view[vendor_at] == vendor or view[shutdown_at] == shutdown:
                    return bytes(slow(buf, length))
                resp = run_tpm(length)
                try:
                    sent = send(resp, flags)
                except BlockingIOError:
                    sent = 0
                return b"" if sent == len(resp) else bytes(resp[sent:])

        return run

    def _process_slow(self, buf: CommandBuffer, length: int) -> memoryview | bytes:
        if not self.running or length < TPM_HEADER_SIZE:
            return self.fatal_response
        ordinal = tpm_code(buf.view)
        if ordinal == TPM_ORD_SET_LOCALITY:
            return self._vendor_set_locality(buf, length)
        if not self.statedir.locked and not self._ensure_storage_lock(self._lock_retries):
            raise FatalEngineError(
                f"cannot re-take the lock on {self.statedir.dir}; another process holds it"
            )
        resp = self.tpm.process_in_place(length, buf.raw)
        self._last_was_shutdown = (
            self.config.tpm2 and ordinal == CC.Shutdown and tpm_code(resp) == RC.SUCCESS
        )
        # After a TPM2_Shutdown the next command must come here to clear the mark.
        self.ready = self.running and self.statedir.locked and not self._last_was_shutdown
        return resp

    def _vendor_set_locality(self, buf: CommandBuffer, length: int) -> bytes:
        """The vendor SetLocality, only where allowed (a kernel vTPM proxy sends it)."""
        if not self.config.allow_set_locality or length <= TPM_HEADER_SIZE:
            return self.fatal_response
        loc = buf.view[TPM_HEADER_SIZE]
        ok = loc < LOCALITY_MAX or (loc == LOCALITY_MAX and not self.config.reject_locality_4)
        if ok:
            self._set_locality(loc)
        return set_locality_response(self.config.tpm2, ok)

    def cancel(self) -> int:
        """Safe from any thread, without the lock (docs/libtpms.md, pitfall 14); libtpms' result."""
        return self.tpm.cancel()

    # ------------------------------------------------------------ control channel

    def capabilities(self) -> int:
        if self.config.transport == Transport.CUSE:
            return CAPS_CUSE
        return CAPS_SOCKET_TPM2 if self.config.tpm2 else CAPS_SOCKET_TPM12

    def control(self, cmd: Cmd, req: dict[str, int], data: bytes = b"") -> ControlReply:
        """Execute one control command with swtpm's semantics (docs/protocol.md#control-commands).

        The running-state rule of every command comes from the protocol table;
        a command the table marks ``while_busy`` runs without the engine lock.
        """
        handler = self._handlers.get(cmd)
        if handler is None:
            return ControlReply(Res.BAD_ORDINAL)
        msg = MESSAGES[cmd]
        if msg.while_busy:
            if not msg.allowed(self.running, req):
                return ControlReply(Res.BAD_ORDINAL)
            return handler(self, req, data)
        with self.lock:
            if not msg.allowed(self.running, req):
                return ControlReply(Res.BAD_ORDINAL)
            try:
                return handler(self, req, data)
            except FatalEngineError:
                raise
            except Exception:
                log.exception("control command %s failed", cmd.name)
                return ControlReply(Res.FAIL)

    def _c_caps(self, req: dict[str, int], data: bytes) -> ControlReply:
        return ControlReply(Res.SUCCESS, {"caps": self.capabilities()})

    def _c_cancel(self, req: dict[str, int], data: bytes) -> ControlReply:
        # Without the lock (docs/libtpms.md, pitfall 14); swtpm passes libtpms' result on:
        # TPM_FAIL on a TPM 1.2.
        return ControlReply(self.cancel())

    def _c_init(self, req: dict[str, int], data: bytes) -> ControlReply:
        self._stop_locked()
        must_lock = not self.config.incoming or self.statedir.locked or self._staged_permanent
        if must_lock and not self._ensure_storage_lock(0):
            log.error("CMD_INIT: %s is locked by another process", self.statedir.dir)
            return ControlReply(Res.FAIL)
        self._cache.pop(_VOLATILESTATE, None)
        rc = self.tpm.main_init()
        if rc != 0:
            log.error("TPMLIB_MainInit failed with 0x%x", rc)
            self.tpm.terminate()
            return ControlReply(rc)
        self.running = True
        self._last_was_shutdown = False
        self._staged_permanent = False
        if req.get("init_flags", 0) & InitFlag.DELETE_VOLATILE:
            self.delete(_VOLATILESTATE, False)
        self.ready = self.statedir.locked
        return ControlReply(Res.SUCCESS)

    def _c_shutdown(self, req: dict[str, int], data: bytes) -> ControlReply:
        if self.config.on_shutdown == OnShutdown.POWER_OFF and self._ensure_storage_lock(
            self._lock_retries
        ):
            # Powered off like a physical TPM at the end of a VM run; the state is saved
            # under the lock (re-taken if a savestate GET released it), and the next
            # client's CMD_INIT powers it on. A lock another host took means the TPM
            # has moved: then the process ends as with ``exit``.
            self._stop_locked()
            log.info("CMD_SHUTDOWN: TPM powered off and saved; serving the next client")
            return ControlReply(Res.SUCCESS)
        try:
            self._stop_locked()
        finally:
            self.shutdown_requested.set()
        return ControlReply(Res.SUCCESS, exit_after=True)

    def _c_stop(self, req: dict[str, int], data: bytes) -> ControlReply:
        self._stop_locked()
        return ControlReply(Res.SUCCESS)

    def _c_established(self, req: dict[str, int], data: bytes) -> ControlReply:
        rc, bit = self.tpm.established()
        return ControlReply(rc, {"bit": int(bit)})

    def _c_locality(self, req: dict[str, int], data: bytes) -> ControlReply:
        loc = req["loc"]
        if loc > LOCALITY_MAX or (loc == LOCALITY_MAX and self.config.reject_locality_4):
            return ControlReply(Res.BAD_LOCALITY)
        self._set_locality(loc)
        return ControlReply(Res.SUCCESS)

    def _c_hash_start(self, req: dict[str, int], data: bytes) -> ControlReply:
        return ControlReply(self.tpm.hash_start())

    def _c_hash_data(self, req: dict[str, int], data: bytes) -> ControlReply:
        for off in range(0, len(data), HASH_DATA_MAX):
            rc = self.tpm.hash_data(data[off : off + HASH_DATA_MAX])
            if rc:
                return ControlReply(rc)
        return ControlReply(Res.SUCCESS)

    def _c_hash_end(self, req: dict[str, int], data: bytes) -> ControlReply:
        return ControlReply(self.tpm.hash_end())

    def _c_store_volatile(self, req: dict[str, int], data: bytes) -> ControlReply:
        self.statedir.store(_VOLATILESTATE, self.tpm.volatile_all_store())
        return ControlReply(Res.SUCCESS)

    def _c_reset_established(self, req: dict[str, int], data: bytes) -> ControlReply:
        loc = req["loc"]
        if loc > LOCALITY_MAX:
            return ControlReply(Res.BAD_LOCALITY)
        saved = self._locality
        self._set_locality(loc)
        try:
            return ControlReply(self.tpm.reset_established())
        finally:
            self._set_locality(saved)

    def _c_get_config(self, req: dict[str, int], data: bytes) -> ControlReply:
        flags = 0
        if self.config.state_key is not None:
            flags |= ConfigFlag.FILE_KEY
        if self.config.migration_key is not None:
            flags |= ConfigFlag.MIGRATION_KEY
        return ControlReply(Res.SUCCESS, {"flags": flags})

    def _c_set_buffersize(self, req: dict[str, int], data: bytes) -> ControlReply:
        cur, lo, hi = self.tpm.set_buffer_size(req["buffersize"])
        return ControlReply(Res.SUCCESS, {"buffersize": cur, "minsize": lo, "maxsize": hi})

    def _c_get_info(self, req: dict[str, int], data: bytes) -> ControlReply:
        text = self.tpm.get_info(req["flags"]).encode() + b"\0"
        offset = req["offset"]
        if offset >= len(text) - 1:
            return ControlReply(Res.BAD_PARAMETER)
        chunk = text[offset : offset + STATE_BLOB_CHUNK]
        return ControlReply(Res.SUCCESS, {"totlength": len(text), "length": len(chunk)}, chunk)

    def _c_lock_storage(self, req: dict[str, int], data: bytes) -> ControlReply:
        retries = req["retries"]
        self._lock_retries = retries
        if self._ensure_storage_lock(retries):
            self.ready = self.running
            return ControlReply(Res.SUCCESS)
        return ControlReply(Res.FAIL)

    # ------------------------------------------------------------ state blobs

    def plain_state(self, kind: BlobType) -> bytes | None:
        """Plaintext of one blob as GET_STATEBLOB would send it (caller holds the lock)."""
        if kind == BlobType.PERMANENT:
            return self.load(_PERMALL)
        if kind == BlobType.VOLATILE:
            data = self.tpm.volatile_all_store()
            # swtpm writes the live volatile state to the file and removes it again.
            self.delete(_VOLATILESTATE, False)
            return data
        if not self.config.tpm2:
            return self.statedir.load(_SAVESTATE)
        return None

    def _c_get_stateblob(self, req: dict[str, int], data: bytes) -> ControlReply:
        try:
            kind = BlobType(req["type"])
        except ValueError:
            bad = Res.BAD_PARAMETER if self.config.transport == Transport.CUSE else Res.FAIL
            return ControlReply(bad)
        try:
            plain = self.plain_state(kind)
        except StateDirError:
            return ControlReply(Res.FAIL)
        if not plain:
            return ControlReply(Res.RETRY)
        keep = not (req["state_flags"] & StateFlag.DECRYPTED) and self.config.state_key is not None
        blob, flags = wrap_transfer(
            plain,
            state_key=self.config.state_key,
            keep_state_encryption=keep,
            migration_key=self.config.migration_key,
        )
        after = self._release_after_savestate if kind == BlobType.SAVESTATE else None
        return ControlReply(Res.SUCCESS, {"state_flags": flags}, blob, after_send=after)

    def _release_after_savestate(self) -> None:
        with self.lock:
            self.statedir.unlock()
            self._lock_retries = LOCK_RETRIES_AFTER_SAVESTATE
            self.ready = False

    def _c_set_stateblob(self, req: dict[str, int], data: bytes) -> ControlReply:
        if not self._ensure_storage_lock(self._lock_retries):
            raise FatalEngineError(f"{self.statedir.dir} is locked by another process")
        try:
            kind = BlobType(req["type"])
        except ValueError:
            return ControlReply(Res.BAD_PARAMETER)
        try:
            plain = unwrap_transfer(
                data,
                state_flags=req["state_flags"],
                state_key=self.config.state_key,
                migration_key=self.config.migration_key,
            )
        except BlobError as exc:
            log.error("SET_STATEBLOB(%s): %s", kind.name, exc)
            return ControlReply(exc.rc)
        rc = self.tpm.set_state(kind.kind, plain or None)
        if rc:
            log.error("SET_STATEBLOB(%s): libtpms refused the blob (0x%x)", kind.name, rc)
            self._staged_permanent = False
            return ControlReply(rc)
        if kind == BlobType.PERMANENT:
            self._staged_permanent = bool(plain)
            self._cache.pop(_PERMALL, None)
            if plain:
                # The staged blob replaces whatever is on disk at the next INIT.
                self._may_manufacture = False
        return ControlReply(Res.SUCCESS)

    _handlers: dict[Cmd, Callable[[Engine, dict[str, int], bytes], ControlReply]] = {
        Cmd.GET_CAPABILITY: _c_caps,
        Cmd.INIT: _c_init,
        Cmd.SHUTDOWN: _c_shutdown,
        Cmd.GET_TPMESTABLISHED: _c_established,
        Cmd.SET_LOCALITY: _c_locality,
        Cmd.HASH_START: _c_hash_start,
        Cmd.HASH_DATA: _c_hash_data,
        Cmd.HASH_END: _c_hash_end,
        Cmd.CANCEL_TPM_CMD: _c_cancel,
        Cmd.STORE_VOLATILE: _c_store_volatile,
        Cmd.RESET_TPMESTABLISHED: _c_reset_established,
        Cmd.GET_STATEBLOB: _c_get_stateblob,
        Cmd.SET_STATEBLOB: _c_set_stateblob,
        Cmd.STOP: _c_stop,
        Cmd.GET_CONFIG: _c_get_config,
        Cmd.SET_BUFFERSIZE: _c_set_buffersize,
        Cmd.GET_INFO: _c_get_info,
        Cmd.LOCK_STORAGE: _c_lock_storage,
    }
