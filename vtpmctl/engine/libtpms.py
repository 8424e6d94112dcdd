"""libtpms through ctypes: the only module that touches the C library.

libtpms keeps one TPM in process globals, calls back into Python for every
NV access and owns some buffers while we own others. This module pins all of
that down (see docs/libtpms.md): argtypes on every function, callbacks
that can never raise into C and are kept alive for the life of the process,
mutable command buffers, and a reused response buffer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_char_p,
    c_int,
    c_size_t,
    c_ubyte,
    c_uint,
    c_uint32,
    c_void_p,
)
from enum import IntEnum

from vtpmctl import logger
from vtpmctl.device.protocol import Res
from vtpmctl.errors import TpmResultError
from vtpmctl.model import BlobKind, TpmFamily

# Off `typing` at run time: the zygote, and so every daemon, would carry it
# (0.4 MiB; docs/architecture.md, "The zygote").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logger.get(__name__)

# Plain ints (callbacks return them to C on every NV access and locality query).
TPM_SUCCESS = int(Res.SUCCESS)
TPM_FAIL = int(Res.FAIL)
TPM_RETRY = int(Res.RETRY)
# TPMLIB_TPMVersion
_TPM_VERSION = {TpmFamily.TPM12: 0, TpmFamily.TPM2: 1}


class StateType(IntEnum):
    """TPMLIB_StateType: one bit per blob kind."""

    PERMANENT = 1
    VOLATILE = 2
    SAVE_STATE = 4


STATE_TYPE = {
    BlobKind.PERMANENT: StateType.PERMANENT,
    BlobKind.VOLATILE: StateType.VOLATILE,
    BlobKind.SAVESTATE: StateType.SAVE_STATE,
}


class LibtpmsError(TpmResultError):
    """A libtpms call failed; .rc is its TPM_RESULT."""

    def __init__(self, what: str, rc: int) -> None:
        super().__init__(f"{what} failed: libtpms result 0x{rc:x}")
        self.rc = rc


_U8P = POINTER(c_ubyte)
COMMAND_BUFFER_SIZE = 8192
# The array type, made once at import (in the zygote, for all its daemons).
_CommandArray = c_ubyte * COMMAND_BUFFER_SIZE
NVRAM_INIT = CFUNCTYPE(c_uint32)
NVRAM_LOADDATA = CFUNCTYPE(c_uint32, POINTER(_U8P), POINTER(c_uint32), c_uint32, c_char_p)
NVRAM_STOREDATA = CFUNCTYPE(c_uint32, _U8P, c_uint32, c_uint32, c_char_p)
NVRAM_DELETENAME = CFUNCTYPE(c_uint32, c_uint32, c_char_p, c_ubyte)
IO_INIT = CFUNCTYPE(c_uint32)
IO_GETLOCALITY = CFUNCTYPE(c_uint32, POINTER(c_uint32), c_uint32)
IO_GETPHYSICALPRESENCE = CFUNCTYPE(c_uint32, POINTER(c_ubyte), c_uint32)


class _Callbacks(Structure):
    _fields_ = [
        ("sizeOfStruct", c_int),
        ("tpm_nvram_init", NVRAM_INIT),
        ("tpm_nvram_loaddata", NVRAM_LOADDATA),
        ("tpm_nvram_storedata", NVRAM_STOREDATA),
        ("tpm_nvram_deletename", NVRAM_DELETENAME),
        ("tpm_io_init", IO_INIT),
        ("tpm_io_getlocality", IO_GETLOCALITY),
        ("tpm_io_getphysicalpresence", IO_GETPHYSICALPRESENCE),
    ]


class Storage:
    """What libtpms needs from the store; implemented by the engine.

    ``load`` returns the plaintext blob, ``None`` when it does not exist,
    and raises when it exists but cannot be used. It also decides whether
    a missing permanent state may be manufactured (docs/libtpms.md, pitfall 3).
    """

    def load(self, name: str) -> bytes | None:
        raise NotImplementedError

    def missing_ok(self, name: str) -> bool:
        raise NotImplementedError

    def store(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, name: str, must_exist: bool) -> None:
        raise NotImplementedError

    def locality(self) -> int:
        raise NotImplementedError


_loaded: dict[str, ctypes.CDLL] = {}


def _load_library(name: str = "libtpms.so.0") -> ctypes.CDLL:
    if name in _loaded:
        return _loaded[name]
    try:
        lib = _loaded[name] = ctypes.CDLL(name)
    except OSError as exc:
        raise LibtpmsError(
            f"loading {name} ({exc}); install the libtpms0 package", TPM_FAIL
        ) from exc
    return lib


def preload() -> None:
    """Map libtpms (and libcrypto) without making a TPM: what the zygote shares."""
    _declare(_load_library())


def version_text(version: int) -> str:
    """TPMLIB_GetVersion's number as text: 0x000902 is "0.9.2"."""
    return f"{version >> 16}.{(version >> 8) & 0xFF}.{version & 0xFF}"


def installed_version() -> str:
    """The version of the libtpms this process loads (dlopen only: no TPM is made)."""
    get_version = _load_library().TPMLIB_GetVersion
    get_version.argtypes = []
    get_version.restype = c_uint32
    return version_text(int(get_version()))


def main(argv: list[str] | None = None) -> int:
    """``python -m vtpmctl _libtpms_version``: the installed version, for a parent that
    must not load libtpms itself (one JSON answer through vtpmctl.childproc)."""
    from vtpmctl.childproc import serve_child

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        version = installed_version()
        return {"libtpms_version": version, "library": loaded_path()}

    return serve_child(answer)


def loaded_path() -> str | None:
    """The file this process mapped as libtpms (so a parent can tell when it changes)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1]
                if "/libtpms.so" in path:
                    return path
    except OSError:
        pass
    return None


_declared: set[int] = set()  # id() of each library in _loaded whose prototypes are set


def _declare(lib: ctypes.CDLL) -> None:
    """Set the prototypes, once per library.

    The zygote sets them (``preload``) for its daemons: setting them again in
    each daemon replaced objects they all share, copying their pages.
    """
    if id(lib) in _declared:
        return
    sigs: dict[str, tuple[list[Any], Any]] = {
        "TPMLIB_GetVersion": ([], c_uint32),
        "TPMLIB_ChooseTPMVersion": ([c_int], c_uint32),
        "TPMLIB_RegisterCallbacks": ([POINTER(_Callbacks)], c_uint32),
        "TPMLIB_MainInit": ([], c_uint32),
        "TPMLIB_Terminate": ([], None),
        "TPMLIB_Process": (
            [POINTER(_U8P), POINTER(c_uint32), POINTER(c_uint32), _U8P, c_uint32],
            c_uint32,
        ),
        "TPMLIB_VolatileAll_Store": ([POINTER(_U8P), POINTER(c_uint32)], c_uint32),
        "TPMLIB_CancelCommand": ([], c_uint32),
        "TPMLIB_GetInfo": ([c_int], c_void_p),
        "TPMLIB_SetDebugFD": ([c_int], None),
        "TPMLIB_SetDebugLevel": ([c_uint], None),
        "TPMLIB_SetBufferSize": ([c_uint32, POINTER(c_uint32), POINTER(c_uint32)], c_uint32),
        "TPMLIB_ValidateState": ([c_int, c_uint], c_uint32),
        "TPMLIB_SetState": ([c_int, _U8P, c_uint32], c_uint32),
        "TPMLIB_GetState": ([c_int, POINTER(_U8P), POINTER(c_uint32)], c_uint32),
        "TPM_IO_Hash_Start": ([], c_uint32),
        "TPM_IO_Hash_Data": ([_U8P, c_uint32], c_uint32),
        "TPM_IO_Hash_End": ([], c_uint32),
        "TPM_IO_TpmEstablished_Get": ([POINTER(c_ubyte)], c_uint32),
        "TPM_IO_TpmEstablished_Reset": ([], c_uint32),
        "TPM_Free": ([c_void_p], None),
    }
    for fname, (argtypes, restype) in sigs.items():
        fn = getattr(lib, fname)
        fn.argtypes = argtypes
        fn.restype = restype
    _declared.add(id(lib))


# The C library this process already runs on (the one libtpms frees with): not
# ctypes.util.find_library, which runs `ldconfig -p` in every process that loads libtpms.
_libc = ctypes.CDLL(None)
_libc.malloc.restype = c_void_p
_libc.malloc.argtypes = [c_size_t]


def trim_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``).

    Imports leave freed holes in the heap (a module's code read, unmarshalled and
    dropped), resident pages that nothing uses. In the zygote every daemon's RSS
    counts them (0.1-0.7 MiB, as the import order happens to place them).
    """
    trim = getattr(_libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim.argtypes = [c_size_t]
        trim.restype = c_int
        trim(0)


class Libtpms:
    """The process's one TPM. Not thread-safe: the engine serialises calls.

    One binding serves one engine at a time; a process that makes several
    engines in turn (unit tests) hands the same binding to each (``attach``).
    """

    _instance: Libtpms | None = None

    def __init__(self, storage: Storage | None = None, library: str = "libtpms.so.0") -> None:
        if Libtpms._instance is not None:
            raise RuntimeError("libtpms holds one TPM per process; one Libtpms only")
        Libtpms._instance = self
        self.lib = _load_library(library)
        _declare(self.lib)
        self.storage = storage if storage is not None else Storage()
        self.version = int(self.lib.TPMLIB_GetVersion())
        # Response buffer owned by libtpms (realloc'd), reused for every command.
        self._resp = _U8P()
        self._resp_size = c_uint32(0)
        self._resp_bufsize = c_uint32(0)
        self._resp_view: memoryview | None = None
        self._resp_addr: int | None = None
        self._resp_len = 0
        # Prebuilt arguments for the hot path.
        self._cmdbuf = _CommandArray()
        self._cmdview = memoryview(self._cmdbuf).cast("B")
        # A second handle on TPMLIB_Process without argtypes: ctypes' per-argument
        # conversion costs about 1 us a call. Every argument is prebuilt with the
        # right C type (byref objects, a c_ubyte array, an int length).
        self._process = self.lib["TPMLIB_Process"]
        self._process.restype = c_uint32
        self._resp_ptr = c_void_p.from_buffer(self._resp)  # reads the pointer without .contents
        self._resp_ref = byref(self._resp)
        self._resp_size_ref = byref(self._resp_size)
        self._resp_bufsize_ref = byref(self._resp_bufsize)
        self._callbacks = self._make_callbacks()  # kept alive: libtpms holds raw pointers
        # The same set without getlocality, for use_locality_callback(False).
        self._callbacks_loc0 = _Callbacks.from_buffer_copy(self._callbacks)
        self._callbacks_loc0.tpm_io_getlocality = IO_GETLOCALITY()
        self._locality_cb = True
        self._tpm2 = False
        self._registered = False

    # ------------------------------------------------------------ callbacks

    def _guard(self, what: str, fn: Callable[..., int]) -> Callable[..., int]:
        """Never let a Python exception reach C: it would see garbage.

        See docs/libtpms.md, pitfall 1.
        """

        def wrapper(*args: Any) -> int:
            try:
                return fn(*args)
            except BaseException:  # noqa: BLE001 - must not unwind into C
                log.exception("libtpms callback %s failed", what)
                return TPM_FAIL

        return wrapper

    def attach(self, storage: Storage) -> None:
        """Serve another storage from now on (the TPM must not be running)."""
        self.storage = storage

    def _make_callbacks(self) -> _Callbacks:
        binding = self  # the storage is looked up at each call: attach() replaces it

        def nvram_init() -> int:
            return TPM_SUCCESS

        def loaddata(pdata: Any, plen: Any, tpm_number: int, name: bytes) -> int:
            sname = name.decode()
            storage = binding.storage
            data = storage.load(sname)
            if data is None:
                pdata[0] = _U8P()
                plen[0] = 0
                return TPM_RETRY if storage.missing_ok(sname) else TPM_FAIL
            # libtpms free()s this buffer; TPM_Malloc is capped at 128 KiB
            # (docs/libtpms.md, pitfall 9).
            ptr = _libc.malloc(max(len(data), 1))
            if not ptr:
                return TPM_FAIL
            ctypes.memmove(ptr, data, len(data))
            pdata[0] = ctypes.cast(ptr, _U8P)
            plen[0] = len(data)
            return TPM_SUCCESS

        def storedata(data: Any, length: int, tpm_number: int, name: bytes) -> int:
            binding.storage.store(name.decode(), ctypes.string_at(data, length))
            return TPM_SUCCESS

        def deletename(tpm_number: int, name: bytes, must_exist: int) -> int:
            binding.storage.delete(name.decode(), bool(must_exist))
            return TPM_SUCCESS

        def io_init() -> int:
            return TPM_SUCCESS

        def getlocality(ploc: Any, tpm_number: int) -> int:
            ploc[0] = binding.storage.locality()
            return TPM_SUCCESS

        def getpp(ppp: Any, tpm_number: int) -> int:
            ppp[0] = 0
            return TPM_SUCCESS

        cbs = _Callbacks()
        cbs.sizeOfStruct = ctypes.sizeof(_Callbacks)
        self._cfuncs = (
            NVRAM_INIT(self._guard("nvram_init", nvram_init)),
            NVRAM_LOADDATA(self._guard("loaddata", loaddata)),
            NVRAM_STOREDATA(self._guard("storedata", storedata)),
            NVRAM_DELETENAME(self._guard("deletename", deletename)),
            IO_INIT(self._guard("io_init", io_init)),
            IO_GETLOCALITY(self._guard("getlocality", getlocality)),
            IO_GETPHYSICALPRESENCE(self._guard("getphysicalpresence", getpp)),
        )
        (
            cbs.tpm_nvram_init,
            cbs.tpm_nvram_loaddata,
            cbs.tpm_nvram_storedata,
            cbs.tpm_nvram_deletename,
            cbs.tpm_io_init,
            cbs.tpm_io_getlocality,
            cbs.tpm_io_getphysicalpresence,
        ) = self._cfuncs
        return cbs

    # ------------------------------------------------------------ lifecycle

    def choose(self, family: TpmFamily) -> None:
        rc = self.lib.TPMLIB_ChooseTPMVersion(_TPM_VERSION[family])
        if rc:
            raise LibtpmsError("TPMLIB_ChooseTPMVersion", rc)
        self._tpm2 = family.tpm2
        if not self._registered:
            self._register(with_locality=True)

    def _register(self, with_locality: bool) -> None:
        cbs = self._callbacks if with_locality else self._callbacks_loc0
        rc = self.lib.TPMLIB_RegisterCallbacks(byref(cbs))  # libtpms copies the struct
        if rc:
            raise LibtpmsError("TPMLIB_RegisterCallbacks", rc)
        self._locality_cb = with_locality
        self._registered = True

    def use_locality_callback(self, needed: bool) -> None:
        """Whether libtpms asks Python for the locality at every command.

        TPM2_Process calls getlocality before each command: a Python callback
        that costs about a microsecond a command. Without it, TPM 2 runs the
        command at locality 0, which is what the callback answers at locality
        0, so the engine registers it only while the locality is not 0.
        TPM 1.2 always keeps it. Serialise with the other libtpms calls.
        """
        needed = needed or not self._tpm2
        if self._registered and needed != self._locality_cb:
            self._register(with_locality=needed)

    def set_debug_fd(self, fd: int) -> None:
        self.lib.TPMLIB_SetDebugFD(fd)

    def set_debug_level(self, level: int) -> None:
        """How much libtpms traces to its debug fd (0: nothing)."""
        self.lib.TPMLIB_SetDebugLevel(level)

    def main_init(self) -> int:
        return int(self.lib.TPMLIB_MainInit())

    def terminate(self) -> None:
        self.lib.TPMLIB_Terminate()

    def free_response_buffer(self) -> None:
        if self._resp:
            self.lib.TPM_Free(ctypes.cast(self._resp, c_void_p))
            # NULL in place: the prebuilt byref()s and every runner() keep pointing here.
            self._resp_ptr.value = None
            self._resp_bufsize.value = 0
            self._resp_view = None
            self._resp_addr = None
            self._resp_len = 0

    # ------------------------------------------------------------ commands

    def process_in_place(
        self, length: int, cmdbuf: ctypes.Array[c_ubyte] | None = None
    ) -> memoryview:
        """Run the command in ``cmdbuf`` (default: the binding's own buffer) up to
        ``length``; the response view stays valid until the next call.
        No allocation on the hot path but the returned slice.

        ``cmdbuf`` must be a c_ubyte array (the call has no argtypes to check it)."""
        self._process(
            self._resp_ref,
            self._resp_size_ref,
            self._resp_bufsize_ref,
            self._cmdbuf if cmdbuf is None else cmdbuf,
            length,
        )
        size = self._resp_size.value
        if self._resp_ptr.value != self._resp_addr or size > self._resp_len:
            self._map_response()
        view = self._resp_view
        if view is None:
            return memoryview(b"")
        return view[:size]

    def runner(self, cmdbuf: ctypes.Array[c_ubyte]) -> Callable[[int], memoryview]:
        """process_in_place bound to one command buffer, for a frontend's
        receive loop: the same call with every argument in a closure cell."""
        process = self._process
        resp_ref, size_ref = self._resp_ref, self._resp_size_ref
        bufsize_ref = self._resp_bufsize_ref
        size, ptr = self._resp_size, self._resp_ptr
        empty = memoryview(b"")

        def run(length: int) -> memoryview:
            process(resp_ref, size_ref, bufsize_ref, cmdbuf, length)
            n = size.value
            if ptr.value != self._resp_addr or n > self._resp_len:
                self._map_response()
            view = self._resp_view
            return empty if view is None else view[:n]

        return run

    def _map_response(self) -> None:
        """libtpms (re)allocated its response buffer: view the new one."""
        addr = self._resp_ptr.value
        size = self._resp_bufsize.value
        self._resp_addr = addr
        self._resp_len = size if addr else 0
        self._resp_view = (
            memoryview((c_ubyte * size).from_address(addr)).cast("B") if addr else None
        )

    def process(self, cmd: bytes) -> bytes:
        n = len(cmd)
        if n > len(self._cmdview):
            raise ValueError("command larger than the command buffer")
        self._cmdview[:n] = cmd
        return bytes(self.process_in_place(n))

    def cancel(self) -> int:
        """TPMLIB_CancelCommand's result (TPM 1.2 cannot cancel: TPM_FAIL)."""
        return int(self.lib.TPMLIB_CancelCommand())

    # ------------------------------------------------------------ state

    def _take(self, ptr: Any, length: int) -> bytes:
        try:
            return ctypes.string_at(ptr, length) if ptr else b""
        finally:
            if ptr:
                self.lib.TPM_Free(ctypes.cast(ptr, c_void_p))

    def get_state(self, kind: BlobKind) -> bytes:
        ptr = _U8P()
        n = c_uint32(0)
        state_type = STATE_TYPE[kind]
        rc = self.lib.TPMLIB_GetState(int(state_type), byref(ptr), byref(n))
        data = self._take(ptr, n.value)
        if rc:
            raise LibtpmsError(f"TPMLIB_GetState({state_type.name})", rc)
        return data

    def volatile_all_store(self) -> bytes:
        ptr = _U8P()
        n = c_uint32(0)
        rc = self.lib.TPMLIB_VolatileAll_Store(byref(ptr), byref(n))
        data = self._take(ptr, n.value)
        if rc:
            raise LibtpmsError("TPMLIB_VolatileAll_Store", rc)
        return data

    def set_state(self, kind: BlobKind, data: bytes | None) -> int:
        state_type = int(STATE_TYPE[kind])
        if not data:
            return int(self.lib.TPMLIB_SetState(state_type, None, 0))
        buf = (c_ubyte * len(data)).from_buffer_copy(data)
        return int(self.lib.TPMLIB_SetState(state_type, buf, len(data)))

    def validate_state(self, kinds: Iterable[BlobKind]) -> int:
        mask = 0
        for kind in kinds:
            mask |= STATE_TYPE[kind]
        return int(self.lib.TPMLIB_ValidateState(mask, 0))

    def set_buffer_size(self, wanted: int) -> tuple[int, int, int]:
        lo = c_uint32(0)
        hi = c_uint32(0)
        cur = self.lib.TPMLIB_SetBufferSize(wanted, byref(lo), byref(hi))
        return int(cur), lo.value, hi.value

    def get_info(self, flags: int) -> str:
        ptr = self.lib.TPMLIB_GetInfo(flags)
        if not ptr:
            return ""
        try:
            return ctypes.string_at(ptr).decode()
        finally:
            self.lib.TPM_Free(ptr)

    # ------------------------------------------------------------ TIS extras

    def hash_start(self) -> int:
        return int(self.lib.TPM_IO_Hash_Start())

    def hash_data(self, data: bytes) -> int:
        buf = (c_ubyte * max(len(data), 1)).from_buffer_copy(data.ljust(1, b"\0"))
        return int(self.lib.TPM_IO_Hash_Data(buf, len(data)))

    def hash_end(self) -> int:
        return int(self.lib.TPM_IO_Hash_End())

    def established(self) -> tuple[int, bool]:
        bit = c_ubyte(0)
        rc = self.lib.TPM_IO_TpmEstablished_Get(byref(bit))
        return int(rc), bool(bit.value)

    def reset_established(self) -> int:
        return int(self.lib.TPM_IO_TpmEstablished_Reset())


class CommandBuffer:
    """A connection's own mutable command buffer (libtpms may write into it)."""

    SIZE = COMMAND_BUFFER_SIZE

    def __init__(self) -> None:
        self.raw = _CommandArray()
        self.view = memoryview(self.raw).cast("B")
